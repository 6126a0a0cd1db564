"""Peak memory per device of each stage of a step, from the model shape and the layout.

Bytes of the FSDP2 training engine (``flowrl/engines/fsdp.py``) on one of W ranks:

    parameters   4 N / W      fp32 master weights, sharded (the compute dtype is only gathered)
    gradients    4 N / W      fp32, sharded; freed after the optimizer step (set_to_none)
    optimizer    8 N / W      AdamW's two moments, fp32, sharded
    gathered     (2 layers + root) x bytes(actor.model.dtype)   layers all-gathered one at a
                 time (+ the next, prefetched); the root (embedding, norm, head) for the whole pass
    activations  tokens x L x A   per micro-batch; A per token and layer is what autograd
                 keeps (``ACT_*`` below, in units of the compute dtype); with gradient
                 checkpointing only each layer's input (h) stays, plus one layer's A while
                 it is recomputed
    logits       3 x 4 x c x V    one [c, V] chunk of fp32 logits, its log-softmax and gradient
                 (``actor.model.logits_chunk_size`` c; 0: every response token of the micro-batch)

The rollout engine (vLLM): on GPU it takes ``gpu_memory_utilization`` of the device while it
generates (weights / T, KV cache, its activations); asleep (colocated, during training) its pool
is given back. On CPU it holds its weights plus ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache in
host memory all the time, and every worker shares the host's memory.

Colocated: the trainer's state stays on the device while vLLM generates unless
``actor.offload`` moves parameters and optimizer state to host memory (gradients dropped).
``model.cpu_offload`` keeps a model's shards (and the actor's gradients and AdamW state) in host
memory all the time: on GPU only the gathered layers and activations count.
Split: the trainer's devices hold no vLLM; the rollout devices hold only vLLM.

Not modelled: host memory on a GPU machine (what ``actor.offload`` and ``cpu_offload`` move
there must fit it: 16 bytes a parameter for an offloaded actor), allocator fragmentation (a
margin of ``HEADROOM`` is kept free), the
reference/critic's own activations beyond the actor's (they run one at a time, the actor's
bound them when the shapes match), temporary buffers of collectives other than a sync bucket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from flowrl.planner.layout import Layout
from flowrl.planner.shape import ModelShape

GIB = float(2**30)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.9  # a plan may use this fraction of a device's memory
# What autograd keeps per token and decoder layer (Llama/Qwen2, sdpa), in elements of the
# compute dtype: norm inputs and outputs (4 h), q / k / v and their rotated copies, keys and
# values repeated to every head for attention, the attention output (q: 5 q-widths, 3 kv-widths),
# and the MLP's gate, up, activation and product (4 i).
ACT_HIDDEN, ACT_Q, ACT_KV, ACT_INTERMEDIATE = 4, 5, 3, 4
CUDA_CONTEXT_GIB = 0.75  # per GPU process: CUDA context, NCCL and cuBLAS workspaces
CPU_PROCESS_GIB = 0.6  # per CPU worker process: Python, torch, vLLM and Ray, measured RSS order
VLLM_GPU_FLOOR_GIB = 0.5  # vLLM's own activations and buffers inside its share, before the KV cache
VLLM_ASLEEP_GIB = 0.25  # what a sleeping vLLM engine keeps on the device


@dataclass(frozen=True)
class Workload:
    """One step's sizes: prompts x samples, tokens per prompt and per response."""

    prompts: int  # data.train_batch_size
    n: int  # rollout.n
    prompt_tokens: float  # mean prompt length (time); memory uses max_prompt_tokens
    response_tokens: float  # mean response length (time); memory uses max_response_tokens
    max_prompt_tokens: int
    max_response_tokens: int
    mini_batch_size: int
    epochs: int = 1

    @property
    def responses(self) -> int:
        return self.prompts * self.n

    @property
    def max_seq_tokens(self) -> int:
        return self.max_prompt_tokens + self.max_response_tokens


