"""``tools``: the built-in environment of tool-using tasks.

The model may call a tool by writing ``<NAME>ARGUMENTS</NAME>`` (``<calculator>12*34</calculator>``,
``<python>print(2**100)</python>``; ``flowrl.envs.tools``). The sampler stops the turn at the
closing tag; the tool's output comes back as the observation ``<result>OUTPUT</result>`` and the
model goes on. A turn without a tool call is the final answer: it is scored by the rule reward of
the row's ``data_source`` (the function ``flowrl.rewards`` would use, or ``reward``), called with
that last turn's text as the response, and the trajectory ends. A failing, timed-out or refused
tool call is an observation too (the model reads why), counted in ``tool_errors``; so is a call
past ``max_tool_calls``.
"""

from __future__ import annotations

from typing import Any

from flowrl.envs.base import Environment, StepResult, register_env
from flowrl.envs.sandbox import SandboxLimits
from flowrl.envs.tools import TOOLS, Tool, make_tool, parse_tool_call
from flowrl.rewards.registry import RewardConfig, RewardResolver


@register_env("tools")
class ToolEnv(Environment):
    """Tools on call, the final answer scored by a rule reward (module docstring)."""

    def __init__(
        self,
        tools: list[str] | tuple[str, ...] = ("calculator",),
        max_tool_calls: int = 4,
        result_format: str = "<result>{}</result>",
        reward: str | None = None,
        reward_kwargs: dict[str, Any] | None = None,
        sandbox: dict[str, Any] | None = None,
    ) -> None:
        unknown = [t for t in tools if t not in TOOLS]
        if unknown or not tools:
            raise ValueError(f"tools={list(tools)}: choose one or more of {sorted(TOOLS)}")
        if max_tool_calls < 0:
            raise ValueError(f"max_tool_calls={max_tool_calls} must be >= 0")
        if "{}" not in result_format:
            raise ValueError(f"result_format={result_format!r} must contain '{{}}' where the tool output goes")
        limits = SandboxLimits(**(sandbox or {}))
        self.tools: dict[str, Tool] = {
            t: make_tool(t, limits=limits) if t == "python" else make_tool(t) for t in tools
        }
        self.stop = tuple(f"</{t}>" for t in tools)
        self.max_tool_calls = max_tool_calls
        self.result_format = result_format
        self.resolver = RewardResolver(RewardConfig(function=reward))
        self.reward_kwargs = dict(reward_kwargs or {})
        self.calls = 0

    def reset(self, row: dict[str, Any]) -> str | None:
        self.row = row
        self.calls = 0
        return None

    def step(self, action: str) -> StepResult:
        call = parse_tool_call(action)
        if call is None or call[0] not in self.tools:
            return StepResult(reward=self._score(action), done=True)
        name, arguments = call
        self.calls += 1
        if self.calls > self.max_tool_calls:
            text = f"[tool call limit reached: {self.max_tool_calls} per answer]"
            return StepResult(observation=self.result_format.format(text), tool_calls=1, tool_errors=1)
        output = self.tools[name](arguments)
        return StepResult(
            observation=self.result_format.format(output.text),
            tool_calls=1,
            tool_errors=int(not output.ok),
            info={"tool": name, "status": output.status, "seconds": output.seconds},
        )

    def _score(self, answer: str) -> float:
        """The row's rule reward of the final answer (a dict result's ``score``)."""
        row = self.row
        source = str(row.get("data_source", ""))
        fn = self.resolver(source)
        messages = row.get("prompt") or []
        prompt = str(messages[-1]["content"]) if messages and isinstance(messages, list) else str(messages)
        reward_model = row.get("reward_model") or {}
        result = fn(prompt, answer, reward_model.get("ground_truth"), dict(row.get("extra_info") or {}),
                    **self.reward_kwargs)
        return float(result["score"] if isinstance(result, dict) else result)
