"""SFT sequences with a loss mask on exactly the response (+EOS), and preference pairs."""

import pytest
import torch

from flowrl.data import PreferenceDataset, RowError, SequenceDataConfig, SFTDataset, write_rows
from flowrl.keys import Keys
from flowrl.models.tiny import make_tokenizer

# tiny tokenizer: pad 0, eos 1, "<|user|>" 260, "<|assistant|>" 261, "\n" 201, ASCII c -> ord(c) - 30
USER, ASSISTANT, NEWLINE, PAD, EOS = 260, 261, 201, 0, 1
PROMPT_1_PLUS_2 = [USER, 19, 13, 20, NEWLINE, ASSISTANT]  # "<|user|>1+2\n<|assistant|>"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_loss_mask_covers_exactly_response_and_eos(tmp_path, tok):
    rows = [
        {"prompt": user("1+2"), "response": "3"},
        {"messages": user("1+2") + [{"role": "assistant", "content": "13"}]},
    ]
    ds = SFTDataset(write_rows(tmp_path / "sft.jsonl", rows), tok)
    batch = ds.collate([0, 1])
    three, one = ord("3") - 30, ord("1") - 30
    assert batch[Keys.INPUT_IDS].tolist() == [
        PROMPT_1_PLUS_2 + [three, EOS, PAD],
        PROMPT_1_PLUS_2 + [one, three, EOS],
    ]
    assert batch[Keys.ATTENTION_MASK].tolist() == [[1] * 8 + [0], [1] * 9]
    assert batch[Keys.LOSS_MASK].dtype == torch.float32
    assert batch[Keys.LOSS_MASK].tolist() == [[0.0] * 6 + [1.0, 1.0, 0.0], [0.0] * 6 + [1.0, 1.0, 1.0]]


def test_sft_rows_need_a_response(tmp_path, tok):
    path = write_rows(tmp_path / "sft.jsonl", [{"prompt": user("a"), "response": "b"}, {"prompt": user("a")}])
    with pytest.raises(RowError, match=r"sft\.jsonl row 1 \(line 2\): missing 'response'"):
        SFTDataset(path, tok)
    path = write_rows(tmp_path / "sft2.jsonl", [{"messages": user("a") + user("b")}])
    with pytest.raises(RowError, match=r"row 0 \(line 1\): a conversation must end with an assistant turn after a"):
        SFTDataset(path, tok)


def test_sft_length_policy(tmp_path, tok):
    rows = [{"prompt": user("1+2"), "response": "3"}, {"prompt": user("1+2"), "response": "12345"}]
    path = write_rows(tmp_path / "sft.parquet", rows)
    filtered = SFTDataset(path, tok, SequenceDataConfig(max_length=8))
    assert filtered.stats == {"n_rows": 2, "n_filtered": 1, "n_truncated": 0, "n_kept": 1}
    cut = SFTDataset(path, tok, SequenceDataConfig(max_length=8, overlong="truncate_right"))
    assert cut.stats["n_truncated"] == 1
    assert cut.items[1].response_ids == [ord("1") - 30, ord("2") - 30]  # no room left for EOS
    with pytest.raises(ValueError, match=r"row 1: sequence has 12 tokens, more than data.max_length=8"):
        SFTDataset(path, tok, SequenceDataConfig(max_length=8, overlong="error"))


def test_preference_pairs_share_one_width(tmp_path, tok):
    rows = [{"prompt": user("1+2"), "chosen": "3", "rejected": "45"}]
    batch = PreferenceDataset(write_rows(tmp_path / "pairs.jsonl", rows), tok).collate([0])
    three, four, five = (ord(c) - 30 for c in "345")
    assert batch[Keys.CHOSEN_IDS].tolist() == [PROMPT_1_PLUS_2 + [three, EOS, PAD]]
    assert batch[Keys.CHOSEN_MASK].tolist() == [[1] * 8 + [0]]
    assert batch[Keys.REJECTED_IDS].tolist() == [PROMPT_1_PLUS_2 + [four, five, EOS]]
    assert batch[Keys.REJECTED_MASK].tolist() == [[1] * 9]


def test_preference_rows_need_both_answers(tmp_path, tok):
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": user("q"), "chosen": "a"}])
    with pytest.raises(RowError, match=r"row 0 \(line 1\): missing 'rejected'"):
        PreferenceDataset(path, tok)


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_trl_prompt_completion_rows_equal_the_prompt_response_form(tmp_path, tok):
    rows = [
        {"prompt": user("1+2"), "response": "3"},
        {"prompt": user("1+2"), "completion": "3"},  # TRL: standard completion
        {"prompt": user("1+2"), "completion": assistant("3")},  # TRL: conversational prompt-completion
    ]
    ds = SFTDataset(write_rows(tmp_path / "sft.jsonl", rows), tok)
    assert ds.items[0] == ds.items[1] == ds.items[2]
    text = SFTDataset(write_rows(tmp_path / "text.jsonl", [{"prompt": "1+2=", "completion": "3"}]), tok)
    assert text.items[0].prompt_ids == [ord(c) - 30 for c in "1+2="]  # plain text: no chat template
    assert text.items[0].response_ids == [ord("3") - 30, EOS]
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": user("q"), "completion": user("a")}])
    with pytest.raises(RowError, match=r"row 0 \(line 1\): a conversation must end with an assistant turn"):
        SFTDataset(bad, tok)


def test_trl_conversational_preference_rows(tmp_path, tok):
    explicit = {"prompt": user("1+2"), "chosen": assistant("3"), "rejected": assistant("45")}
    implicit = {"chosen": user("1+2") + assistant("3"), "rejected": user("1+2") + assistant("45")}
    plain = {"prompt": user("1+2"), "chosen": "3", "rejected": "45"}
    ds = PreferenceDataset(write_rows(tmp_path / "pairs.jsonl", [explicit, implicit, plain]), tok)
    assert ds.items[0] == ds.items[1] == ds.items[2]
    for bad, words in [
        ({"chosen": user("1+2") + assistant("3"), "rejected": user("1+3") + assistant("4")}, "missing, and chosen"),
        ({"prompt": user("q"), "chosen": user("q") + assistant("a"), "rejected": "b"}, "hold only the answer"),
        ({"chosen": "a", "rejected": "b"}, "missing, and chosen and rejected are not conversations"),
    ]:
        with pytest.raises(RowError, match=words):
            PreferenceDataset(write_rows(tmp_path / "bad.jsonl", [bad]), tok)