@dataclass(frozen=True)
class Roles:
    """Which models a step holds besides the policy, and the dtypes of the run."""

    reference: bool = False  # a separate reference copy (not the actor with adapters off)
    critic: ModelShape | None = None  # colocated critic (None: none, or on its own devices)
    param_dtype: str = "float32"  # actor.model.dtype: the compute dtype FSDP gathers in
    rollout_dtype: str = "float32"
    ref_dtype: str = "float32"
    logits_chunk: int = 1024
    sync_bucket_mb: int = 256
    lora: bool = False  # only adapters train: no full gradients or optimizer state
    cpu_offload: bool = False  # actor.model.cpu_offload: its shards, gradients and AdamW state in host memory
    ref_cpu_offload: bool = False  # the reference's shards in host memory


@dataclass(frozen=True)
class Device:
    """What one plan can use: on GPU each device's memory; on CPU the host's, shared."""

    use_gpu: bool
    count: int  # GPUs, or CPU cores
    memory_gib: float  # per GPU, or the host's available memory
    cpu_kv_cache_gib: float = 4.0  # VLLM_CPU_KVCACHE_SPACE (vLLM's default 4 when unset)

    @classmethod
    def cpu_here(cls) -> Device:
        space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
        return cls(False, os.cpu_count() or 1, available_host_gib(), float(space) if space else 4.0)


def available_host_gib() -> float:
    """MemAvailable of /proc/meminfo (else the physical memory), GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def micro_tokens(w: Workload, layout: Layout) -> int:
    """Tokens (prompt + response) of the largest micro-batch on one rank."""
    if layout.max_tokens_per_micro_batch > 0:
        return max(layout.max_tokens_per_micro_batch, w.max_seq_tokens)  # a sequence is never split
    return layout.micro_batch_size * w.max_seq_tokens


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool) -> float:
    """What a forward keeps for backward over ``tokens`` tokens (all layers)."""
    per_layer = ACT_HIDDEN * shape.hidden + ACT_Q * shape.q_width + ACT_KV * shape.kv_width
    per_layer += ACT_INTERMEDIATE * shape.intermediate
    if checkpointing:  # the layer inputs, plus one layer's activations during its recompute
        return tokens * dtype_bytes * (shape.layers * shape.hidden + per_layer)
    return tokens * dtype_bytes * shape.layers * per_layer


def logits_bytes(shape: ModelShape, tokens: int, chunk: int, grad: bool) -> float:
    c = min(chunk, tokens) if chunk > 0 else tokens
    return (3 if grad else 2) * 4 * c * shape.vocab


def gathered_bytes(shape: ModelShape, dtype_bytes: int, world: int) -> float:
    """Unsharded parameters during a pass: two layers and the root, in the compute dtype."""
    if world == 1 and dtype_bytes == 4:  # nothing to gather: the fp32 shards are the parameters
        return 0.0
    return dtype_bytes * (2 * shape.layer_params + shape.root_params)


def trainer_state_bytes(shape: ModelShape, world: int, lora: bool) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer state) bytes on one rank."""
    params = 4 * shape.params / world
    if lora:
        return params, 0.0, 0.0
    return params, params, 2 * params


def resident_bytes(shape: ModelShape, layout: Layout, roles: Roles) -> float:
    """What stays on a trainer rank between stages: parameters, optimizer state, other models."""
    W = layout.num_workers
    params, _, optim = trainer_state_bytes(shape, W, roles.lora)
    if roles.cpu_offload:
        params = optim = 0.0
    others = (DTYPE_BYTES[roles.ref_dtype] * shape.params / W) if roles.reference and not roles.ref_cpu_offload else 0.0
    if roles.critic is not None:
        others += 16 * roles.critic.params / W
    return params + optim + others


def transient_bytes(shape: ModelShape, w: Workload, layout: Layout, roles: Roles) -> dict[str, float]:
    """What a trainer rank allocates on top of ``resident_bytes`` in each training-side stage."""
    pb = DTYPE_BYTES[roles.param_dtype]
    _, grads, _ = trainer_state_bytes(shape, layout.num_workers, roles.lora)
    grads = 0.0 if roles.cpu_offload else grads
    gathered = gathered_bytes(shape, pb, layout.num_workers)
    tokens = micro_tokens(w, layout)
    resp_tokens = tokens * w.max_response_tokens // max(w.max_seq_tokens, 1)
    act = activation_bytes(shape, tokens, pb, layout.gradient_checkpointing)
    # a no-grad layer at its MLP: the residual stream, its norm, the layer's output (4 h) and
    # activation, up projection and their product (3 i)
    fwd_act = tokens * pb * (4 * shape.hidden + 3 * shape.intermediate)
    return {
        "update": grads + gathered + act + logits_bytes(shape, resp_tokens, roles.logits_chunk, True),
        "old_logprobs": gathered + fwd_act + logits_bytes(shape, resp_tokens, roles.logits_chunk, False),
        "weight_sync": min(roles.sync_bucket_mb * 2**20, 4 * shape.params) + 4 * shape.layer_params,
    }


