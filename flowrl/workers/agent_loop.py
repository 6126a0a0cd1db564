"""Multi-turn rollouts: the model and an environment take turns, many trajectories at once.

For every sample the loop makes a fresh environment (``flowrl.envs``), resets it with the
sample's dataset row, and asks the rollout engine for the model's first turn. A finished turn
goes to a thread pool for ``env.step`` at once, while the engine keeps generating the other
trajectories' turns (``RolloutEngine.run_turns``); when a step returns, its observation's tokens
are appended and the trajectory's next turn is queued. A trajectory ends when the environment
says ``done``, the model ends a turn with EOS (its final answer: the environment is stepped for
the reward, then the trajectory ends), or a limit is hit:

    max_turns        model turns per trajectory            finish_reason "max_turns"
    max tokens       model + observation tokens <= R       finish_reason "length"
    step_timeout_s   one env.step (tool calls included)    finish_reason "step_timeout"
    an env.step that raises                                finish_reason "env_error"

each of which sets ``TRUNCATED`` (an ``env_error`` also scores 0 and is counted).

Token-exact by construction: every turn continues the exact ids of the prompt, the sampled
tokens and the inserted observation tokens (the observation's text tokenized on its own, no
special tokens), and the batch holds those same ids; nothing is re-tokenized. ``RESPONSE_MASK``
is 1 on the model's tokens only, so losses never count observations, while attention covers
the whole trajectory (``flowrl.engines.sequences.model_inputs``). ``ROLLOUT_LOGPROBS`` are the
sampler's, on the model's tokens.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from flowrl.batch import Batch
from flowrl.engines.base import TurnOutput, TurnRequest, TurnSampling
from flowrl.envs import Environment, StepResult, make_env
from flowrl.keys import Keys

TURN_SEED_STRIDE = 1_000_003  # turn t of a sample seeded s samples with seed s + t * stride


@dataclass(frozen=True)
class TurnLimits:
    max_turns: int  # model turns per trajectory
    max_tokens: int  # model + observation tokens per trajectory (the response width R)
    step_timeout_s: float  # one env.step at most


@dataclass
class Trajectory:
    """One sample's turns so far."""

    key: int  # its row in the batch
    prompt_ids: list[int]
    env: Environment
    seed: int | None
    ids: list[int] = field(default_factory=list)  # sampled and observation tokens, in order
    sampled: list[bool] = field(default_factory=list)  # per token: the model's own
    logprobs: list[float] = field(default_factory=list)  # per token: the sampler's (0 on observations)
    rewards: list[tuple[int, float]] = field(default_factory=list)  # (a turn's last token, its reward)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    ended_by_eos: bool = False
    finish_reason: str = ""  # set when the trajectory is over
    error: str = ""  # what an env_error was

    def add(self, ids: list[int], sampled: bool, logprobs: list[float] | None = None) -> None:
        self.ids += ids
        self.sampled += [sampled] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


