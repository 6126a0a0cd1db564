"""Seconds per stage of a step: FLOPs and bytes from the shape, turned into time by coefficients.

FLOPs (matrix products only; Kaplan et al. 2020, arXiv:2001.08361, Sec. 2.1): a forward costs
2 x (the weights a token multiplies through) per token, plus attention's 4 x q-width x context
per token and layer; a training micro-batch costs 3 forwards (4 with gradient checkpointing).
Decoding one token per sequence reads every rollout weight once per step (bytes).

Each stage's seconds = the micro-steps it runs x (a fixed cost per micro-step + its FLOPs x
seconds per FLOP), plus the collectives FSDP runs with W > 1 and a fixed per-stage overhead
(the worker-group call, scheduling). ``Coefficients`` holds the machine's numbers: the micro-
profile measures the compute ones (``flowrl/planner/calibrate.py``); the runtime's overheads
start from ``DEFAULT_OVERHEADS`` and are fitted from a measured run (``flowrl plan --fit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flowrl.planner.layout import Layout
from flowrl.planner.memory import DTYPE_BYTES, Device, Roles, Workload, kv_cache_tokens
from flowrl.planner.shape import ModelShape

FORWARD_FLOPS_PER_PARAM = 2  # per token: one multiply and one add per weight
TRAIN_FLOPS_PER_PARAM = 6  # forward + backward (gradients of activations and of weights: 2 x forward)
STAGES = ("generate", "reward", "old_logprobs", "ref", "values", "critic_update", "update", "weight_sync")
MAX_NUM_SEQS = 256  # vLLM's concurrent sequences per engine (VLLMRolloutConfig.max_num_seqs)
# Until a run is fitted: seconds per call of each stage's worker-group method (Ray dispatch,
# batch transfer, scheduling); the reward stage per call and per response (rule functions).
DEFAULT_OVERHEADS = dict(zip(STAGES, (0.02, 0.002, 0.02, 0.02, 0.02, 0.03, 0.03, 0.02)))


@dataclass
class Coefficients:
    """Seconds per unit of work on one machine for one model shape (one worker's threads)."""

    fwd_call_s: float  # a no-grad forward micro-batch's fixed cost
    fwd_s_per_flop: float
    train_call_s: float  # a forward + backward micro-batch's fixed cost
    train_s_per_flop: float
    optim_s_per_param: float  # AdamW step, per parameter on the rank
    decode_step_s: float  # one decoding step's fixed cost
    decode_s_per_seq: float  # one decoding step, per sequence in the batch
    decode_s_per_byte: float  # weights and KV cache read per decoding step
    copy_s_per_byte: float  # weight sync: gather/cast/load per byte
    collective_s: float = 2e-4  # one all-gather / reduce-scatter's latency (W > 1)
    collective_s_per_byte: float = 5e-10
    reward_s_per_response: float = 1e-4
    threads: int = 1  # torch threads per worker the compute numbers were measured with
    thread_speedup: dict[str, float] = field(default_factory=dict)  # str(threads) -> compute speed-up
    overheads: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_OVERHEADS))
    # fitted per process layout (``process_class``): the runtime's cost differs with the number
    # of processes and threads far more than the profile's compute does
    class_overheads: dict[str, dict[str, float]] = field(default_factory=dict)
    # fitted seconds per micro-batch beyond the profile's (the engine's packing, loss and hooks,
    # FSDP's collectives), per stage; per process class where runs of that class had different
    # micro-batch counts (``stage_micro_batches``)
    per_micro: dict[str, float] = field(default_factory=dict)
    class_per_micro: dict[str, dict[str, float]] = field(default_factory=dict)
    fitted_from: list[str] = field(default_factory=list)  # run directories the overheads came from

    def overheads_for(self, layout: Layout) -> dict[str, float]:
        """The overheads fitted on runs of the layout's process class, else the mean over all runs."""
        return self.overheads | self.class_overheads.get(process_class(layout), {})

    def per_micro_for(self, layout: Layout) -> dict[str, float]:
        return self.per_micro | self.class_per_micro.get(process_class(layout), {})

    def speedup(self, threads: int) -> float:
        """Compute speed with ``threads`` threads relative to the profile's (measured points, else 1)."""
        known = {int(k): v for k, v in self.thread_speedup.items()}
        best = max((t for t in known if t <= threads), default=None)
        return known[best] if best is not None else 1.0


