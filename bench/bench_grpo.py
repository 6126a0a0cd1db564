"""Throughput of a full flowrl GRPO step on the GPU(s) of one machine.

The step is the real one (``flowrl.drivers.grpo.train_step`` through the Ray workers):
generate with vLLM (CUDA graphs, sleep/wake), score, old log-probs, reference
log-probs (KL loss on), one update over the whole rollout, weight sync into vLLM.
The model is a Qwen2.5-shaped one with random weights; prompts have a fixed length.
``--lengths fixed`` (the default): responses ignore EOS, so every step moves the same number
of tokens. ``--lengths real``: the model folder (``SHAPE-real``) is made so that its weights
alone end responses after ``REAL_STOP_MEAN`` tokens on average (geometric lengths,
``flowrl.models.shapes.add_stop``; 41% of 512 after truncation), and EOS is not ignored.

    python bench/bench_grpo.py --shape qwen2.5-1.5b --out result.json
    python bench/bench_grpo.py --shape qwen2.5-0.5b --prompts 64 --n 8 --prompt-len 256 --response-len 512
    python bench/bench_grpo.py --shape qwen2.5-1.5b --lengths real --out result_real.json
    python bench/bench_grpo.py --device cpu --shape tiny --prompts 2 --n 2 --prompt-len 16 \
        --response-len 8 --micro-batch 2 --steps 2     # the plumbing, on CPU (fp32, tiny model)

Reports medians over the steps after ``--warmup``: tokens/s/GPU (prompt + response
tokens of the step over its wall time), seconds per stage, step MFU (12 * N * tokens/s
over the bf16 matmul peak measured first, in the same run), weight-sync GB/s and peak
memory per stage; and each step's mean, min and max response length.
"""

from __future__ import annotations

import argparse
import os
import random
import string
import tempfile
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/perf.py

STAGES = ("generate", "reward", "old_logprobs", "ref", "update", "weight_sync")
# --lengths real: EOS with probability 1/240 per token; E[min(L, 512)] = 211 tokens, 41% of 512
REAL_STOP_MEAN = 240.0


def write_prompts(path: Path, rows: int, prompt_len: int, seed: int, model: Path | None = None) -> str:
    """Rows whose chat-templated prompt is exactly ``prompt_len`` tokens.

    Counted with ``model``'s tokenizer when given, else the byte tokenizer the random
    shapes are paired with.
    """
    from flowrl.data.rows import write_rows
    from flowrl.models.tiny import make_tokenizer

    tokenizer = make_tokenizer() if model is None else _load_tokenizer(model)
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        content = _content_of_length(tokenizer, prompt_len, rng)
        out.append(
            {
                "prompt": [{"role": "user", "content": content}],
                "data_source": "flowrl/arithmetic",
                "reward_model": {"style": "rule", "ground_truth": "7"},
                "extra_info": {"index": i},
            }
        )
    return write_rows(str(path), out)