class AgentLoop:
    """Runs one batch of multi-turn trajectories on a rollout engine (module docstring)."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        env_name: str,
        env_kwargs: dict[str, Any],
        limits: TurnLimits,
        max_concurrent_steps: int = 16,
    ) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.env_name, self.env_kwargs = env_name, dict(env_kwargs)
        self.limits = limits
        self.pool = ThreadPoolExecutor(max_workers=max_concurrent_steps, thread_name_prefix="env-step")
        self.stop = tuple(make_env(env_name, env_kwargs).stop)  # the environment's turn-ending strings

    # ---- one batch -------------------------------------------------------------------
    def run(self, prompts: Batch, n: int, sampling: TurnSampling, seeds: list[int] | None) -> Batch:
        """``n`` trajectories per prompt (``aabb``): the prompt rows repeated plus the response fields."""
        rows = dataset_rows(prompts)
        prompt_ids = [row[m.bool()].tolist() for row, m in zip(prompts[Keys.PROMPT_IDS], prompts[Keys.PROMPT_MASK])]
        self.trajectories: list[Trajectory] = []
        self.queue: list[TurnRequest] = []
        self.steps: dict[Future[StepResult], tuple[Trajectory, float]] = {}
        for p, row in enumerate(rows):
            for i in range(n):
                seed = None if seeds is None else int(seeds[p]) + i
                traj = Trajectory(len(self.trajectories), prompt_ids[p], make_env(self.env_name, self.env_kwargs), seed)
                self.trajectories.append(traj)
                self._start(traj, row)
        try:
            self.engine.run_turns(self, TurnSampling(sampling.temperature, sampling.top_p, sampling.top_k, self.stop))
        finally:
            for traj in self.trajectories:
                traj.env.close()
        result = prompts.repeat(n, interleave=True)
        for key, value in trajectory_fields(self.trajectories, self.limits.max_tokens, pad_id(self.engine)).items():
            result[key] = value
        return result

    def _start(self, traj: Trajectory, row: dict[str, Any]) -> None:
        try:
            first = traj.env.reset(row)
        except Exception as e:  # a broken environment ends its trajectory, not the step
            self._end(traj, "env_error", f"{type(e).__name__}: {e}")
            return
        self._continue(traj, first)

    # ---- TurnScheduler ---------------------------------------------------------------
    def ready(self) -> list[TurnRequest]:
        self._collect()
        out, self.queue = self.queue, []
        return out

    def finished(self, outputs: list[TurnOutput]) -> None:
        for out in outputs:
            traj = self.trajectories[int(out.key)]
            traj.add(list(out.token_ids), True, list(out.logprobs))
            traj.turns += 1
            traj.ended_by_eos = out.finish_reason == "stop" and out.stop_reason is None
            if out.finish_reason == "length":  # the token budget (or the model length) ran out mid-turn
                self._end(traj, "length")
                continue
            deadline = time.monotonic() + self.limits.step_timeout_s
            self.steps[self.pool.submit(traj.env.step, out.text)] = (traj, deadline)

    def pending(self) -> bool:
        return bool(self.steps or self.queue)

    def wait(self) -> list[TurnRequest]:
        while self.steps and not self.queue:
            nearest = min(deadline for _, deadline in self.steps.values())
            wait(list(self.steps), timeout=max(0.0, nearest - time.monotonic()), return_when=FIRST_COMPLETED)
            self._collect()
        return self.ready()

    # ---- transitions -----------------------------------------------------------------
    def _collect(self) -> None:
        """Take the finished steps' results, and end the trajectories whose step is past its time."""
        for future in [f for f in self.steps if f.done()]:
            traj, _ = self.steps.pop(future)
            self._stepped(traj, future)
        now = time.monotonic()
        for future, (traj, deadline) in list(self.steps.items()):
            if now > deadline:  # the step's thread runs on; its result is ignored
                del self.steps[future]
                self._end(traj, "step_timeout")

    def _stepped(self, traj: Trajectory, future: Future[StepResult]) -> None:
        try:
            result = future.result()
        except Exception as e:
            self._end(traj, "env_error", f"{type(e).__name__}: {e}")
            return
        traj.rewards.append((len(traj.ids) - 1, float(result.reward)))
        traj.tool_calls += result.tool_calls
        traj.tool_errors += result.tool_errors
        if result.done or traj.ended_by_eos:
            self._end(traj, "stop")
        elif traj.turns >= self.limits.max_turns:
            self._end(traj, "max_turns")
        else:
            self._continue(traj, result.observation)

    def _continue(self, traj: Trajectory, observation: str | None) -> None:
        """Append the observation's tokens and queue the next model turn, if the budget allows one."""
        obs = self.tokenizer.encode(observation, add_special_tokens=False) if observation else []
        room = self.limits.max_tokens - len(traj.ids) - len(obs)
        if room < 1:
            self._end(traj, "length")
            return
        traj.add(list(obs), False)
        seed = None if traj.seed is None else traj.seed + traj.turns * TURN_SEED_STRIDE
        self.queue.append(TurnRequest(str(traj.key), traj.prompt_ids + traj.ids, room, seed))

    def _end(self, traj: Trajectory, reason: str, error: str | None = None) -> None:
        traj.finish_reason = reason
        if reason == "env_error":
            traj.rewards = []
            traj.error = error or ""


