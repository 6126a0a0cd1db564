"""scripts/check_rules.py: each check reports a planted violation, and this repository passes."""

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_rules", REPO / "scripts" / "check_rules.py")
rules = importlib.util.module_from_spec(_spec)
sys.modules["check_rules"] = rules  # dataclasses look their module up by name
_spec.loader.exec_module(rules)

KEYS = '''
class Keys:
    RESPONSE_IDS = "response_ids"  # [B, R]
    SCORES = "scores"  # [B]
'''


def make_tree(root: Path, files: dict[str, str]) -> Path:
    """A fake repository: flowrl/ with keys.py and __init__.py, plus ``files`` (path: source)."""
    files = {"flowrl/__init__.py": "", "flowrl/keys.py": KEYS, **files}
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def messages(violations) -> str:
    return "\n".join(str(v) for v in violations)


def test_clean_tree_passes(tmp_path):
    root = make_tree(tmp_path, {
        "flowrl/batch.py": "from flowrl.keys import Keys\nb = {Keys.SCORES: 1}\n",
        "flowrl/algos/__init__.py": "from .losses import loss\n",
        "flowrl/algos/losses.py": """\
            from ..batch import b
            from ..keys import Keys

            def loss():
                return b[Keys.SCORES]
            """,
        "flowrl/drivers/grpo.py": "from flowrl.algos import loss\nfrom flowrl.keys import Keys\n",
    })
    assert rules.check_imports(root) == []
    assert rules.check_sizes(root) == []
    assert rules.check_raw_keys(root, {}) == []  # batch.py may spell keys out


@pytest.mark.parametrize("statement", [
    "from flowrl.drivers import grpo",
    "import flowrl.drivers.grpo",
    "from ..drivers import grpo",
    "def f():\n    from flowrl.drivers.grpo import main",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from flowrl.drivers.grpo import main",
])
def test_import_pointing_up_is_reported(tmp_path, statement):
    root = make_tree(tmp_path, {
        "flowrl/drivers/__init__.py": "",
        "flowrl/drivers/grpo.py": "def main(): ...\n",
        "flowrl/algos/__init__.py": "",
        "flowrl/algos/losses.py": statement + "\n",
    })
    (v,) = rules.check_imports(root)
    assert v.path == "flowrl/algos/losses.py" and v.line == statement.count("\n") + 1
    assert "(layer 1 components) imports flowrl.drivers.grpo (layer 4 drivers)" in v.message


def test_cycle_between_units_is_reported_with_its_path(tmp_path):
    root = make_tree(tmp_path, {
        "flowrl/algos/__init__.py": "",
        "flowrl/algos/a.py": "from flowrl.engines.b import x\n",
        "flowrl/algos/inner.py": "from flowrl.algos import a\n",  # inside one unit: allowed
        "flowrl/engines/__init__.py": "",
        "flowrl/engines/b.py": "x = 1\n\ndef f():\n    from flowrl.algos.a import y\n",
    })
    (v,) = rules.check_imports(root)
    assert "import cycle flowrl.algos -> flowrl.engines -> flowrl.algos" in v.message
    assert "flowrl/algos/a.py:1" in v.message and "flowrl/engines/b.py:4" in v.message


def test_unclassified_module_is_reported(tmp_path):
    root = make_tree(tmp_path, {"flowrl/utils.py": "", "flowrl/batch.py": "import flowrl.utils\n"})
    found = messages(rules.check_imports(root))
    assert "flowrl/utils.py:1: flowrl.utils is in no layer; classify it in scripts/check_rules.py" in found
    assert "flowrl/batch.py:1: imports flowrl.utils" in found


def test_sizes_are_reported(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(80))  # def line + 80 = 81 lines
    root = make_tree(tmp_path, {
        "flowrl/algos/big.py": "@decorator\ndef long():\n" + body + "\n" * 720,
        "flowrl/drivers/grpo.py": "\n" * 151,
        "flowrl/drivers/steps.py": "\n" * 151,  # not a driver: only the file limit applies
    })
    found = messages(rules.check_sizes(root))
    assert "flowrl/algos/big.py:2: function long() has 81 lines (max 80)" in found
    assert "flowrl/algos/big.py:1: file has 802 lines (max 800)" in found
    assert "flowrl/drivers/grpo.py:1: driver has 151 lines (max 150)" in found
    assert "flowrl/drivers/steps.py:" not in found


def test_raw_keys_are_reported_only_as_mapping_keys(tmp_path):
    root = make_tree(tmp_path, {
        "flowrl/algos/x.py": """\
            def f(batch, log):
                a = batch["response_ids"]
                b = "scores" in batch
                c = {"scores": a}
                d = batch.get("scores")
                log("scores", a)  # a name that equals a key, but not a key here
                e = {"reward/mean": a}["reward/mean"]
                g: Literal["scores"] = "scores"  # a type, not a key
                '''docstring mentioning "scores"'''
            """,
    })
    found = rules.check_raw_keys(root, {})
    assert [(v.line, v.message.split(";")[0]) for v in found] == [
        (2, 'raw batch key "response_ids" as a subscript'),
        (3, "raw batch key \"scores\" as an 'in' test"),
        (4, 'raw batch key "scores" as a dict key'),
        (5, 'raw batch key "scores" as a .get() key'),
    ]
    assert "use Keys.RESPONSE_IDS" in found[0].message
    allowed = {("flowrl/algos/x.py", "f"): "not a Batch", ("flowrl/algos/x.py", "gone"): "stale"}
    (stale,) = rules.check_raw_keys(root, allowed)
    assert "(flowrl/algos/x.py, gone) matches no key literal; remove it" in stale.message


def test_this_repository_passes_the_fast_checks():
    for check in (rules.check_imports, rules.check_sizes, rules.check_raw_keys):
        assert check(REPO) == [], messages(check(REPO))