def _load_tokenizer(model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def _content_of_length(tokenizer, prompt_len: int, rng: random.Random) -> str:
    """Random letters and digits whose chat-templated prompt is ``prompt_len`` tokens."""
    content = ""
    while _template_tokens(tokenizer, content) < prompt_len:
        content += rng.choice(string.ascii_lowercase + string.digits + " ")
    while len(content) and _template_tokens(tokenizer, content) > prompt_len:
        content = content[:-1]
    if _template_tokens(tokenizer, content) != prompt_len:
        raise ValueError(f"could not build a prompt of exactly {prompt_len} tokens for this tokenizer")
    return content


def _template_tokens(tokenizer, content: str) -> int:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def overrides(args: argparse.Namespace, model: Path, data: str, run_dir: Path) -> list[str]:
    batch = args.prompts * args.n
    cuda = args.device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    return [
        "trainer.algorithm=grpo",
        f"trainer.total_steps={args.steps}",
        f"trainer.num_workers={args.gpus}",
        f"trainer.use_gpu={str(cuda).lower()}",
        f"trainer.run_dir={run_dir}",
        "trainer.loggers=[jsonl]",
        "trainer.quiet=true",
        f"actor.model.path={model}",
        f"actor.model.dtype={dtype}",
        f"actor.model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"actor.mini_batch_size={batch}",
        f"actor.micro_batch_size={args.micro_batch}",
        "actor.optim.lr=1e-6",
        "actor.use_kl_loss=true",
        f"rollout.n={args.n}",
        f"rollout.max_response_length={args.response_len}",
        f"rollout.ignore_eos={str(getattr(args, 'lengths', 'fixed') == 'fixed').lower()}",
        f"rollout.dtype={dtype}",
        f"rollout.enforce_eager={str(not (cuda and args.cuda_graphs)).lower()}",
        f"rollout.gpu_memory_utilization={args.gpu_memory_utilization}",
        f"data.train_files=[{data}]",
        f"data.train_batch_size={args.prompts}",
        f"data.prompts.max_prompt_length={args.prompt_len}",
        "reward.num_workers=2",
        *getattr(args, "overrides", []),
    ]


def run_steps(args: argparse.Namespace, model: Path, data: str, run_dir: Path) -> list[dict[str, float]]:
    from flowrl.drivers import grpo
    from flowrl.config import load_config
    from flowrl.trainer.runtime import build_runtime

    cfg = load_config(None, overrides(args, model, data, run_dir))
    rt = build_runtime(cfg)
    lengths: list[torch.Tensor] = []  # the step's response lengths, of every rollout call
    rt.generate = recording_lengths(rt.generate, lengths)  # type: ignore[method-assign]
    try:
        rows = []
        for step in range(1, args.steps + 1):
            lengths.clear()
            metrics = grpo.train_step(rt)
            rt.tracker.log(step, metrics)
            metrics |= length_metrics(torch.cat(lengths), metrics["timing/generate"])
            print(
                f"step {step}: {metrics['timing/step']:.2f} s, {metrics['perf/tokens_per_s']:.0f} tok/s, "
                f"response length {metrics['bench/response_len_mean']:.0f}",
                flush=True,
            )
            rows.append(metrics)
        return rows
    finally:
        rt.shutdown()


def recording_lengths(generate: Callable, lengths: list[torch.Tensor]) -> Callable:
    """``Runtime.generate`` that also appends each rollout's response lengths [B] to ``lengths``
    (the step's metrics hold their mean and max, not their min)."""
    from flowrl.keys import Keys

    def generate_and_record(*args, **kwargs):
        out = generate(*args, **kwargs)
        lengths.append(out[Keys.RESPONSE_MASK].sum(-1).float())  # [B], EOS included
        return out

    return generate_and_record


def length_metrics(lengths: torch.Tensor, generate_s: float) -> dict[str, float]:
    """A step's response lengths [B]: their mean, min and max, and the generated tokens per second."""
    return {
        "bench/response_len_mean": float(lengths.mean()),
        "bench/response_len_min": float(lengths.min()),
        "bench/response_len_max": float(lengths.max()),
        "bench/generated_tokens_per_s": float(lengths.sum()) / generate_s,
    }


def summarize(
    args: argparse.Namespace, rows: list[dict[str, float]], peak_flops: float, n_params: int
) -> dict:
    from perf import stage_shares, steady_state, step_mfu, workload

    med = steady_state(rows, args.warmup)
    seconds = {s: med[f"timing/{s}"] for s in STAGES if f"timing/{s}" in med}
    tokens_per_s_gpu = med["perf/tokens_per_s"] / args.gpus
    return {
        "engine": "flowrl",
        "shape": args.model or args.shape,
        "params": n_params,
        "gpus": args.gpus,
        **workload(args),
        "micro_batch": args.micro_batch,
        "cuda_graphs": args.cuda_graphs,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps_measured": len(rows) - args.warmup,
        "step_s": med["timing/step"],
        "tokens_per_s_per_gpu": tokens_per_s_gpu,
        "generated_tokens_per_s": med["bench/generated_tokens_per_s"] / args.gpus,
        "stage_s": seconds,
        "stage_share": stage_shares(seconds),
        "matmul_peak_tflops": peak_flops / 1e12,
        "step_mfu": step_mfu(n_params, tokens_per_s_gpu, peak_flops),
        "weight_sync_s": med["perf/weight_sync_s"],
        "weight_sync_gb_per_s": med["perf/weight_sync_gb_per_s"],
        "memory_gib": {k.removeprefix("memory/"): v for k, v in med.items() if k.startswith("memory/")},
        "rollout_logprob_diff_mean": med.get("rollout/logprob_diff_mean"),
        "response_length_per_step": {  # every step, warm-up included
            stat: [row[f"bench/response_len_{stat}"] for row in rows] for stat in ("mean", "min", "max")
        },
    }


def build_model(work: Path, shape: str, device: str, model: str = "", lengths: str = "fixed") -> Path:
    """``model`` when given, else a random model of a Qwen2.5 shape or the tiny test model, in ``work/shape``.

    ``lengths="real"``: the Qwen2.5 shape's weights end responses after ``REAL_STOP_MEAN`` tokens on
    average, in ``work/shape-real``; ``model`` and the tiny model keep their own EOS behaviour.
    """
    from flowrl.models.shapes import make_random_model
    from flowrl.models.tiny import make_tiny_model

    if model:
        return Path(model)
    if shape != "tiny" and lengths == "real":
        return make_random_model(work / f"{shape}-real", shape, device=device, stop_mean=REAL_STOP_MEAN)
    if shape != "tiny":
        return make_random_model(work / shape, shape, device=device)
    if not (work / shape / "config.json").exists():
        make_tiny_model(work / shape)
    return work / shape


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", help="a Qwen2.5 shape, or 'tiny' (the test model)")
    p.add_argument("--model", default="", help="a Hugging Face folder to use instead of --shape (e.g. SmolLM2)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "flowrl-bench"))
    p.add_argument("--out", default="", help="write the summary JSON here")
    p.add_argument("--gpus", type=int, default=1, help="hybrid ranks, one per GPU")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--lengths", default="fixed", choices=["fixed", "real"],
                   help="fixed: EOS ignored, every response --response-len tokens; real: EOS ends them "
                        f"({REAL_STOP_MEAN:g} tokens on average before truncation)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="steps in all, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--eager", dest="cuda_graphs", action="store_false", help="vLLM without CUDA graphs")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 matmul peak; 0: measure it now")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more recipe overrides, e.g. actor.model.packing=false")
    return p.parse_args()


def main() -> None:
    from perf import count_folder_parameters, emit, matmul_peak_flops

    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cuda = args.device == "cuda"
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops > 0
        else matmul_peak_flops(args.device, 8192 if cuda else 256)
    )
    work = Path(args.workdir)
    model = build_model(work, args.shape, args.device, args.model, args.lengths)
    tag = model.name  # the shape, SHAPE-real, or the --model folder's name
    if cuda:
        torch.cuda.empty_cache()  # the driver keeps no weights: the workers need the memory
    data = write_prompts(
        work / f"prompts_{tag}_{args.prompt_len}.parquet", args.prompts * args.steps, args.prompt_len, 0,
        model if args.model else None,
    )
    rows = run_steps(args, model, data, work / f"run_{tag}")
    result = summarize(args, rows, peak, count_folder_parameters(model))
    emit(result, args.out)


if __name__ == "__main__":
    main()
