"""The tiny GRPO recipe with LoRA adapters (actor.lora), 2 steps end to end on CPU.

Real Ray workers, FSDP2 (2 ranks, gloo) over a PEFT-wrapped policy and vLLM fed the merged
weights each step: the sampler's log-probs still equal the trainer's, the first mini-batch
of each step starts exactly at the rollout policy, the reference policy (a KL loss) is the
actor's base model with the adapters disabled, and the final policy folder is a plain model
of the base architecture (adapters merged in) that transformers loads. And LoRA learns: from the
SFT warm start of the asynchronous test (tests/e2e/conftest.py), 10 GRPO steps with adapters alone
raise the reward and the held-out accuracy. (Resume after SIGKILL with LoRA is bitwise:
tests/e2e/test_fault_injection.py runs its kill-and-resume test with adapters.)
"""

from __future__ import annotations

import pytest

from flowrl.config import load_config
from flowrl.drivers.registry import load_driver
from flowrl.models.tiny import make_tiny_model
from flowrl.quickstart import grpo_overrides
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.checkpoint import find_latest
from flowrl.trainer.tracking import read_metrics

pytestmark = pytest.mark.slow

LORA = ["actor.lora.rank=8", "actor.lora.alpha=16", "actor.lora.target_modules=all-linear", "actor.optim.lr=1e-2"]
KL = ["actor.use_kl_loss=true"]  # needs the reference policy: the actor's base model, adapters disabled


def test_grpo_with_lora_two_steps(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    make_tiny_model(tmp_path / "model", seed=0)
    splits = write_splits(tmp_path / "data", n_train=64, n_test=16, level=1, seed=0)
    run = tmp_path / "run"
    overrides = [
        f"actor.model.path={tmp_path / 'model'}",
        f"data.train_files=[{splits['train']}]",
        f"data.val_files=[{splits['test']}]",
        f"trainer.run_dir={run}",
        "trainer.total_steps=2",
        "trainer.loggers=[jsonl]",
        "data.val_max_samples=16",
        *LORA,
        *KL,
        # scores that vary within a group (the random tiny model answers nothing right): a gradient
        "reward.function=tests.e2e.dapo_rewards:half_all_equal",
    ]
    cfg = load_config("recipes/grpo_arithmetic_tiny.yaml", overrides)
    assert cfg.actor.lora.rank == 8
    result = load_driver(cfg.trainer.algorithm).main(cfg)
    assert 0.0 <= result["val/accuracy"] <= 1.0
    steps = [r for r in read_metrics(str(run)) if "actor/ppo_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["actor/first_ppo_kl"] == 0.0 and r["actor/first_clipfrac"] == 0.0 for r in steps)
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in steps)  # the merged sync reached vLLM
    assert all(r["actor/grad_norm"] > 0 for r in steps)
    # the reference is the base model: at step 1 the policy still is (B = 0), then it moves away
    assert steps[0]["kl_ref/k1"] == 0.0 and steps[1]["kl_ref/k1"] != 0.0
    assert "actor/kl_loss/kl_loss" in steps[0]
    assert find_latest(run / "checkpoints").step == 2
    policy = AutoModelForCausalLM.from_pretrained(run / "policy", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert sorted(policy.state_dict()) == sorted(base.state_dict())  # no adapter names: merged
    moved = [n for n, w in base.state_dict().items() if not torch.equal(w, policy.state_dict()[n])]
    assert moved and all("proj" in n for n in moved)  # only the adapted Linear layers changed

    # flowrl export from the step folder: the merged folder equals the run's policy; the adapter
    # alone (PEFT format) on the base model gives the same logits in transformers, and the same
    # greedy continuations in vLLM (base model + LoRARequest) as the merged folder
    from flowrl.cli import main as cli

    step = find_latest(run / "checkpoints").path
    assert cli(["export", str(step), "--out", str(tmp_path / "merged")]) == 0
    assert cli(["export", str(step), "--adapter", "--out", str(tmp_path / "adapter")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert all(torch.equal(w, policy.state_dict()[n]) for n, w in merged.state_dict().items())
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(4, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    import os

    from tests.integration.multirank import run_plain

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    with_adapter, base_alone = run_plain(_vllm_greedy, str(tmp_path / "model"), str(tmp_path / "adapter"))
    _, merged_out = run_plain(_vllm_greedy, str(tmp_path / "merged"), None)
    assert with_adapter == merged_out and with_adapter != base_alone


def test_lora_grpo_raises_the_reward(warm, tmp_path):
    cfg, model, data = warm
    run = tmp_path / "run"
    config = load_config(None, grpo_overrides(cfg, model, data) + [
        f"trainer.run_dir={run}", "trainer.loggers=[jsonl]", "trainer.quiet=true", "trainer.eval_every=0",
        "trainer.total_steps=10", "data.val_max_samples=32",
        "actor.lora.rank=16", "actor.lora.alpha=32", "actor.lora.target_modules=all-linear", "actor.optim.lr=1e-3",
    ])  # fmt: skip
    result = load_driver("grpo").main(config)
    rows = [r for r in read_metrics(str(run)) if "actor/pg_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11))
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    # seen: reward 0.45 -> 0.80 (first 3 -> last 3 steps), held-out 0.22 -> 0.47
    assert last > first + 0.15, [r["reward/mean"] for r in rows]
    assert result["val/accuracy"] > result["val/accuracy_before"] + 0.1, result
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in rows)  # each adapter sync reached vLLM


def _vllm_greedy(model: str, adapter: str | None) -> tuple[list, list]:
    """Greedy continuations of a few prompts in vLLM: with the adapter (if any), and without."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prompts = [TokensPrompt(prompt_token_ids=[5 + i, 40, 41, 42 + i]) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    lora = {"enable_lora": True, "max_lora_rank": 8} if adapter else {}
    llm = LLM(model=model, max_model_len=128, enforce_eager=True, dtype="float32", **lora)

    def continuations(**kw):
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False, **kw)]

    with_adapter = continuations(lora_request=LoRARequest("policy", 1, adapter)) if adapter else []
    return with_adapter, continuations()
