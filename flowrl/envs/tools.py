"""Tools a model calls during a rollout, and how a call is written in its text.

A call is the tool's name as a tag around its arguments, the first one in the turn counts::

    <calculator>123456789 * 987654321</calculator>
    <python>print(sum(range(10)))</python>

The sampler stops the turn at the closing tag (``STOP_STRINGS``) and may leave the tag out of
the text, so an opening tag without one runs to the end of the turn. A tool never raises for
what the model wrote: every failure is a ``ToolOutput`` with ``ok=False`` and a one-line reason
the model can read.

``calculator`` is exact: integers of any size and decimal numbers are rationals (``0.1 + 0.2``
is ``0.3``, ``2/3*3`` is ``2``), only a non-integer power falls back to floats; exponents and
result sizes are capped so that ``9**9**9`` is refused at once instead of running for hours.
``python`` runs the code in :func:`flowrl.envs.sandbox.run_python`.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import textwrap
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from flowrl.envs.sandbox import SandboxLimits, run_python

Number = Fraction | float


@dataclass(frozen=True)
class ToolOutput:
    text: str  # what the model reads
    ok: bool
    status: str  # "ok", "error", or a sandbox status ("timeout", "blocked", ...)
    seconds: float


class Tool(ABC):
    """A named function of a text argument; ``description`` is what a prompt tells the model."""

    name: str
    description: str

    @abstractmethod
    def __call__(self, arguments: str) -> ToolOutput: ...


# ---- calculator -------------------------------------------------------------------------------
class CalculatorError(ValueError):
    """An expression the calculator refuses; the message is the model's observation."""


MAX_EXPRESSION_CHARS = 2000
MAX_RESULT_DIGITS = 1000  # of any integer, numerator or denominator along the way
MAX_BITS = math.ceil(MAX_RESULT_DIGITS * math.log2(10))
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class Calculator(Tool):
    name = "calculator"
    description = (
        "Evaluates an arithmetic expression exactly: numbers, + - * / // % ** and parentheses, "
        "e.g. <calculator>(17 + 5) * 3 / 4</calculator>."
    )

    def __call__(self, arguments: str) -> ToolOutput:
        start = time.monotonic()
        try:
            text, ok = format_number(evaluate(arguments)), True
        except CalculatorError as e:
            text, ok = f"calculator: {e}", False
        return ToolOutput(text, ok, "ok" if ok else "error", time.monotonic() - start)


def evaluate(expression: str) -> Number:
    """The exact value of an arithmetic expression; raises CalculatorError (never eval)."""
    expression = expression.strip()
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError) as e:  # ValueError: an integer literal over Python's digit limit
        raise CalculatorError(f"invalid expression: {getattr(e, 'msg', e)}") from None
    try:
        return _value(tree.body, expression)
    except RecursionError:
        raise CalculatorError("expression nested too deeply") from None


def _value(node: ast.expr, source: str) -> Number:
    if isinstance(node, ast.Constant):
        return _literal(node, source)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand, source)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _binary(node.op, _value(node.left, source), _value(node.right, source))
    what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
    raise CalculatorError(f"unsupported syntax {what!r}")


def _literal(node: ast.Constant, source: str) -> Number:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalculatorError(f"unsupported value {value!r}")
    if isinstance(value, int):
        return _checked(Fraction(value))
    written = (ast.get_source_segment(source, node) or "").replace("_", "").lower()
    exponent = re.search(r"e([+-]?\d+)", written)
    if not math.isfinite(value) or exponent and abs(int(exponent.group(1))) > 2 * MAX_RESULT_DIGITS:
        raise CalculatorError(f"number out of range {written!r}")
    try:
        return _checked(Fraction(written))  # the decimal as written: 0.1 is 1/10
    except (ValueError, ZeroDivisionError):
        return _checked(Fraction(value))


