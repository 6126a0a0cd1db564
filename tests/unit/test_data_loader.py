"""Prompt-length policy, left padding (hand-checked ids) and the resumable sampler."""

import json

import pytest
import torch

from flowrl.data import DataLoader, PromptDataConfig, PromptDataset, PromptSampler, write_rows
from flowrl.keys import Keys
from flowrl.models.tiny import make_tokenizer

# The tiny byte-level tokenizer: pad 0, "<|user|>" 260, "<|assistant|>" 261, "\n" 201,
# and printable ASCII character c -> ord(c) - 30 (e.g. "1" -> 19, "+" -> 13, "h" -> 74).
USER, ASSISTANT, NEWLINE, PAD = 260, 261, 201, 0


def row(content: str, truth: str = "0") -> dict:
    return {
        "prompt": [{"role": "user", "content": content}],
        "data_source": "flowrl/arithmetic",
        "reward_model": {"style": "rule", "ground_truth": truth},
    }


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_left_padding_matches_hand_computed_ids(tmp_path, tok):
    path = write_rows(tmp_path / "p.jsonl", [row("1+2", "3"), row("hi", "x")])
    batch = PromptDataset(path, tok).collate([0, 1])
    assert tok.pad_token_id == PAD
    expected = torch.tensor(
        [
            [USER, 19, 13, 20, NEWLINE, ASSISTANT],
            [PAD, USER, 74, 75, NEWLINE, ASSISTANT],
        ]
    )
    assert torch.equal(batch[Keys.PROMPT_IDS], expected)
    assert batch[Keys.PROMPT_MASK].dtype == torch.int64
    assert batch[Keys.PROMPT_MASK].tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert batch[Keys.PROMPT_TEXT] == ["<|user|>1+2\n<|assistant|>", "<|user|>hi\n<|assistant|>"]


def overlong_file(tmp_path):
    # prompt tokens = len(content) + 3 (user, newline, assistant): 5, 8, 13, 6
    return write_rows(tmp_path / "p.jsonl", [row("ab"), row("abcde"), row("abcdefghij"), row("xyz")])


def test_overlong_filter_counts(tmp_path, tok):
    ds = PromptDataset(overlong_file(tmp_path), tok, PromptDataConfig(max_prompt_length=8, overlong="filter"))
    assert ds.stats == {"n_rows": 4, "n_filtered": 1, "n_truncated": 0, "n_kept": 3}
    assert [len(it.prompt_ids) for it in ds.items] == [5, 8, 6]


def test_overlong_truncate_left_keeps_the_end(tmp_path, tok):
    cfg = PromptDataConfig(max_prompt_length=8, overlong="truncate_left")
    ds = PromptDataset(overlong_file(tmp_path), tok, cfg)
    assert ds.stats == {"n_rows": 4, "n_filtered": 0, "n_truncated": 1, "n_kept": 4}
    # "<|user|>abcdefghij\n<|assistant|>" keeps its last 8 tokens: "efghij\n<|assistant|>"
    e = ord("e") - 30
    assert ds.items[2].prompt_ids == [e, e + 1, e + 2, e + 3, e + 4, e + 5, NEWLINE, ASSISTANT]
    assert ds.items[2].prompt_text == "efghij\n<|assistant|>"
    assert ds.items[1].prompt_ids[0] == USER  # exactly at the limit: untouched


def test_overlong_error_names_the_row(tmp_path, tok):
    path = overlong_file(tmp_path)
    with pytest.raises(ValueError, match=r"p\.jsonl row 2 \(line 3\): prompt has 13 tokens, more than"):
        PromptDataset(path, tok, PromptDataConfig(max_prompt_length=8, overlong="error"))
    with pytest.raises(ValueError, match="data.overlong='clip'"):
        PromptDataConfig(overlong="clip")


# ---- sampler -------------------------------------------------------------------------------
def take(sampler: PromptSampler, k: int) -> list[list[int]]:
    return [sampler.next_indices() for _ in range(k)]


def test_unshuffled_order_and_drop_last_by_hand():
    s = PromptSampler(10, 4, shuffle=False, drop_last=True)
    assert s.steps_per_epoch == 2
    assert take(s, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    s = PromptSampler(10, 4, shuffle=False, drop_last=False)
    assert s.steps_per_epoch == 3
    assert take(s, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_same_seed_same_order_different_seed_different():
    a = take(PromptSampler(50, 5, seed=3), 20)
    b = take(PromptSampler(50, 5, seed=3), 20)
    c = take(PromptSampler(50, 5, seed=4), 20)
    assert a == b and a != c
    for epoch in (a[:10], a[10:]):  # each epoch visits every row once
        assert sorted(i for batch in epoch for i in batch) == list(range(50))
    assert a[:10] != a[10:]  # epochs are shuffled differently


def test_num_epochs_stops():
    s = PromptSampler(6, 4, shuffle=False, drop_last=True, num_epochs=2)
    assert list(s) == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])  # 10 rows, batch 4: mid-epoch and at/after epoch ends
