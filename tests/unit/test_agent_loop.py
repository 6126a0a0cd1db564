"""The multi-turn loop's bookkeeping and limits, on a fake engine (the real one: tests/integration/
test_agent_loop_vllm.py). Every fake turn is the tokens 10, 11, 12 ending at a stop string unless
the engine is told otherwise; observations are tokenized by a byte tokenizer."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from flowrl.batch import Batch
from flowrl.engines.base import TurnOutput, TurnSampling
from flowrl.envs import Environment, StepResult
from flowrl.keys import Keys
from flowrl.workers.agent_loop import AgentLoop, TurnLimits


class Bytes:
    eos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


class FakeEngine:
    """Runs a scheduler like VLLMRollout.run_turns: one engine step finishes every submitted turn."""

    pad_token_id = 0
    tokenizer = Bytes()

    def __init__(self, turn=(10, 11, 12), eos_after: int | None = None, texts=None):
        self.turn, self.eos_after, self.texts = list(turn), eos_after, texts
        self.requests = []

    def run_turns(self, scheduler, sampling):
        active = scheduler.ready()
        while True:
            if active:
                self.requests += active
                outs = [self._output(r) for r in active]
                scheduler.finished(outs)
                active = scheduler.ready()
            elif scheduler.pending():
                active = scheduler.wait()
            else:
                return

    def _output(self, r):
        n_turn = sum(1 for q in self.requests if q.key == r.key)
        if self.texts is not None:  # turn i of every trajectory writes texts[i]
            text = self.texts[min(n_turn, len(self.texts)) - 1]
            return TurnOutput(r.key, list(text.encode()), [-0.5] * len(text.encode()), text, "stop", "x")
        turn = self.turn[: r.max_tokens]
        eos = self.eos_after is not None and n_turn >= self.eos_after
        reason = "length" if len(turn) < len(self.turn) else "stop"
        return TurnOutput(r.key, turn, [-0.5] * len(turn), "abc", reason, None if eos else "c")


def prompts(rows=2):
    return Batch({Keys.PROMPT_IDS: torch.full((rows, 3), 7), Keys.PROMPT_MASK: torch.ones(rows, 3, dtype=torch.long)})


def run(env, engine=None, limits=TurnLimits(4, 64, 5.0), rows=2, n=1, seeds=None, workers=16):
    loop = AgentLoop(engine or FakeEngine(), Bytes(), f"{__name__}:{env}", {}, limits, workers)
    return loop.run(prompts(rows), n, TurnSampling(), seeds)


class Forever(Environment):
    def step(self, action):
        return StepResult(observation="ob", reward=0.5)


class Done2(Environment):
    def reset(self, row):
        self.k = 0
        return "hi"

    def step(self, action):
        self.k += 1
        return StepResult(observation="xy", reward=1.0, done=self.k == 2, tool_calls=1, tool_errors=self.k == 1)


class Long(Environment):
    def step(self, action):
        return StepResult(observation="z" * 100)


class Slow(Environment):
    def step(self, action):
        time.sleep(2.0)
        return StepResult(observation="late")


class Raises(Environment):
    def step(self, action):
        raise RuntimeError("the environment broke")


class Overlap(Environment):
    running = 0
    most = 0
    lock = threading.Lock()

    def step(self, action):
        with Overlap.lock:
            Overlap.running += 1
            Overlap.most = max(Overlap.most, Overlap.running)
        time.sleep(0.2)
        with Overlap.lock:
            Overlap.running -= 1
        return StepResult(reward=1.0, done=True)


def test_trajectory_layout_masks_and_rewards():
    out = run("Done2")
    # "hi", turn, "xy", turn: observations masked out of the loss, turns in
    want_ids = list(b"hi") + [10, 11, 12] + list(b"xy") + [10, 11, 12]
    want_mask = [0, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    for row in range(2):
        assert out[Keys.RESPONSE_IDS][row, :10].tolist() == want_ids
        assert out[Keys.RESPONSE_MASK][row, :10].tolist() == want_mask
        assert out[Keys.OBSERVATION_MASK][row, :10].tolist() == [1 - m for m in want_mask]
        assert out[Keys.ROLLOUT_LOGPROBS][row, :10].tolist() == [-0.5 * m for m in want_mask]
        assert not out[Keys.RESPONSE_MASK][row, 10:].any() and (out[Keys.RESPONSE_IDS][row, 10:] == 0).all()
        # each turn's reward on its last token: columns 4 and 9
        assert out[Keys.TOKEN_SCORES][row].nonzero().flatten().tolist() == [4, 9]
    assert out[Keys.SCORES].tolist() == [2.0, 2.0]
    assert out[Keys.NUM_TURNS].tolist() == [2, 2] and out[Keys.TOOL_CALLS].tolist() == [2, 2]
    assert out[Keys.TOOL_ERRORS].tolist() == [1, 1]
    assert list(out[Keys.FINISH_REASON]) == ["stop", "stop"] and not out[Keys.TRUNCATED].any()


def test_max_turns_truncates():
    out = run("Forever", limits=TurnLimits(3, 64, 5.0))
    assert out[Keys.NUM_TURNS].tolist() == [3, 3]
    assert list(out[Keys.FINISH_REASON]) == ["max_turns"] * 2 and out[Keys.TRUNCATED].all()
    assert out[Keys.SCORES].tolist() == [1.5, 1.5]  # the rewards it earned still count
    assert out[Keys.RESPONSE_MASK][0].sum() == 9  # no observation after the last turn


def test_token_budget_truncates_at_an_observation_and_mid_turn():
    out = run("Long", limits=TurnLimits(4, 64, 5.0))  # a 100-token observation never fits
    assert list(out[Keys.FINISH_REASON]) == ["length"] * 2 and out[Keys.TRUNCATED].all()
    assert out[Keys.RESPONSE_MASK][0].sum() == 3 and not out[Keys.OBSERVATION_MASK].any()
    out = run("Forever", limits=TurnLimits(10, 11, 5.0))  # turn, ob, turn, ob, then 1 token left
    assert out[Keys.RESPONSE_IDS][0, :11].tolist() == [10, 11, 12, 111, 98, 10, 11, 12, 111, 98, 10]
    assert list(out[Keys.FINISH_REASON]) == ["length"] * 2


def test_eos_ends_the_trajectory_after_its_step():
    out = run("Forever", engine=FakeEngine(eos_after=2))
    assert out[Keys.NUM_TURNS].tolist() == [2, 2] and list(out[Keys.FINISH_REASON]) == ["stop", "stop"]
    assert out[Keys.SCORES].tolist() == [1.0, 1.0]  # the EOS turn's step scored it


def test_a_step_past_its_timeout_truncates_without_waiting_for_it():
    start = time.monotonic()
    out = run("Slow", limits=TurnLimits(4, 64, 0.3))
    assert time.monotonic() - start < 1.5
    assert list(out[Keys.FINISH_REASON]) == ["step_timeout"] * 2 and out[Keys.TRUNCATED].all()


def test_an_environment_that_raises_scores_zero_and_is_reported():
    out = run("Raises")
    assert list(out[Keys.FINISH_REASON]) == ["env_error"] * 2 and out[Keys.SCORES].tolist() == [0.0, 0.0]
    assert all("the environment broke" in e for e in out[Keys.ENV_ERRORS])


def test_steps_of_many_trajectories_run_at_once():
    Overlap.most = 0
    start = time.monotonic()
    out = run("Overlap", rows=8, n=2, workers=16)
    assert out[Keys.SCORES].tolist() == [1.0] * 16
    assert Overlap.most >= 8 and time.monotonic() - start < 16 * 0.2 / 2


def test_seeds_per_sample_and_turn():
    engine = FakeEngine()
    run("Forever", engine=engine, limits=TurnLimits(2, 64, 5.0), rows=2, n=2, seeds=[100, 200])
    seeds = sorted((int(r.key), r.seed) for r in engine.requests)
    stride = 1_000_003
    assert seeds == [(0, 100), (0, 100 + stride), (1, 101), (1, 101 + stride),
                     (2, 200), (2, 200 + stride), (3, 201), (3, 201 + stride)]


def test_unknown_environment_is_one_line():
    with pytest.raises(ValueError, match="rollout.multi_turn.env='nope' is not registered"):
        AgentLoop(FakeEngine(), Bytes(), "nope", {}, TurnLimits(2, 8, 1.0))


HOSTILE = {
    "network": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
    "file": "print(open('/etc/passwd').read())",
    "fork": "import os\nwhile True:\n    os.fork()",
    "memory": "b = bytearray(2 * 1024**3)",
    "forever": "while True:\n    pass",
    "write": "open('left_behind.txt', 'w').write('x')\nimport os\nprint(os.getcwd())",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tool_code_becomes_an_observation_and_the_rollout_goes_on(case):
    """The real tools environment and sandbox under the loop: the code is stopped within its limits,
    the model reads why, and the trajectory continues to its final answer."""
    engine = FakeEngine(texts=[f"<python>{HOSTILE[case]}</python>", "42"])
    sandbox = {"wall_s": 3.0, "cpu_s": 1.0, "memory_mb": 256}
    loop = AgentLoop(engine, Bytes(), "tools", {"tools": ["python"], "sandbox": sandbox}, TurnLimits(3, 4096, 20.0))
    start = time.monotonic()
    batch = prompts(1)
    batch[Keys.DATA_SOURCE], batch[Keys.GROUND_TRUTH] = ["flowrl/tool_arithmetic"], ["42"]
    out = loop.run(batch, 1, TurnSampling(), None)
    assert time.monotonic() - start < 10
    assert list(out[Keys.FINISH_REASON]) == ["stop"], list(out[Keys.ENV_ERRORS])
    assert out[Keys.NUM_TURNS].tolist() == [2] and out[Keys.SCORES].tolist() == [1.0]
    observed = bytes(out[Keys.RESPONSE_IDS][0][out[Keys.OBSERVATION_MASK][0].bool()].tolist()).decode()
    assert observed.startswith("<result>") and observed.endswith("</result>")
    if case == "write":  # it ran; its scratch directory is gone after the call
        scratch = observed.removeprefix("<result>").removesuffix("</result>").strip()
        assert out[Keys.TOOL_ERRORS].tolist() == [0] and not os.path.exists(scratch)
    else:
        assert out[Keys.TOOL_ERRORS].tolist() == [1], observed
