"""The micro-profile: a few timed micro-steps of the model's shape on this machine, fitted into
``Coefficients`` and cached as JSON per machine and shape.

Plain torch on a Hugging Face model built from the shape (random weights, at most
``PROFILE_LAYERS`` decoder layers: per-layer costs scale with the layer count): no-grad
forwards and forward + backward passes at two token counts (a fixed cost and seconds per
FLOP for each), an AdamW step, decoding with a KV cache at two batch sizes, and a large copy
(bytes per second). On CPU the training pass is timed again with every core, for the speed-up
of more threads per worker. A tiny model takes a few seconds.

The cache lives under ``$FLOWRL_PLANNER_CACHE`` (default ``~/.cache/flowrl/planner``), one file
per (machine, shape, dtype); ``flowrl plan --fit RUN_DIR`` adds the runtime overheads measured
in a run to the same file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flowrl.planner.cost import Coefficients, forward_flops
from flowrl.planner.shape import ModelShape

PROFILE_LAYERS = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("FLOWRL_PLANNER_CACHE") or Path.home() / ".cache" / "flowrl" / "planner")


def machine_key(use_gpu: bool) -> str:
    """The kind of machine: GPU model and count, or CPU model and core count."""
    if use_gpu:
        name = f"{torch.cuda.get_device_name(0)}-x{torch.cuda.device_count()}"
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1] for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
        name = f"{name}-{os.cpu_count()}cores"
    return re.sub(r"[^A-Za-z0-9.]+", "_", name.strip()).strip("_")


def cache_path(shape: ModelShape, dtype: str, use_gpu: bool) -> Path:
    return cache_dir() / machine_key(use_gpu) / f"{shape.key()}-{dtype}.json"


def load_or_profile(shape: ModelShape, dtype: str, use_gpu: bool, refresh: bool = False) -> tuple[Coefficients, Path, bool]:
    """The cached coefficients, or a fresh profile (then cached). -> (coefficients, file, profiled now)"""
    path = cache_path(shape, dtype, use_gpu)
    if path.is_file() and not refresh:
        return Coefficients(**json.loads(path.read_text())), path, False
    coefficients = profile(shape, dtype, use_gpu)
    save(coefficients, path)
    return coefficients, path, True


def save(coefficients: Coefficients, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(coefficients), indent=1))
    tmp.replace(path)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """The fastest of ``repeats`` runs of ``fn`` after one warm-up, in seconds (the least disturbed
    by other work on the machine)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (x, y) points, both clamped to >= 0."""
    mx = statistics.mean(x for x, _ in points)
    my = statistics.mean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = max(sum((x - mx) * (y - my) for x, y in points) / sxx, 0.0) if sxx else 0.0
    return max(my - slope * mx, 0.0), slope


def profile_model(shape: ModelShape, dtype: str, device: torch.device) -> tuple[torch.nn.Module, ModelShape]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    layers = min(shape.layers, PROFILE_LAYERS)
    small = dataclasses.replace(shape, layers=layers)
    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, tie_word_embeddings=shape.tied_embeddings, max_position_embeddings=8192,
    )  # fmt: skip
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(DTYPES[dtype])
    return model, small


def profile(shape: ModelShape, dtype: str, use_gpu: bool, seq: int = 128) -> Coefficients:
    """Time the micro-steps and fit the coefficients (see the module docstring)."""
    device = torch.device("cuda" if use_gpu else "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1) if not use_gpu else None
    try:
        torch.manual_seed(0)
        model, small = profile_model(shape, dtype, device)
        scale = shape.layers / small.layers  # fixed costs per micro-step grow with the layers
        rows = (1, 4, 8) if not use_gpu else (4, 16, 32)
        fwd = [_pass_time(model, small, r, seq, device, train=False) for r in rows]
        train = [_pass_time(model, small, r, seq, device, train=True) for r in rows]
        fwd_call, fwd_rate = line_fit(fwd)
        train_call, train_rate = line_fit(train)
        optim = _optimizer_time(model, device) / sum(p.numel() for p in model.parameters())
        copy = _copy_s_per_byte(device)
        batches = (1, 8, 16)
        step0, per_seq = line_fit([(b, _decode_step_time(model, shape.vocab, b, device)) for b in batches])
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        step_fixed = max(step0 - weight_bytes * copy, 0.2 * step0)
        speedup = {"1": 1.0}
        cores = os.cpu_count() or 1
        if not use_gpu and cores > 1:
            speedup[str(cores)] = _thread_speedup(lambda: _pass_time(model, small, rows[-1], seq, device, train=True)[1], cores)
    finally:
        torch.set_num_threads(threads)
    return Coefficients(
        fwd_call_s=fwd_call * scale, fwd_s_per_flop=fwd_rate, train_call_s=train_call * scale,
        train_s_per_flop=train_rate, optim_s_per_param=optim, decode_step_s=step_fixed * scale,
        decode_s_per_seq=per_seq * scale, decode_s_per_byte=copy, copy_s_per_byte=copy,
        collective_s=3e-5 if use_gpu else 2e-4, collective_s_per_byte=1e-11 if use_gpu else 5e-10,
        threads=1, thread_speedup=speedup,
    )  # fmt: skip


def _thread_speedup(run: Callable[[], float], cores: int, rounds: int = 3) -> float:
    """Speed with ``cores`` threads over one thread: the best of ``rounds`` interleaved pairs (other
    work on the machine slows many threads most), kept within [0.5, cores]."""
    ratios = []
    for _ in range(rounds):
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(cores)
        ratios.append(one / run())
    return min(max(max(ratios), 0.5), float(cores))


def _pass_time(model: torch.nn.Module, shape: ModelShape, rows: int, seq: int, device: torch.device, train: bool) -> tuple[float, float]:
    """(FLOPs, seconds) of a forward (+ backward) over ``rows`` x ``seq`` tokens, head on every token."""
    ids = torch.randint(3, shape.vocab, (rows, seq), device=device)  # [b, S]

    def run() -> None:
        with torch.set_grad_enabled(train):
            logits = model(input_ids=ids).logits  # [b, S, V]
            loss = torch.log_softmax(logits.float(), -1).mean()
            if train:
                loss.backward()
                model.zero_grad(set_to_none=True)

    flops = forward_flops(shape, rows * seq, seq / 2, rows * seq) * (3 if train else 1)
    return flops, timed(run, device)


def _optimizer_time(model: torch.nn.Module, device: torch.device) -> float:
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    seconds = timed(opt.step, device)
    model.zero_grad(set_to_none=True)
    return seconds


@torch.no_grad()
def _decode_step_time(model: torch.nn.Module, vocab: int, batch: int, device: torch.device, prompt: int = 16, steps: int = 8) -> float:
    """Seconds per decoding step of ``batch`` sequences with a KV cache."""
    ids = torch.randint(3, vocab, (batch, prompt), device=device)  # [b, P]

    def run() -> None:
        out = model(input_ids=ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)  # [b, 1]
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    prefill = timed(lambda: model(input_ids=ids), device)
    return max(timed(run, device) - prefill, 0.0) / steps


def _copy_s_per_byte(device: torch.device, mib: int = 64) -> float:
    src = torch.empty(mib * 2**18, dtype=torch.float32, device=device)  # mib MiB
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src), device) / (mib * 2**20)