def _binary(op: ast.operator, left: Number, right: Number) -> Number:
    if isinstance(op, ast.Pow):
        return _power(left, right)
    if isinstance(op, ast.Mult) and _bits(left) + _bits(right) > MAX_BITS:
        raise CalculatorError(f"result has more than {MAX_RESULT_DIGITS} digits")
    try:
        result = _BINARY[type(op)](left, right)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large") from None
    return _checked(result)


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(exponent, Fraction) and exponent.denominator == 1 and isinstance(base, Fraction):
        n = abs(exponent.numerator)
        if base == 0 and exponent < 0:
            raise CalculatorError("division by zero")
        if n * (_bits(base) - 1) > MAX_BITS:  # decided before computing: 9**9**9 is refused at once
            raise CalculatorError(f"result has more than {MAX_RESULT_DIGITS} digits")
        return _checked(base**exponent.numerator)
    try:
        result = float(base) ** float(exponent)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large") from None
    if isinstance(result, complex):
        raise CalculatorError("result is not a real number")
    return _checked(result)


def _bits(value: Number) -> int:
    if isinstance(value, float):
        return 64
    return max(value.numerator.bit_length(), value.denominator.bit_length())


def _checked(value: Number | int) -> Number:
    if isinstance(value, int):  # Fraction // Fraction is an int
        value = Fraction(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    if _bits(value) > MAX_BITS:
        raise CalculatorError(f"result has more than {MAX_RESULT_DIGITS} digits")
    return value


def format_number(value: Number) -> str:
    """Integers in full; other rationals and floats as Python prints a float (0.3, 1e-20)."""
    if isinstance(value, Fraction) and value.denominator == 1:
        return str(value.numerator)
    try:
        approximate = float(value)
    except OverflowError:
        return str(value)
    return repr(approximate) if approximate != 0 or value == 0 else str(value)


# ---- python -----------------------------------------------------------------------------------
class PythonTool(Tool):
    name = "python"
    description = (
        "Runs a Python program (standard library only; no network, no files outside its own "
        "directory; a few seconds at most) and returns what it prints, e.g. "
        "<python>print(sum(i * i for i in range(10)))</python>."
    )

    def __init__(self, limits: SandboxLimits = SandboxLimits()) -> None:
        self.limits = limits

    def __call__(self, arguments: str) -> ToolOutput:
        result = run_python(strip_code(arguments), self.limits)
        text = result.observation() or ("(no output)" if result.ok else f"[{result.detail}]")
        return ToolOutput(text, result.ok, result.status, result.seconds)


def strip_code(text: str) -> str:
    """The program inside a tool call: a Markdown code fence and common indentation removed."""
    text = textwrap.dedent(text).strip("\n")
    fence = re.fullmatch(r"\s*```[\w+-]*\n(.*?)\n?\s*```\s*", text, flags=re.DOTALL)
    return textwrap.dedent(fence.group(1)) if fence else text


# ---- registry and parsing ---------------------------------------------------------------------
TOOLS: dict[str, type[Tool]] = {"calculator": Calculator, "python": PythonTool}
STOP_STRINGS = tuple(f"</{name}>" for name in TOOLS)  # where a rollout stops generating a tool call


def make_tool(name: str, **kwargs: Any) -> Tool:
    """A tool by its registered name; ``kwargs`` go to its constructor (``limits`` for python)."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}: known tools are {', '.join(sorted(TOOLS))}")
    return TOOLS[name](**kwargs)


def parse_tool_call(text: str) -> tuple[str, str] | None:
    """(tool name, arguments) of the first ``<NAME>ARGUMENTS</NAME>`` in ``text`` for a registered
    NAME; an opening tag without its closing tag takes the rest of the text. None if there is none."""
    names = "|".join(re.escape(name) for name in TOOLS)
    opening = re.search(rf"<({names})>", text)
    if opening is None:
        return None
    name = opening.group(1)
    end = text.find(f"</{name}>", opening.end())
    return name, text[opening.end() : end if end >= 0 else len(text)]