def test_resume_continues_with_identical_batches(k, drop_last):
    reference = take(PromptSampler(10, 4, seed=11, drop_last=drop_last), 12)
    first = PromptSampler(10, 4, seed=11, drop_last=drop_last)
    assert take(first, k) == reference[:k]
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is plain JSON
    resumed = PromptSampler(10, 4, seed=999, drop_last=drop_last)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert take(resumed, 12 - k) == reference[k:]


def test_resume_refuses_a_different_dataset():
    s = PromptSampler(10, 4)
    with pytest.raises(ValueError, match="taken over 10 rows but this dataset has 12"):
        PromptSampler(12, 4).load_state_dict(s.state_dict())


def test_too_few_rows_for_a_batch():
    with pytest.raises(ValueError, match="3 rows, fewer than batch_size=4"):
        PromptSampler(3, 4)


def test_dataloader_batches_follow_the_sampler_and_resume(tmp_path, tok):
    path = write_rows(tmp_path / "p.parquet", [row(f"q{i}", str(i)) for i in range(7)])
    ds = PromptDataset(path, tok)
    loader = DataLoader(ds, batch_size=3, seed=5, num_epochs=3)
    order = PromptSampler(7, 3, seed=5, num_epochs=3)
    batches = list(loader)
    assert len(batches) == 6 and len(loader) == 2
    for batch, indices in zip(batches, order):
        assert batch[Keys.GROUND_TRUTH] == [str(i) for i in indices]
    assert [b.meta["epoch"] for b in batches] == [0, 0, 1, 1, 2, 2]
    again = DataLoader(ds, batch_size=3, seed=5, num_epochs=3)
    for _ in range(3):
        again.next_batch()
    resumed = DataLoader(ds, batch_size=3, seed=0, num_epochs=3)
    resumed.load_state_dict(again.state_dict())
    rest = list(resumed)
    assert [b[Keys.GROUND_TRUTH] for b in rest] == [b[Keys.GROUND_TRUTH] for b in batches[3:]]
    assert torch.equal(rest[0][Keys.PROMPT_IDS], batches[3][Keys.PROMPT_IDS])


def test_plain_text_prompts_are_used_as_they_are(tmp_path, tok):
    """TRL's standard format: a text prompt is the model's input with no chat template (a base model)."""
    text_row = row("ignored") | {"prompt": "Q: 1+2=\nA:"}
    batch = PromptDataset(write_rows(tmp_path / "p.jsonl", [text_row, row("1+2", "3")]), tok).collate([0, 1])
    text_ids = tok("Q: 1+2=\nA:", add_special_tokens=False)["input_ids"]
    assert len(text_ids) == 10 and USER not in text_ids and ASSISTANT not in text_ids
    assert batch[Keys.PROMPT_IDS][0].tolist() == text_ids
    assert batch[Keys.PROMPT_TEXT] == ["Q: 1+2=\nA:", "<|user|>1+2\n<|assistant|>"]
    # an environment's reset still sees chat messages: the text as one user turn
    assert batch[Keys.MESSAGES][0] == [{"role": "user", "content": "Q: 1+2=\nA:"}]
    parquet = PromptDataset(write_rows(tmp_path / "p.parquet", [text_row, text_row]), tok)  # a text column
    assert parquet.collate([1])[Keys.PROMPT_IDS][0].tolist() == text_ids


def test_other_frameworks_columns_are_read_where_the_config_points(tmp_path, tok):
    """OpenRLHF-style rows ({"input": ..., "label": ...}) and TRL-style ({"prompt": ..., "solution": ...})."""
    from flowrl.data import RowError

    rows = [{"input": [{"role": "user", "content": "1+2"}], "label": "3"}]
    path = write_rows(tmp_path / "openrlhf.jsonl", rows)
    with pytest.raises(RowError, match=r"row 0 \(line 1\): missing 'prompt'"):
        PromptDataset(path, tok)
    cfg = PromptDataConfig(prompt_key="input", ground_truth_key="label", data_source="flowrl/arithmetic")
    item = PromptDataset(path, tok, cfg)[0]
    assert (item.prompt_text, item.ground_truth, item.data_source) == ("<|user|>1+2\n<|assistant|>", "3", "flowrl/arithmetic")
    trl = write_rows(tmp_path / "trl.jsonl", [{"prompt": "1+2=", "solution": "3", "data_source": "openai/gsm8k"}])
    with pytest.raises(RowError, match="missing 'reward_model' .*set data.prompts.ground_truth_key"):
        PromptDataset(trl, tok)
    item = PromptDataset(trl, tok, PromptDataConfig(ground_truth_key="solution"))[0]
    assert (item.ground_truth, item.data_source) == ("3", "openai/gsm8k")  # the row's own data_source wins
    no_source = write_rows(tmp_path / "bare.jsonl", [{"prompt": "1+2=", "solution": "3"}])
    with pytest.raises(RowError, match="missing 'data_source' .*set data.prompts.data_source"):
        PromptDataset(no_source, tok, PromptDataConfig(ground_truth_key="solution"))
