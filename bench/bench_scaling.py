"""Scaling of the hybrid engine over the GPUs of one host: FSDP2 over N ranks, vLLM with T.

Each of N ranks trains (FSDP2 over all N) and the ranks form N/T vLLM replicas of T
consecutive ranks (tensor parallel). One iteration is a GRPO step of a hybrid worker:
sync the weights into vLLM (FSDP layout -> TP shards, bucket by bucket), generate
``--n`` responses for each prompt (fixed length, EOS ignored), compute the old
log-probs, one training step. The per-GPU batch is fixed (``--batch`` prompts per GPU,
so a replica gets ``T * batch``): perfect scaling keeps tokens/s/GPU constant as N
grows. ``wait_s`` is a barrier after generation: the time a rank waits for the slowest
replica (without it, that wait lands in the old log-prob pass's first all-gather). The
first iteration is a warm-up; figures are medians over the others. Step MFU
counts 10 N FLOPs per token (generation 2, old log-probs 2, update 6: no reference model
in this step) over the bf16 matmul peak measured first in the same run; per-stage peak
GPU memory is the maximum over ranks.

    python bench/bench_scaling.py --nproc 2 --tp 1                   # tiny model, CPU
    python bench/bench_scaling.py --device cuda --dtype bfloat16 --shape qwen2.5-1.5b --nproc 4 --tp 1
    python bench/bench_scaling.py --device cuda --dtype bfloat16 --shape qwen2.5-7b --nproc 4 --tp 2
    python bench/bench_scaling.py ... --check     # correctness only: see ``check``

``--check`` measures instead: (1) the gap between vLLM's sampler log-probs (T ranks)
and the trainer's recomputed ones (N ranks) on the same samples, and (2) the loss and
gradient norm of one fixed global batch (the same for every N), whose agreement
across runs with different N is the loss-invariance check (each rank sums its tokens'
loss and divides by the global token count, so the gradient is the same for any N).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hybrid import SHAPES, Clock, build_model, random_prompts, sampled_nll

from flowrl.batch import Batch
from flowrl.engines.distributed import free_port
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.engines.memory import STAGE_PEAKS, max_over_ranks
from flowrl.engines.optim import OptimizerConfig
from flowrl.engines.sync import sync_weights
from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig, replica_info
from flowrl.keys import Keys
from perf import count_folder_parameters, matmul_peak_flops, step_mfu

FLOPS_PER_PARAM_TOKEN = 10  # this step has no reference model: generation 2 + old log-probs 2 + update 6


def build_engines(rank: int, args: argparse.Namespace, model_path: str) -> tuple[FSDPEngine, VLLMRollout]:
    trainer = FSDPEngine(
        FSDPEngineConfig(
            model_path=model_path,
            device=args.device,
            param_dtype=args.dtype,
            gradient_checkpointing=args.gradient_checkpointing,
            gather_once_for_inference=args.gather_once,
            optim=OptimizerConfig(lr=0.0 if args.check else 1e-6, grad_clip=0.0),
        )
    )
    replica = replica_info(rank, args.nproc, args.tp).replica
    rollout = VLLMRollout(
        VLLMRolloutConfig(
            model_path=model_path,
            dtype=args.dtype,
            max_model_len=args.prompt_len + args.response_len + 8,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=not args.cuda_graphs,
            seed=replica,  # the ranks of a replica must share it
            tensor_parallel_size=args.tp,
        )
    )
    return trainer, rollout


def my_rows(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's 1/world of a batch (the trainer's data-parallel share)."""
    per = len(batch) // world
    return batch[rank * per : (rank + 1) * per]


