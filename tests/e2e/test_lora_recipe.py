"""GRPO with LoRA adapters (actor.lora) end to end on CPU, and the exports of its checkpoint.

From the SFT warm start of tests/e2e/conftest.py, 10 GRPO steps through real Ray workers, FSDP2
(2 ranks, gloo) over a PEFT-wrapped policy, with a KL loss and vLLM fed the adapters each step:
the reward and the held-out accuracy rise, the sampler's log-probs equal the trainer's, the
reference policy is the actor's base model with the adapters disabled, the final policy folder is a
plain model of the base architecture (adapters merged in), and `flowrl export` writes a merged folder
and a PEFT adapter that transformers and vLLM load. (Resume after SIGKILL with LoRA is bitwise:
tests/e2e/test_fault_injection.py runs its kill-and-resume test with adapters.)"""

from __future__ import annotations

import pytest

from flowrl.config import load_config
from flowrl.drivers.registry import load_driver
from flowrl.quickstart import grpo_overrides
from flowrl.trainer.checkpoint import find_latest
from flowrl.trainer.tracking import read_metrics

pytestmark = pytest.mark.slow

LORA = ["actor.lora.rank=16", "actor.lora.alpha=32", "actor.lora.target_modules=all-linear", "actor.optim.lr=1e-3"]
KL = ["actor.use_kl_loss=true"]  # needs the reference policy: the actor's base model, adapters disabled


def test_lora_grpo_learns_and_exports(warm, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, model, data = warm
    run = tmp_path / "run"
    config = load_config(None, grpo_overrides(cfg, model, data) + [
        f"trainer.run_dir={run}", "trainer.loggers=[jsonl]", "trainer.quiet=true", "trainer.eval_every=0",
        "trainer.total_steps=10", "data.val_max_samples=32", *LORA, *KL,
    ])  # fmt: skip
    assert config.actor.lora.rank == 16
    result = load_driver("grpo").main(config)
    steps = [r for r in read_metrics(str(run)) if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    # LoRA learns: seen reward 0.45 -> 0.80 (first 3 -> last 3 steps), held-out 0.22 -> 0.47 (without the KL loss)
    first = sum(r["reward/mean"] for r in steps[:3]) / 3
    last = sum(r["reward/mean"] for r in steps[-3:]) / 3
    assert last > first + 0.15, [r["reward/mean"] for r in steps]
    assert result["val/accuracy"] > result["val/accuracy_before"] + 0.1, result
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in steps)  # each adapter sync reached vLLM
    assert all(r["actor/grad_norm"] > 0 for r in steps)
    # the reference is the base model: at step 1 the policy still is (B = 0), then it moves away
    assert steps[0]["kl_ref/k1"] == 0.0 and steps[1]["kl_ref/k1"] != 0.0
    assert "actor/kl_loss/kl_loss" in steps[0]
    assert find_latest(run / "checkpoints").step == 10
    policy = AutoModelForCausalLM.from_pretrained(run / "policy", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
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
    with_adapter, base_alone = run_plain(_vllm_greedy, model, str(tmp_path / "adapter"))
    _, merged_out = run_plain(_vllm_greedy, str(tmp_path / "merged"), None)
    assert with_adapter == merged_out and with_adapter != base_alone


def _vllm_greedy(model: str, adapter: str | None) -> tuple[list, list]:
    """Greedy continuations of a few prompts in vLLM: with the adapter (if any), and without."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prompts = [TokensPrompt(prompt_token_ids=[5 + i, 40, 41, 42 + i]) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    lora = {"enable_lora": True, "max_lora_rank": 16} if adapter else {}
    llm = LLM(model=model, max_model_len=128, enforce_eager=True, dtype="float32", **lora)

    def continuations(**kw):
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False, **kw)]

    with_adapter = continuations(lora_request=LoRARequest("policy", 1, adapter)) if adapter else []
    return with_adapter, continuations()