def process_class(layout: Layout) -> str:
    """The processes of a layout: trainer ranks, rollout workers, tensor parallelism (``W2-R0-T1``)."""
    return f"W{layout.num_workers}-R{layout.rollout_workers}-T{layout.tensor_parallel_size}"


def forward_flops(shape: ModelShape, tokens: float, context: float, head_tokens: float) -> float:
    """A forward over ``tokens`` tokens attending to ``context`` tokens on average; the LM head
    runs on ``head_tokens`` of them (the responses)."""
    body = shape.layers * shape.layer_params
    attention = 4 * shape.layers * shape.q_width * context
    f = FORWARD_FLOPS_PER_PARAM
    return f * body * tokens + attention * tokens + f * shape.vocab * shape.hidden * head_tokens


@dataclass(frozen=True)
class Setting:
    """Everything a prediction reads besides the layout."""

    shape: ModelShape
    workload: Workload
    roles: Roles
    device: Device
    stages: tuple[str, ...]  # the stages this run's steps have (``step_stages``)


def micro_batches(rows: float, seq: float, layout: Layout) -> int:
    """Micro-batches one rank runs over ``rows`` sequences of ``seq`` tokens."""
    if layout.max_tokens_per_micro_batch > 0:
        per = max(1, layout.max_tokens_per_micro_batch // max(int(seq), 1))
        return max(1, math.ceil(rows / per))
    return max(1, math.ceil(rows / layout.micro_batch_size))


def threads_per_worker(device: Device, layout: Layout) -> int:
    if device.use_gpu:
        return 1
    return max(1, device.count // (layout.num_workers + layout.rollout_workers))


def pass_seconds(s: Setting, layout: Layout, c: Coefficients, train: bool, shape: ModelShape | None = None) -> float:
    """One rank's forward (or forward + backward) pass over its share of the rollout batch."""
    shape = shape or s.shape
    w, W = s.workload, layout.num_workers
    rows = w.responses / W
    seq = w.prompt_tokens + w.response_tokens
    k = micro_batches(rows, seq, layout)
    flops = forward_flops(shape, rows * seq, seq / 2, rows * w.response_tokens)
    speed = c.speedup(threads_per_worker(s.device, layout))
    if train:
        passes = TRAIN_FLOPS_PER_PARAM // FORWARD_FLOPS_PER_PARAM  # 3 forwards' worth
        flops *= passes + 1 if layout.gradient_checkpointing else passes  # checkpointing: the forward again
        seconds = k * c.train_call_s + flops * c.train_s_per_flop / speed
    else:
        seconds = k * c.fwd_call_s + flops * c.fwd_s_per_flop / speed
    if W > 1:  # per micro-batch each layer and the root is all-gathered (again in backward, plus a reduce-scatter)
        units = shape.layers + 1
        gather_bytes = DTYPE_BYTES[s.roles.param_dtype] * shape.params * (W - 1) / W
        per_micro = units * c.collective_s + gather_bytes * c.collective_s_per_byte
        seconds += k * per_micro * (3 if train else 1)
    return seconds


def update_seconds(s: Setting, layout: Layout, c: Coefficients, shape: ModelShape | None = None) -> float:
    shape = shape or s.shape
    w = s.workload
    optimizer_steps = w.epochs * max(1, w.responses // w.mini_batch_size)
    speed = c.speedup(threads_per_worker(s.device, layout))
    optim = 0.0 if s.roles.lora else optimizer_steps * c.optim_s_per_param * shape.params / layout.num_workers / speed
    return w.epochs * pass_seconds(s, layout, c, train=True, shape=shape) + optim


def generate_seconds(s: Setting, layout: Layout, c: Coefficients) -> float:
    """Prefill plus decoding on one replica (every replica runs its share at once)."""
    shape, w = s.shape, s.workload
    replicas = layout.rollout_workers if layout.split else layout.num_workers // layout.tensor_parallel_size
    seqs = w.responses / replicas
    tp = layout.tensor_parallel_size
    speed = c.speedup(threads_per_worker(s.device, layout)) * tp
    prefill = c.fwd_call_s + forward_flops(shape, seqs * w.prompt_tokens, w.prompt_tokens / 2, seqs) * c.fwd_s_per_flop / speed
    concurrency = min(MAX_NUM_SEQS, max(1, kv_cache_tokens(shape, layout, s.roles, s.device) // max(w.max_seq_tokens, 1)))
    waves = math.ceil(seqs / concurrency)
    batch = seqs / waves
    rb = DTYPE_BYTES[s.roles.rollout_dtype]
    context = w.prompt_tokens + w.response_tokens / 2
    step_bytes = rb * shape.params / tp + batch * context * 2 * shape.layers * shape.kv_width * rb / tp
    step_flops = forward_flops(shape, batch, context, batch)
    step = c.decode_step_s + batch * c.decode_s_per_seq + step_bytes * c.decode_s_per_byte + step_flops * c.fwd_s_per_flop / speed
    seconds = prefill + waves * w.response_tokens * step
    if layout.offload:  # parameters and optimizer state to host memory and back
        seconds += 2 * 12 * shape.params / layout.num_workers * c.copy_s_per_byte
    return seconds


def sync_seconds(s: Setting, layout: Layout, c: Coefficients) -> float:
    """Every parameter gathered, cast and loaded into vLLM (colocated), or sent to the rollout workers."""
    shape = s.shape
    seconds = DTYPE_BYTES[s.roles.rollout_dtype] * shape.params * c.copy_s_per_byte
    if layout.num_workers > 1 or layout.split:
        seconds += (shape.layers * 12 + 3) * c.collective_s + 4 * shape.params * c.collective_s_per_byte
    return seconds


def stage_micro_batches(s: Setting, layout: Layout) -> dict[str, int]:
    """Micro-batches one rank runs in each stage of a step (1 for stages that do not micro-batch)."""
    w = s.workload
    k = micro_batches(w.responses / layout.num_workers, w.prompt_tokens + w.response_tokens, layout)
    per_stage = {"old_logprobs": k, "ref": k, "values": k, "update": k * w.epochs, "critic_update": k * w.epochs}
    return {stage: per_stage.get(stage, 1) for stage in s.stages}


def predict(s: Setting, layout: Layout, c: Coefficients) -> dict[str, float]:
    """Predicted seconds of each stage of one step, and ``step`` (their sum; with asynchronous
    split placement, generation overlaps training: the longer of the two)."""
    o, per_micro = c.overheads_for(layout), c.per_micro_for(layout)
    micros = stage_micro_batches(s, layout)
    out: dict[str, float] = {}
    compute = {
        "generate": lambda: generate_seconds(s, layout, c),
        "reward": lambda: c.reward_s_per_response * s.workload.responses,
        "old_logprobs": lambda: pass_seconds(s, layout, c, train=False),
        "ref": lambda: pass_seconds(s, layout, c, train=False),
        "values": lambda: pass_seconds(s, layout, c, train=False, shape=s.roles.critic or s.shape),
        "critic_update": lambda: update_seconds(s, layout, c, shape=s.roles.critic or s.shape),
        "update": lambda: update_seconds(s, layout, c),
        "weight_sync": lambda: sync_seconds(s, layout, c),
    }
    for stage in s.stages:
        fitted = o.get(stage, DEFAULT_OVERHEADS[stage]) + per_micro.get(stage, 0.0) * micros[stage]
        out[stage] = compute[stage]() + fitted
    rest = sum(v for k, v in out.items() if k != "generate")
    if layout.split and layout.max_staleness > 0:
        out["step"] = max(out["generate"], rest)
    else:
        out["step"] = out["generate"] + rest
    return out