def grpo_step(trainer: FSDPEngine, rollout: VLLMRollout, prompts: Batch, args: argparse.Namespace) -> dict:
    """Sync, generate (one replica's prompts), old log-probs and one update on this rank's share."""
    cuda = args.device == "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    with STAGE_PEAKS("weight_sync"):
        sync = sync_weights(trainer, rollout, args.bucket_mb << 20)
    with STAGE_PEAKS("generate"), Clock(cuda) as gen:
        samples = rollout.generate(
            prompts, n=args.n, temperature=1.0, max_tokens=args.response_len, ignore_eos=True
        )
        STAGE_PEAKS.note_used("generate")  # vLLM awake: its weights and KV cache count here
    rollout.sleep(level=1)
    mine = my_rows(
        samples, replica_info(rank, world, args.tp).tp_rank, args.tp
    )  # T ranks split a replica's rows
    with Clock(cuda) as wait:  # for the slowest replica: else old log-probs' first all-gather waits
        dist.barrier()
    with STAGE_PEAKS("old_logprobs"), Clock(cuda) as old:
        trainer.compute_logprobs(mine, 1.0, args.micro_batch)
    with STAGE_PEAKS("update"), Clock(cuda) as train:
        trainer.train_step(mine, sampled_nll, args.micro_batch)
    return {
        "sync_s": sync["seconds"],
        "sync_gb": sync["bytes"] / 1e9,
        "sync_gb_per_s": sync["gb_per_s"],
        "gen_s": gen.seconds,
        "wait_s": wait.seconds,
        "old_logprobs_s": old.seconds,
        "train_s": train.seconds,
        "step_s": sync["seconds"] + gen.seconds + wait.seconds + old.seconds + train.seconds,
    }


