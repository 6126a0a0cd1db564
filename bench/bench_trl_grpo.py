"""The peer: TRL's GRPOTrainer with colocated vLLM, on the step that bench_grpo.py times.

Same model folder (a Qwen2.5 shape with random weights, written by bench_grpo.py or
``flowrl.models.shapes.make_random_model``), same prompts (fixed length through the same
chat template), same group size, lengths (``--lengths fixed``: EOS ignored; ``real``: EOS ends
responses, read the ``SHAPE-real`` folder), precision (fp32 master weights,
bf16 compute; vLLM in bf16), micro-batch, gradient checkpointing and KL to a reference.
One optimizer step per rollout of ``prompts * n`` completions, like flowrl's step:
``per_device_train_batch_size = micro_batch`` and ``gradient_accumulation_steps =
prompts * n / micro_batch``, so TRL generates all completions once per step.
TRL computes old log-probs too (its vLLM importance-sampling correction is on by default).

    python bench/bench_trl_grpo.py --model /tmp/flowrl-bench/qwen2.5-1.5b --out trl.json
    python bench/bench_trl_grpo.py --model /tmp/flowrl-bench/qwen2.5-1.5b-real --lengths real --out t.json
    python bench/bench_trl_grpo.py --device cpu --model SMOLLM2_DIR --data PROMPTS --prompts 8 --n 4 \
        --prompt-len 64 --response-len 64 --micro-batch 8 --no-gradient-checkpointing   # CPU: fp32

On CPU, TRL generates with transformers' ``generate`` (its default without vLLM;
``min_new_tokens`` fixes the length unless ``--lengths real``) in fp32, and peak memory is the
process's peak RSS.

Needs ``trl`` (1.16 was used) and ``datasets``: ``pip install "flowrl[bench]"``.
Reports the median step time after the warm-up steps, tokens/s (the median over those steps of
prompt + response tokens of a step, as TRL counts them, over its wall time, like bench_grpo.py)
and each step's mean, min and max response length (TRL's ``completions/*_length``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/perf.py


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


def make_step_callback(times: list[float], tokens: list[int], lengths: list[dict[str, float]]):
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        """Each optimizer step's wall-clock seconds (generation included), prompt + completion
        tokens and completion lengths (mean, min, max)."""

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.start, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            times.append(time.perf_counter() - self.start)
            tokens.append(state.num_input_tokens_seen - self.seen)  # GRPOTrainer adds what it generates
            print(f"trl step {len(times)}: {times[-1]:.2f} s, {tokens[-1]} tokens", flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:  # logging_steps=1: this step's completions
                lengths.append({stat: logs[f"completions/{stat}_length"] for stat in ("mean", "min", "max")})

    return StepRecorder()


def trl_config(args: argparse.Namespace, out_dir: str):
    from trl import GRPOConfig

    completions = args.prompts * args.n
    cuda = args.device == "cuda"
    if args.lengths == "real":
        lengths = None  # EOS ends responses: the model folder's weights decide when
    else:
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
    p.add_argument("--lengths", default="fixed", choices=["fixed", "real"],
                   help="fixed: EOS ignored, every response --response-len tokens; real: EOS ends them")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient (> 0 loads a reference model)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    return p.parse_args()


def main() -> None:
    import statistics

    from perf import emit, workload
    from trl import GRPOTrainer

    args = parse_args()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29533")
    times: list[float] = []
    tokens: list[int] = []
    lengths: list[dict[str, float]] = []
    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=zero_reward,
        args=trl_config(args, tempfile.mkdtemp(prefix="trl-bench-")),
        train_dataset=prompts_dataset(args.data, args.prompts),
        callbacks=[make_step_callback(times, tokens, lengths)],
    )
    trainer.train()
    if not all(tokens):
        raise RuntimeError(
            f"bench_trl_grpo.py: TRL counted no tokens in some steps ({tokens}); this TRL does not "
            "update state.num_input_tokens_seen in GRPOTrainer, so tokens/s cannot be measured"
        )
    step_s = statistics.median(times[args.warmup :])
    tokens_per_s = statistics.median(n / s for n, s in zip(tokens[args.warmup :], times[args.warmup :]))
    import trl

    result = {
        "engine": f"trl {trl.__version__} GRPOTrainer "
        + ("(vllm_mode=colocate)" if args.device == "cuda" else "(transformers generate, CPU)"),
        "model": args.model,
        **workload(args),
        "micro_batch": args.micro_batch,
        "beta": args.beta,
        "steps_measured": len(times) - args.warmup,
        "step_times_s": times,
        "step_s": step_s,
        "step_tokens": tokens,
        "tokens_per_s_per_gpu": tokens_per_s,
        "response_length_per_step": {  # every step, warm-up included
            stat: [row[stat] for row in lengths] for stat in ("mean", "min", "max")
        },
        **peak_memory(args.device),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
