"""The peer: TRL's GRPOTrainer with colocated vLLM, on the step that bench_grpo.py times.

Same model folder (a Qwen2.5 shape with random weights, written by bench_grpo.py or
``flowrl.models.shapes.make_random_model``), same prompts (fixed length through the same
chat template), same group size, lengths (EOS ignored), precision (fp32 master weights,
bf16 compute; vLLM in bf16), micro-batch, gradient checkpointing and KL to a reference.
One optimizer step per rollout of ``prompts * n`` completions, like flowrl's step:
``per_device_train_batch_size = micro_batch`` and ``gradient_accumulation_steps =
prompts * n / micro_batch``, so TRL generates all completions once per step.
TRL computes old log-probs too (its vLLM importance-sampling correction is on by default).

    python bench/bench_trl_grpo.py --model /tmp/flowrl-bench/qwen2.5-1.5b --out trl.json
    python bench/bench_trl_grpo.py --device cpu --model SMOLLM2_DIR --data PROMPTS --prompts 8 --n 4 \
        --prompt-len 64 --response-len 64 --micro-batch 8 --no-gradient-checkpointing   # CPU: fp32

On CPU, TRL generates with transformers' ``generate`` (its default without vLLM;
``min_new_tokens`` fixes the length) in fp32, and peak memory is the process's peak RSS.

Needs ``trl`` (1.16 was used) and ``datasets``: ``pip install "flowrl[bench]"``.
Reports the median step time after the
warm-up steps and tokens/s (prompt + response tokens of a step over its wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def prompts_dataset(path: str, prompts: int):
    """The first ``prompts`` rows of bench_grpo.py's prompt file as a conversational dataset."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = pq.read_table(path).to_pylist()[:prompts]
    return Dataset.from_dict({"prompt": [[dict(m) for m in r["prompt"]] for r in rows]})


def zero_reward(completions: list, **_: object) -> list[float]:
    """Every completion scores 0 (random weights: flowrl's arithmetic scorer gives 0 too)."""
    return [0.0] * len(completions)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_timer_callback(times: list[float]):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock seconds of each optimizer step (generation included)."""

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            times.append(time.perf_counter() - self.start)
            print(f"trl step {len(times)}: {times[-1]:.2f} s", flush=True)

    return StepTimer()


def trl_config(args: argparse.Namespace, out_dir: str):
    from trl import GRPOConfig

    completions = args.prompts * args.n
    cuda = args.device == "cuda"
    lengths = {"ignore_eos": True} if cuda else {"min_new_tokens": args.response_len}
    if completions % args.micro_batch:
        raise ValueError(
            f"--prompts * --n = {completions} must be divisible by --micro-batch={args.micro_batch}"
        )
    return GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=completions // args.micro_batch,
        num_generations=args.n,
        max_completion_length=args.response_len,
        temperature=1.0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        beta=args.beta,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing,
        use_vllm=cuda,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_enable_sleep_mode=True,
        vllm_max_model_length=args.prompt_len + args.response_len + 8,
        generation_kwargs=lengths,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
    )


def peak_memory(device: str) -> dict[str, float]:
    if device == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    import resource

    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", required=True, help="the model folder bench_grpo.py wrote")
    p.add_argument("--data", required=True, help="bench_grpo.py's prompt file (parquet)")
    p.add_argument("--out", default="")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient (> 0 loads a reference model)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    return p.parse_args()


def main() -> None:
    import statistics

    from trl import GRPOTrainer

    args = parse_args()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29533")
    times: list[float] = []
    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=zero_reward,
        args=trl_config(args, tempfile.mkdtemp(prefix="trl-bench-")),
        train_dataset=prompts_dataset(args.data, args.prompts),
        callbacks=[make_timer_callback(times)],
    )
    trainer.train()
    step_s = statistics.median(times[args.warmup :])
    tokens = args.prompts * args.n * (args.prompt_len + args.response_len)
    import trl

    result = {
        "engine": f"trl {trl.__version__} GRPOTrainer "
        + ("(vllm_mode=colocate)" if args.device == "cuda" else "(transformers generate, CPU)"),
        "model": args.model,
        "prompts": args.prompts,
        "n": args.n,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "micro_batch": args.micro_batch,
        "beta": args.beta,
        "steps_measured": len(times) - args.warmup,
        "step_times_s": times,
        "step_s": step_s,
        "tokens_per_s_per_gpu": tokens / step_s,
        **peak_memory(args.device),
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