def check(trainer: FSDPEngine, rollout: VLLMRollout, prompts: Batch, args: argparse.Namespace) -> dict:
    """Log-prob agreement vLLM (T) vs FSDP (N), and loss/grad norm of a fixed global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sync_weights(trainer, rollout, args.bucket_mb << 20)
    samples = rollout.generate(prompts, n=args.n, temperature=1.0, max_tokens=args.response_len)
    rollout.sleep(level=1)
    drawn: list = [None] * world  # every rank's responses: the T ranks of a replica must agree
    dist.all_gather_object(drawn, samples[Keys.RESPONSE_IDS].tolist())
    replica = replica_info(rank, world, args.tp).replica
    agree = all(
        drawn[r] == drawn[rank] for r in range(world) if replica_info(r, world, args.tp).replica == replica
    )
    logprobs, _ = trainer.compute_logprobs(samples, 1.0, args.micro_batch)  # [B, R]
    mask = samples[Keys.RESPONSE_MASK] > 0
    gap = (logprobs - samples[Keys.ROLLOUT_LOGPROBS]).abs()[mask]
    ratio = (logprobs - samples[Keys.ROLLOUT_LOGPROBS]).exp()[mask]
    fixed = fixed_batch(args)  # the same rows whatever N is
    metrics = trainer.accumulate_gradients(my_rows(fixed, rank, world), sampled_nll, args.micro_batch)
    metrics |= trainer.optimizer_step()
    return {
        "replica_samples_differ": float(not agree),  # 1 if any replica's ranks drew different tokens
        "logprob_gap_mean": float(gap.mean()),
        "logprob_gap_max": float(gap.max()),
        "prob_ratio_err_mean": float((ratio - 1).abs().mean()),
        "fixed_batch_grad_norm": metrics["grad_norm"],
        "fixed_batch_loss": metrics["loss"],
    }


def fixed_batch(args: argparse.Namespace, rows: int = 32) -> Batch:
    """Prompts and 'responses' from a fixed seed: identical for every N (rows divisible by N)."""
    g = torch.Generator().manual_seed(1234)
    prompts = random_prompts(rows, args.prompt_len, seed=1234)
    ids = torch.randint(4, 260, (rows, args.response_len), generator=g)  # [B, R]
    mask = torch.ones(rows, args.response_len)  # [B, R]
    mask[::3, args.response_len // 2 :] = 0  # uneven lengths: the global-token normalization matters
    return prompts | Batch({Keys.RESPONSE_IDS: ids, Keys.RESPONSE_MASK: mask})


def run_rank(rank: int, args: argparse.Namespace, model_path: str, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(args.nproc),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.device == "cpu":
        torch.set_num_threads(1)
    trainer, rollout = build_engines(rank, args, model_path)
    rollout.sleep(level=1)
    replica = replica_info(rank, args.nproc, args.tp).replica
    prompts = random_prompts(args.batch * args.tp, args.prompt_len, seed=replica)  # fixed per GPU
    if args.check:
        rows = [check(trainer, rollout, prompts, args)]
    else:
        rows = [grpo_step(trainer, rollout, prompts, args) for _ in range(args.iters + 1)][1:]
    gathered: list = [None] * args.nproc
    dist.all_gather_object(gathered, (rows, STAGE_PEAKS.pop()))
    if rank == 0:
        result = summary(args, [r for r, _ in gathered])
        result |= {k: round(v, 2) for k, v in sorted(max_over_ranks([p for _, p in gathered]).items())}
        Path(out).write_text(json.dumps(result))


def summary(args: argparse.Namespace, per_rank: list[list[dict]]) -> dict:
    """Medians over iterations of the slowest rank's figures, tokens/s/GPU and step MFU."""
    keys = per_rank[0][0].keys()
    med = {
        k: statistics.median(max(r[i][k] for r in per_rank) for i in range(len(per_rank[0]))) for k in keys
    }
    result = {
        "shape": args.model or args.shape,
        "device": args.device,
        "dtype": args.dtype,
        "nproc": args.nproc,
        "tp": args.tp,
        "replicas": args.nproc // args.tp,
        "batch_per_gpu": args.batch,
        "n": args.n,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "check": args.check,
        "cuda_graphs": args.cuda_graphs,
        "gather_once_for_inference": args.gather_once,
    }
    result |= {k: round(v, 6) for k, v in med.items()}
    if not args.check:
        tokens_per_gpu = args.batch * args.n * (args.prompt_len + args.response_len)
        result["tokens_per_s_per_gpu"] = round(tokens_per_gpu / med["step_s"], 1)
        result["generated_tokens_per_s_per_gpu"] = round(
            args.batch * args.n * args.response_len / med["gen_s"], 1
        )
        if args.peak_flops > 0:
            mfu = step_mfu(
                args.n_params, result["tokens_per_s_per_gpu"], args.peak_flops, FLOPS_PER_PARAM_TOKEN
            )
            result |= {
                "parameters": args.n_params,
                "matmul_peak_tflops": round(args.peak_flops / 1e12, 1),
                "step_mfu": round(mfu, 4),
            }
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a Hugging Face folder (overrides --shape)")
    p.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    p.add_argument("--workdir", default="/tmp/flowrl-bench")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--nproc", type=int, default=1, help="GPUs (ranks) N")
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor_parallel_size T (divides N)")
    p.add_argument("--batch", type=int, default=8, help="prompts per GPU")
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--iters", type=int, default=3, help="measured iterations (after one warm-up)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument(
        "--gather-once", action="store_true",
        help="the old log-prob pass all-gathers each layer once, not once per micro-batch",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 matmul peak; 0: measure it now (GPU)")
    p.add_argument("--check", action="store_true", help="correctness figures instead of throughput")
    p.add_argument("--out", default="", help="write the result JSON here (also printed)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    replica_info(0, args.nproc, args.tp)  # T divides N, or say so now
    model_path = build_model(args)
    args.peak_flops = (
        args.peak_tflops * 1e12
        if args.peak_tflops > 0
        else matmul_peak_flops("cuda")
        if args.device == "cuda"
        else 0.0
    )
    args.n_params = count_folder_parameters(model_path)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the ranks need the memory
    out = args.out or os.path.join(args.workdir, f"scaling_n{args.nproc}_t{args.tp}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    mp.spawn(run_rank, args=(args, model_path, free_port(), out), nprocs=args.nproc, join=True)
    print(Path(out).read_text())


if __name__ == "__main__":
    main()
