"""`--help` works for `flowrl` and every subcommand, and says what each one does."""

from __future__ import annotations

import argparse

import pytest

from flowrl.cli import build_parser, main


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_is_listed_with_a_summary(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "sft", "rm", "export", "eval", "plot", "plan"):
        assert name in _subcommands()
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert len(line.split(maxsplit=1)[1]) > 10, f"{name} has no summary in flowrl --help"


@pytest.mark.parametrize("name", ["train", "sft", "rm", "export", "eval", "plot", "plan"])
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: flowrl {name}")
