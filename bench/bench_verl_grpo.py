"""The peer: verl's PPO trainer with GRPO advantages, on the step that bench_grpo.py times.

Same model folder (a Qwen2.5 shape with random weights, written by
``flowrl.models.shapes.make_random_model``), same prompts (bench_grpo.py's parquet, already in
verl's row format), group size, lengths, KL to a reference (``use_kl_loss``, low-variance KL),
fp32 master weights with bf16 compute, gradient checkpointing, one optimizer step per rollout
(one PPO mini-batch = the whole batch). verl is set up the way its performance guide
recommends: hybrid engine (vLLM colocated, asleep while training), FSDP2, token-budget
micro-batches (``use_dynamic_bsz``) for the update and both log-prob passes, and padding
removal. It runs as ``python -m verl.trainer.main_ppo`` with hydra overrides
(``verl_overrides``); per-step metrics come from verl's file logger (JSONL).

    python bench/bench_verl_grpo.py --model WORK/qwen2.5-1.5b --data WORK/prompts_256.parquet --out verl.json

How it differs from flowrl's and TRL's step:
- Padding removal needs the ``flash_attn`` package (verl packs a micro-batch into one row
  with no mask). ``--attn auto`` uses it where it is installed, else sdpa on padded rows
  (which with ``--lengths fixed`` hold no padding: every row is prompt + response long).
- verl's vLLM server masks every token id at or past ``len(tokenizer)``; the random shapes'
  tokenizer is padded to the model's vocabulary (``flowrl.models.tiny.make_tokenizer``), so
  no id is masked and ``--lengths real`` samples the same lengths as flowrl and TRL.
- The old log-prob pass also computes entropy (verl always does), and the reward runs in
  verl's reward workers while vLLM generates.
- ``--max-tokens-per-gpu`` (default 16 * (prompt + response), flowrl's micro-batch of 16)
  is the token budget of every pass: update, old log-probs, reference.
- Peak memory is the training worker's (``torch.cuda.max_memory_allocated``); vLLM runs in
  its own processes and is not counted.

The reward is a pseudo-random score (CRC32 of the response text and a call counter, from a
file written next to the data), so GRPO groups are not all-equal. Needs ``verl`` (0.9.1) and
its import-time dependencies, vLLM and Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/perf.py

# flowrl's stage name -> verl's timing metric (verl.trainer.ppo.v1.trainer_base)
STAGE_METRICS = {
    "generate": "timing_s/gen",
    "reward": "timing_s/reward",
    "old_logprobs": "timing_s/old_log_prob",
    "ref": "timing_s/ref",
    "adv": "timing_s/adv",
    "update": "timing_s/update_actor",
    "weight_sync": "timing_s/update_weights",
}

REWARD_SOURCE = '''"""A pseudo-random reward for timing runs (written by flowrl's bench_verl_grpo.py)."""
import zlib

_calls = [0]


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """CRC32 of this worker's call count and the response text, scaled to [0, 1)."""
    _calls[0] += 1
    return zlib.crc32(f"{_calls[0]}:{solution_str}".encode()) / 2**32
'''


def write_verl_rows(src: str, dst: Path, prompts: int, steps: int) -> int:
    """The first ``prompts * steps`` rows of bench_grpo.py's prompt file, as verl's RL dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(src).to_pylist()
    keep = min(len(rows), prompts * steps) // prompts * prompts
    if keep == 0:
        raise ValueError(f"{src}: {len(rows)} rows, fewer than one batch of --prompts={prompts}")
    out = []
    for i, row in enumerate(rows[:keep]):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        answer = (row.get("reward_model") or {}).get("ground_truth", "")
        out.append(
            {
                "prompt": messages,
                "data_source": row.get("data_source") or "flowrl/bench",
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {"index": i, "split": "train"},
            }
        )
    pq.write_table(pa.Table.from_pylist(out), dst)
    return keep


def attention(choice: str) -> tuple[str, bool]:
    """(attn_implementation, use_remove_padding): flash attention with padding removal where it exists."""
    import importlib.util

    if choice == "auto":
        choice = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    return choice, choice.startswith("flash")


def verl_overrides(
    args: argparse.Namespace, model: str, data: str, reward_file: str, run_dir: str
) -> list[str]:
    """Hydra overrides of verl's ``ppo_trainer`` config for one GRPO step per rollout."""
    attn, remove_padding = attention(args.attn)
    budget = args.max_tokens_per_gpu or 16 * (args.prompt_len + args.response_len)
    arr = "actor_rollout_ref"
    return [
        "algorithm.adv_estimator=grpo",
        "algorithm.use_kl_in_reward=false",
        f"data.train_files=[{data}]",
        f"data.val_files=[{data}]",
        f"data.train_batch_size={args.prompts}",
        f"data.max_prompt_length={args.prompt_len}",
        f"data.max_response_length={args.response_len}",
        "data.shuffle=false",
        f"{arr}.model.path={model}",
        f"{arr}.model.use_remove_padding={str(remove_padding).lower()}",
        f"+{arr}.model.override_config.attn_implementation={attn}",
        f"{arr}.model.enable_gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"{arr}.actor.strategy=fsdp2",
        f"{arr}.actor.optim.lr=1e-6",
        f"{arr}.actor.ppo_mini_batch_size={args.prompts}",
        f"{arr}.actor.ppo_epochs=1",
        f"{arr}.actor.use_dynamic_bsz=true",
        f"{arr}.actor.ppo_max_token_len_per_gpu={budget}",
        f"{arr}.actor.use_kl_loss={str(args.beta > 0).lower()}",
        f"{arr}.actor.kl_loss_coef={args.beta}",
        f"{arr}.actor.kl_loss_type=low_var_kl",
        f"{arr}.ref.log_prob_use_dynamic_bsz=true",
        f"{arr}.ref.log_prob_max_token_len_per_gpu={budget}",
        *rollout_overrides(args, budget),
        "reward.custom_reward_function.name=compute_score",
        f"reward.custom_reward_function.path={reward_file}",
        *trainer_overrides(args, run_dir),
        *args.overrides,
    ]


def rollout_overrides(args: argparse.Namespace, budget: int) -> list[str]:
    """vLLM in the hybrid engine: one replica per GPU, asleep (weights and KV cache freed) while training."""
    r = "actor_rollout_ref.rollout"
    return [
        f"{r}.name=vllm",
        f"{r}.mode=async",
        f"{r}.tensor_model_parallel_size=1",
        f"{r}.n={args.n}",
        f"{r}.temperature=1.0",
        f"{r}.top_p=1.0",
        f"{r}.top_k=-1",
        f"{r}.ignore_eos={str(args.lengths == 'fixed').lower()}",
        f"{r}.gpu_memory_utilization={args.gpu_memory_utilization}",
        f"{r}.max_model_len={args.prompt_len + args.response_len}",
        f"{r}.free_cache_engine=true",
        f"{r}.enforce_eager={str(not args.cuda_graphs).lower()}",
        f"{r}.log_prob_use_dynamic_bsz=true",
        f"{r}.log_prob_max_token_len_per_gpu={budget}",
    ]


def trainer_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    """``--steps`` steps on ``--gpus`` GPUs; no critic, validation, checkpoints or wandb."""
    return [
        f"trainer.total_training_steps={args.steps}",
        "trainer.n_gpus_per_node=" + str(args.gpus),
        "trainer.nnodes=1",
        "trainer.critic_warmup=0",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={run_dir}/checkpoints",
        "trainer.logger=[console,file]",
        "trainer.project_name=flowrl-bench",
        "trainer.experiment_name=verl-grpo",
        f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH={run_dir}/metrics.jsonl",
    ]


def run_verl(overrides: list[str], run_dir: Path) -> None:
    """``python -m verl.trainer.main_ppo`` in ``run_dir``, its output teed to ``run_dir/verl.log``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", VERL_FILE_LOGGER_PATH=str(run_dir / "metrics.jsonl"))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # bench_grpo.sh sets it for flowrl; verl keeps vLLM's
    command = [sys.executable, "-m", "verl.trainer.main_ppo", f"hydra.run.dir={run_dir}/hydra", *overrides]
    with open(run_dir / "verl.log", "w") as log:
        proc = subprocess.Popen(
            command, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            log.write(line)
            print(line, end="", flush=True)
    if proc.wait():
        raise RuntimeError(f"verl exited with status {proc.returncode}; its output is in {run_dir}/verl.log")


def read_metrics(path: Path) -> list[dict[str, float]]:
    """verl's file-logger lines, one per training step: the numeric metrics of each."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: verl wrote no metrics; its output is in {path.parent}/verl.log")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["step"])
    return [{k: float(v) for k, v in r["data"].items() if isinstance(v, (int, float))} for r in rows]


def summarize(
    args: argparse.Namespace, rows: list[dict[str, float]], peak_flops: float, n_params: int
) -> dict:
    from perf import stage_shares, steady_state, step_mfu, workload

    med = steady_state(rows, args.warmup)
    seconds = {stage: med[key] for stage, key in STAGE_METRICS.items() if key in med}
    tokens_per_s_gpu = med["perf/throughput"]  # (prompt + response tokens of the step) / step time / GPUs
    attn, remove_padding = attention(args.attn)
    import verl

    return {
        "engine": f"verl {verl.__version__} main_ppo (GRPO, FSDP2, vLLM hybrid engine)",
        "model": args.model,
        "params": n_params,
        "gpus": args.gpus,
        **workload(args),
        "beta": args.beta,
        "max_tokens_per_gpu": args.max_tokens_per_gpu or 16 * (args.prompt_len + args.response_len),
        "attn_implementation": attn,
        "use_remove_padding": remove_padding,
        "steps_measured": len(rows) - args.warmup,
        "step_times_s": [r["timing_s/step"] for r in rows],
        "step_s": med["timing_s/step"],
        "tokens_per_step": med["perf/total_num_tokens"],
        "response_length_mean": med["response_length/mean"],
        "tokens_per_s_per_gpu": tokens_per_s_gpu,
        "stage_s": seconds,
        "stage_share": stage_shares(seconds),
        "matmul_peak_tflops": peak_flops / 1e12,
        "step_mfu": step_mfu(n_params, tokens_per_s_gpu, peak_flops, 12 if args.beta > 0 else 10),
        "peak_allocated_gib": max(r.get("actor/perf/max_memory_allocated_gb", 0.0) for r in rows),
        "peak_reserved_gib": max(r.get("actor/perf/max_memory_reserved_gb", 0.0) for r in rows),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model folder make_random_model wrote")
    p.add_argument("--data", required=True, help="bench_grpo.py's prompt file (parquet)")
    p.add_argument("--out", default="", help="write the summary JSON here")
    p.add_argument("--workdir", default="", help="verl's run folder (default: a new temporary one)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs: one FSDP rank and one vLLM replica each")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="steps in all, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient (> 0 loads a reference model)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--lengths", choices=["fixed", "real"], default="fixed",
                   help="fixed: ignore EOS, every response --response-len tokens; real: stop at EOS")
    p.add_argument("--max-tokens-per-gpu", type=int, default=0,
                   help="token budget of a micro-batch (0: 16 * (prompt + response))")
    p.add_argument("--attn", default="auto", choices=["auto", "flash_attention_2", "sdpa"],
                   help="auto: flash_attention_2 with padding removal if flash_attn is installed, else sdpa")
    p.add_argument("--eager", dest="cuda_graphs", action="store_false", help="vLLM without CUDA graphs")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 matmul peak; 0: measure it")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more verl overrides, e.g. actor_rollout_ref.rollout.max_num_seqs=512")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    from perf import count_folder_parameters, emit, matmul_peak_flops

    run_dir = Path(args.workdir or tempfile.mkdtemp(prefix="verl-bench-")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    data = run_dir / "prompts.parquet"
    write_verl_rows(args.data, data, args.prompts, args.steps)
    reward_file = run_dir / "reward.py"
    reward_file.write_text(REWARD_SOURCE)
    model = str(Path(args.model).resolve())
    run_verl(verl_overrides(args, model, str(data), str(reward_file), str(run_dir)), run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    peak = args.peak_tflops * 1e12 if args.peak_tflops > 0 else matmul_peak_flops("cuda")  # GPU free now
    result = summarize(args, rows, peak, count_folder_parameters(model))
    emit(result, args.out)


if __name__ == "__main__":
    main()