def stage_peaks(shape: ModelShape, w: Workload, layout: Layout, roles: Roles, device: Device) -> dict[str, float]:
    """Peak bytes per stage on the most loaded device (GPU) or on the whole host (CPU)."""
    W = layout.num_workers
    if not device.use_gpu:  # host memory is host memory: what cpu_offload moves stays counted
        roles = replace(roles, cpu_offload=False, ref_cpu_offload=False)
    resident = resident_bytes(shape, layout, roles)
    peaks = {k: resident + v for k, v in transient_bytes(shape, w, layout, roles).items()}
    rollout = rollout_bytes(shape, w, layout, roles, device)
    on_device_while_generating = 0.0 if layout.offload else resident
    per_process = (CUDA_CONTEXT_GIB if device.use_gpu else CPU_PROCESS_GIB) * GIB
    if device.use_gpu:
        peaks = {k: v + per_process + (0.0 if layout.split else VLLM_ASLEEP_GIB * GIB) for k, v in peaks.items()}
        peaks["generate"] = per_process + rollout + (0.0 if layout.split else on_device_while_generating)
        return peaks
    # CPU: every process of the plan shares the host; vLLM's memory is held all the time
    engines = layout.rollout_workers if layout.split else W // layout.tensor_parallel_size
    held = engines * rollout + (W + layout.rollout_workers) * per_process
    out = {k: W * v + held for k, v in peaks.items()}
    out["generate"] = W * resident + held
    return out


def rollout_bytes(shape: ModelShape, w: Workload, layout: Layout, roles: Roles, device: Device) -> float:
    """One vLLM engine's memory (per GPU of a replica on GPU)."""
    if device.use_gpu:
        return layout.gpu_memory_utilization * device.memory_gib * GIB
    return DTYPE_BYTES[roles.rollout_dtype] * shape.params + device.cpu_kv_cache_gib * GIB


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    return 2 * shape.layers * shape.kv_width * dtype_bytes


def kv_cache_tokens(shape: ModelShape, layout: Layout, roles: Roles, device: Device) -> int:
    """Tokens the KV cache of one replica holds (0: vLLM would not start)."""
    rb = DTYPE_BYTES[roles.rollout_dtype]
    if device.use_gpu:
        tp = layout.tensor_parallel_size
        free = layout.gpu_memory_utilization * device.memory_gib * GIB - rb * shape.params / tp - VLLM_GPU_FLOOR_GIB * GIB
        return max(0, int(free * tp / kv_bytes_per_token(shape, rb)))
    return int(device.cpu_kv_cache_gib * GIB / kv_bytes_per_token(shape, rb))


def memory_errors(shape: ModelShape, w: Workload, layout: Layout, roles: Roles, device: Device) -> tuple[float, list[str]]:
    """(the highest stage peak in GiB, why the layout would run out of memory)."""
    peaks = stage_peaks(shape, w, layout, roles, device)
    peak = max(peaks.values()) / GIB
    errors = []
    if peak > HEADROOM * device.memory_gib:
        stage = max(peaks, key=peaks.__getitem__)
        where = "per GPU" if device.use_gpu else "of host memory"
        errors.append(f"{stage} peaks at {peak:.2f} GiB {where}, over {HEADROOM:.0%} of {device.memory_gib:.1f} GiB")
    if kv_cache_tokens(shape, layout, roles, device) < w.max_seq_tokens:
        errors.append(f"vLLM's KV cache cannot hold one sequence of {w.max_seq_tokens} tokens")
    return peak, errors
