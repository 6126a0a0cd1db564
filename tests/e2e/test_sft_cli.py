"""`flowrl sft` on the arithmetic task with the tiny model: real Ray, FSDP2 on 2 ranks, gloo.

The held-out loss must fall well below its start, the metrics file must hold every step,
the Hugging Face folder must load in transformers and in vLLM and answer as the trainer did, and
`flowrl export` of the training checkpoint must give the same weights as that folder.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from flowrl.batch import Batch
from flowrl.cli import main
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics
from tests.integration.multirank import run_plain

pytestmark = pytest.mark.slow  # ~70 s, vLLM's start included

STEPS = 30


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    make_tiny_model(root / "model", seed=0)
    splits = write_splits(root / "data", n_train=256, n_test=16, level=1, seed=0)
    argv = [
        "sft",
        "--model-path", str(root / "model"),
        "--train-files", splits["sft_train"],
        "--val-files", splits["sft_test"],
        "--out-dir", str(root / "out"),
        "--steps", str(STEPS),
        "--batch-size", "16",
        "--micro-batch-size", "4",
        "--lr", "1e-3",
        "--num-workers", "2",
        "--eval-every", "10",
        "--greedy-samples", "6",
        "--max-new-tokens", "4",
        "--save-checkpoint",
        "--loggers", "jsonl",
    ]  # fmt: skip
    assert main(argv) == 0
    return root


def test_held_out_loss_drops_and_every_step_is_logged(run):
    rows = read_metrics(str(run / "out"))
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for key in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "train/tokens"):
        assert all(r[key] > 0 for r in steps), key
    before = rows[0]["val/loss_before"]
    evals = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(evals) == 3  # steps 10 and 20, then the end
    assert before > 4.0  # a random model over ~260 tokens: about log(262) = 5.6
    assert evals[-1] < 0.4 * before, (before, evals)
    first, last = (sum(r["train/loss"] for r in part) / 5 for part in (steps[:5], steps[-5:]))
    assert last < 0.5 * first


def test_saved_folder_answers_like_the_trainer(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "out" / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(run / "out" / "model")
    samples = [json.loads(line) for line in (run / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    for s in samples:
        ids = tok(s["prompt"], return_tensors="pt").input_ids  # [1, p]: the chat-formatted prompt
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == s["response"]


def _vllm_greedy(model_dir: str, prompts: list[str]) -> list[str]:
    """vLLM's greedy answers with flowrl's rollout engine (engine core in this process)."""
    from flowrl.data.dataset import tokenize_texts
    from flowrl.data.padding import left_pad
    from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig

    rollout = VLLMRollout(VLLMRolloutConfig(model_path=model_dir, max_model_len=128, warmup=False))
    tok = rollout.llm.get_tokenizer()
    ids, mask = left_pad(tokenize_texts(tok, prompts), rollout.pad_token_id)
    out = rollout.generate(Batch({Keys.PROMPT_IDS: ids, Keys.PROMPT_MASK: mask}), temperature=0.0, max_tokens=4)
    rows = zip(out[Keys.RESPONSE_IDS], out[Keys.RESPONSE_MASK])
    return [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in rows]


def test_saved_folder_loads_in_vllm_and_answers_like_the_trainer(run):
    samples = [json.loads(line) for line in (run / "out" / "samples.jsonl").read_text().splitlines()]
    answers = run_plain(_vllm_greedy, str(run / "out" / "model"), [s["prompt"] for s in samples])
    assert answers == [s["response"] for s in samples]


def test_export_of_the_checkpoint_equals_the_saved_folder(run, capsys):
    out = run / "exported"
    assert (
        main(["export", str(run / "out" / "checkpoint"), "--base", str(run / "model"), "--out", str(out)])
        == 0
    )
    assert "loads in transformers" in capsys.readouterr().out
    exported, saved = (
        load_file(out / "model.safetensors"),
        load_file(run / "out" / "model" / "model.safetensors"),
    )
    initial = load_file(run / "model" / "model.safetensors")
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    assert not all(torch.equal(initial[k], saved[k]) for k in saved)  # training moved the weights
