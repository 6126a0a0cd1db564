"""Environments for the multi-turn tests, importable by dotted path from worker processes."""

from __future__ import annotations

import time

from flowrl.envs import Environment, StepResult


class Chatter(Environment):
    """Three model turns, each answered with a numbered observation; a reward on every turn.

    Its stop strings are common single bytes, so a random tiny model ends its turns early."""

    stop = tuple("aeiouAEIOU0123456789")

    def reset(self, row):
        self.turn = 0
        return "<start>"

    def step(self, action):
        self.turn += 1
        if self.turn >= 3:
            return StepResult(reward=1.0, done=True)
        return StepResult(observation=f"[obs {self.turn}]", reward=0.25, tool_calls=1)


class Sleepy(Environment):
    """The second turn's step sleeps past any small step_timeout_s."""

    stop = tuple("aeiouAEIOU0123456789")

    def reset(self, row):
        self.turn = 0

    def step(self, action):
        self.turn += 1
        if self.turn == 2:
            time.sleep(3.0)
        return StepResult(observation="ok")


class Broken(Environment):
    """Raises on the first step."""

    stop = tuple("aeiouAEIOU0123456789")

    def step(self, action):
        raise RuntimeError("the environment broke")
