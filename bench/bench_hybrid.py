"""Throughput of the hybrid engine: weight sync, generation and training, per rank.

One iteration is what a hybrid worker does per RL step: sync the trainer's weights
into vLLM (wake weights, stream, wake KV cache), generate a batch (fixed length,
EOS ignored), put vLLM to sleep, and run one training step on that batch
(forward + backward + AdamW step). The first iteration is a warm-up; the figures are
medians over the others. Sleep/wake are no-ops on CPU.

    python bench/bench_hybrid.py                                   # tiny model, CPU, fp32
    python bench/bench_hybrid.py --shape qwen2.5-0.5b --batch 4    # random weights, real shape
    python bench/bench_hybrid.py --device cuda --dtype bfloat16 --shape qwen2.5-7b --batch 64 \\
        --prompt-len 512 --response-len 512 --micro-batch 8 --gradient-checkpointing
    python bench/bench_hybrid.py --nproc 2                         # 2 ranks (gloo / NCCL)

Throughput does not depend on weight values, so --shape builds a model of that
architecture with random weights (and the tiny byte-level tokenizer) in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Self

import torch
import torch.multiprocessing as mp

from flowrl.batch import Batch
from flowrl.engines.distributed import free_port
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig, Normalizer
from flowrl.engines.optim import OptimizerConfig
from flowrl.engines.sync import sync_weights
from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig
from flowrl.keys import Keys
from flowrl.models.shapes import QWEN25_SHAPES, make_random_model
from flowrl.models.tiny import make_tiny_model

SHAPES = QWEN25_SHAPES


def build_model(args: argparse.Namespace) -> str:
    """A model folder: --model as given, the tiny test model, or a random model of --shape."""
    if args.model:
        return args.model
    path = Path(args.workdir) / args.shape
    if (path / "config.json").exists():
        return str(path)
    if args.shape == "tiny":
        make_tiny_model(path)
        return str(path)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    return str(make_random_model(path, args.shape, device=args.device, dtype=dtype))


def random_prompts(batch: int, length: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (batch, length), generator=g)
    return Batch({Keys.PROMPT_IDS: ids, Keys.PROMPT_MASK: torch.ones_like(ids)})


def sampled_nll(micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer):
    mask = micro[Keys.RESPONSE_MASK]  # [b, R]
    return -(out[Keys.LOGPROBS] * mask).sum() / norm.global_tokens, {}


class Clock:
    """Wall-clock seconds of a block; waits for the GPU before reading the time."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.seconds = cuda, 0.0

    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def build_engines(
    rank: int, args: argparse.Namespace, model_path: str
) -> tuple[FSDPEngine, VLLMRollout, float]:
    trainer = FSDPEngine(
        FSDPEngineConfig(
            model_path=model_path,
            device=args.device,
            param_dtype=args.dtype,
            gradient_checkpointing=args.gradient_checkpointing,
            optim=OptimizerConfig(lr=1e-6),
        )
    )
    rollout_config = VLLMRolloutConfig(
        model_path=model_path,
        dtype=args.dtype,
        max_model_len=args.prompt_len + args.response_len + 8,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=not args.cuda_graphs,
        seed=rank,
    )
    with Clock(args.device == "cuda") as clock:
        rollout = VLLMRollout(rollout_config)
    return trainer, rollout, clock.seconds


def one_step(trainer: FSDPEngine, rollout: VLLMRollout, prompts: Batch, args: argparse.Namespace) -> dict:
    """Sync, generate, sleep, train: what a hybrid worker does per RL step."""
    cuda = args.device == "cuda"
    sync = sync_weights(trainer, rollout, args.bucket_mb << 20)
    with Clock(cuda) as gen:
        batch = rollout.generate(prompts, temperature=1.0, max_tokens=args.response_len, ignore_eos=True)
    gen_used = device_used_gib() if cuda else 0.0
    with Clock(cuda) as sleep:
        rollout.sleep(level=1)
    asleep_used = device_used_gib() if cuda else 0.0
    with Clock(cuda) as train:
        trainer.train_step(batch, sampled_nll, args.micro_batch)
    return {
        "generate_device_used_gib": gen_used,
        "asleep_device_used_gib": asleep_used,
        "after_train_device_used_gib": device_used_gib() if cuda else 0.0,
        "sync_s": sync["seconds"],
        "sync_gb_per_s": sync["gb_per_s"],
        "sync_gb": sync["bytes"] / 1e9,
        "gen_s": gen.seconds,
        "sleep_s": sleep.seconds,
        "train_s": train.seconds,
    }


def device_used_gib() -> float:
    """Memory in use on this GPU by every allocator (vLLM's and PyTorch's), in GiB."""
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def run_rank(rank: int, args: argparse.Namespace, model_path: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(args.nproc),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.cpu_kv_gib))
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.nproc))
    trainer, rollout, init_s = build_engines(rank, args, model_path)
    rollout.sleep(level=1)
    prompts = random_prompts(args.batch, args.prompt_len, seed=rank)
    rows = [one_step(trainer, rollout, prompts, args) for _ in range(args.iters + 1)]
    if rank == 0:
        report(args, rows[1:], init_s)


def report(args: argparse.Namespace, rows: list[dict], init_s: float) -> None:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    gen_tokens = args.batch * args.response_len
    train_tokens = args.batch * (args.prompt_len + args.response_len)
    result = {
        "shape": args.model or args.shape,
        "device": args.device,
        "dtype": args.dtype,
        "nproc": args.nproc,
        "batch_per_rank": args.batch,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "vllm_init_s": round(init_s, 2),
        "weight_sync_s": round(med["sync_s"], 4),
        "weight_sync_gb": round(med["sync_gb"], 4),
        "weight_sync_gb_per_s": round(med["sync_gb_per_s"], 3),
        "generate_tokens_per_s": round(gen_tokens / med["gen_s"], 1),
        "train_tokens_per_s": round(train_tokens / med["train_s"], 1),
        "sleep_s": round(med["sleep_s"], 4),
        "generate_device_used_gib": round(med["generate_device_used_gib"], 2),
        "asleep_device_used_gib": round(med["asleep_device_used_gib"], 2),
        "after_train_device_used_gib": round(med["after_train_device_used_gib"], 2),
        "cuda_graphs": args.cuda_graphs,
        "iters": len(rows),
    }
    print("per rank, median over iterations:")
    for key, value in result.items():
        print(f"  {key:24s} {value}")
    print(json.dumps(result))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a Hugging Face folder (overrides --shape)")
    p.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "flowrl-bench"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--nproc", type=int, default=1, help="ranks (processes) on this machine")
    p.add_argument("--batch", type=int, default=16, help="prompts per rank")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--iters", type=int, default=3, help="measured iterations (after one warm-up)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true", help="vLLM with CUDA graphs (enforce_eager=False)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads per rank (0: cores / nproc)")
    p.add_argument("--cpu-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE on CPU")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    model_path = build_model(args)
    mp.spawn(run_rank, args=(args, model_path, free_port()), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