def dataset_rows(prompts: Batch) -> list[dict[str, Any]]:
    """Each prompt's dataset row as an environment's ``reset`` sees it."""
    n = len(prompts)

    def column(key: str, default: Any) -> list[Any]:
        return list(prompts[key]) if key in prompts else [default] * n

    return [
        {"prompt": m, "data_source": s, "reward_model": {"ground_truth": g}, "extra_info": e}
        for m, s, g, e in zip(
            column(Keys.MESSAGES, []), column(Keys.DATA_SOURCE, ""), column(Keys.GROUND_TRUTH, None),
            column(Keys.EXTRA_INFO, {}),
        )
    ]


def pad_id(engine: Any) -> int:
    pad = getattr(engine, "pad_token_id", None)
    return int(pad if pad is not None else engine.tokenizer.eos_token_id)


def trajectory_fields(trajectories: list[Trajectory], width: int, pad: int) -> dict[str, Any]:
    """The batch fields of finished trajectories, right-padded to ``width`` columns."""
    rows = len(trajectories)
    ids = torch.full((rows, width), pad, dtype=torch.long)  # [B*n, R]
    mask = torch.zeros(rows, width, dtype=torch.float32)  # [B*n, R] the model's tokens
    observed = torch.zeros(rows, width, dtype=torch.float32)  # [B*n, R] inserted observation tokens
    logprobs = torch.zeros(rows, width, dtype=torch.float32)  # [B*n, R]
    token_scores = torch.zeros(rows, width, dtype=torch.float32)  # [B*n, R] each turn's reward on its last token
    for t in trajectories:
        k = len(t.ids)
        ids[t.key, :k] = torch.tensor(t.ids, dtype=torch.long)
        sampled = torch.tensor(t.sampled, dtype=torch.bool)
        mask[t.key, :k] = sampled.float()
        observed[t.key, :k] = (~sampled).float()
        logprobs[t.key, :k] = torch.tensor(t.logprobs, dtype=torch.float32)
        for pos, reward in t.rewards:
            token_scores[t.key, pos] += reward
    reasons = [t.finish_reason for t in trajectories]
    return {
        Keys.RESPONSE_IDS: ids,
        Keys.RESPONSE_MASK: mask,
        Keys.OBSERVATION_MASK: observed,
        Keys.ROLLOUT_LOGPROBS: logprobs,
        Keys.TRUNCATED: torch.tensor([r != "stop" for r in reasons], dtype=torch.bool),
        Keys.FINISH_REASON: reasons,
        Keys.SCORES: token_scores.sum(dim=1),  # [B*n]
        Keys.TOKEN_SCORES: token_scores,
        Keys.NUM_TURNS: torch.tensor([t.turns for t in trajectories], dtype=torch.int64),
        Keys.TOOL_CALLS: torch.tensor([t.tool_calls for t in trajectories], dtype=torch.int64),
        Keys.TOOL_ERRORS: torch.tensor([t.tool_errors for t in trajectories], dtype=torch.int64),
        Keys.ENV_ERRORS: [t.error for t in trajectories],
    }


def agent_metrics(batch: Batch) -> dict[str, float]:
    """A multi-turn rollout's ``reward/...`` and ``agent/...`` metrics (means over trajectories)."""
    scores, errors = batch[Keys.SCORES], list(batch[Keys.ENV_ERRORS])
    reasons = list(batch[Keys.FINISH_REASON])
    metrics = {
        "reward/score_mean": float(scores.mean()),
        "reward/errors": float(sum(bool(e) for e in errors)),
        "agent/turns_mean": float(batch[Keys.NUM_TURNS].float().mean()),
        "agent/turns_max": float(batch[Keys.NUM_TURNS].max()),
        "agent/tool_calls_mean": float(batch[Keys.TOOL_CALLS].float().mean()),
        "agent/tool_errors_mean": float(batch[Keys.TOOL_ERRORS].float().mean()),
        "agent/observation_tokens_mean": float(batch[Keys.OBSERVATION_MASK].sum(-1).mean()),
    }
    for reason in ("length", "max_turns", "step_timeout", "env_error"):
        metrics[f"agent/truncated_{reason}_frac"] = sum(r == reason for r in reasons) / max(len(reasons), 1)
    return metrics
