import pickle

import pytest
import torch

from flowrl.batch import Batch
from flowrl.keys import Keys


def make(n: int = 4) -> Batch:
    return Batch(
        {Keys.RESPONSE_IDS: torch.arange(n * 3).reshape(n, 3), Keys.SCORES: torch.arange(n).float()},
        {Keys.RESPONSE_TEXT: [f"r{i}" for i in range(n)], Keys.EXTRA_INFO: [{"i": i} for i in range(n)]},
        meta={"step": 7},
    )


def test_getitem_key_and_index():
    b = make()
    assert b[Keys.RESPONSE_TEXT] == ["r0", "r1", "r2", "r3"]
    sub = b[torch.tensor([3, 1])]
    assert sub[Keys.SCORES].tolist() == [3.0, 1.0]
    assert sub[Keys.RESPONSE_TEXT] == ["r3", "r1"]
    assert sub[Keys.EXTRA_INFO] == [{"i": 3}, {"i": 1}]
    assert sub.meta == {"step": 7}
    assert b[1:3][Keys.RESPONSE_TEXT] == ["r1", "r2"]
    assert len(b[2]) == 1 and b[2][Keys.RESPONSE_TEXT] == ["r2"]
    assert b[torch.tensor([True, False, False, True])][Keys.RESPONSE_TEXT] == ["r0", "r3"]
    with pytest.raises(KeyError, match="no key 'missing'"):
        b["missing"]


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="differ"):
        Batch({Keys.SCORES: torch.zeros(3)}, {Keys.RESPONSE_TEXT: ["a", "b"]})
    b = make()
    with pytest.raises(ValueError, match="3 values for a batch of 4"):
        b[Keys.ADVANTAGES] = torch.zeros(3)


def test_select_and_union():
    b = make()
    s = b.select(Keys.SCORES, Keys.RESPONSE_TEXT)
    assert sorted(s.keys()) == sorted([Keys.SCORES, Keys.RESPONSE_TEXT])
    extra = Batch({Keys.ADVANTAGES: torch.ones(4, 3)}, meta={"temperature": 1.0})
    u = b | extra
    assert sorted(u.keys()) == sorted(b.keys() + [Keys.ADVANTAGES])
    assert u.meta == {"step": 7, "temperature": 1.0}
    # equal values under the same key are fine; different ones are refused
    assert len(b | b.select(Keys.SCORES)) == 4
    clash = Batch({Keys.SCORES: torch.ones(4)})
    with pytest.raises(ValueError, match="scores"):
        b | clash
    with pytest.raises(ValueError, match="response_text"):
        b | Batch(non_tensors={Keys.RESPONSE_TEXT: list("abcd")})
    with pytest.raises(KeyError, match="missing keys"):
        b.select("nope")


def test_chunk_concat_roundtrip():
    b = make(6)
    parts = b.chunk(3)
    assert [len(p) for p in parts] == [2, 2, 2]
    assert parts[1][Keys.RESPONSE_TEXT] == ["r2", "r3"]
    back = Batch.concat(parts)
    assert torch.equal(back[Keys.RESPONSE_IDS], b[Keys.RESPONSE_IDS])
    assert back[Keys.RESPONSE_TEXT] == b[Keys.RESPONSE_TEXT]
    with pytest.raises(ValueError, match="equal parts"):
        b.chunk(4)
    with pytest.raises(ValueError, match="keys"):
        Batch.concat([b, b.select(Keys.SCORES)])
    assert [len(p) for p in make(5).split(2)] == [2, 2, 1]


def test_repeat_interleave_and_tile():
    b = make(2)
    assert b.repeat(3)[Keys.RESPONSE_TEXT] == ["r0", "r0", "r0", "r1", "r1", "r1"]
    assert b.repeat(2, interleave=False)[Keys.RESPONSE_TEXT] == ["r0", "r1", "r0", "r1"]
    assert b.repeat(3)[Keys.SCORES].tolist() == [0, 0, 0, 1, 1, 1]


def test_pad_and_unpad():
    b = make(5)
    padded, pad = b.pad_to_multiple(4)
    assert (len(padded), pad) == (8, 3)
    assert padded[Keys.RESPONSE_TEXT][5:] == ["r0", "r1", "r2"]
    back = padded.unpad(pad)
    assert back[Keys.RESPONSE_TEXT] == b[Keys.RESPONSE_TEXT]
    assert torch.equal(back[Keys.RESPONSE_IDS], b[Keys.RESPONSE_IDS])
    same, zero = b.pad_to_multiple(5)
    assert zero == 0 and same is b
    # a batch smaller than the pad wraps around
    tiny, pad = make(1).pad_to_multiple(3)
    assert pad == 2 and tiny[Keys.RESPONSE_TEXT] == ["r0", "r0", "r0"]


def test_pickle_roundtrip_keeps_dtypes_and_is_writable():
    b = make()
    b["bf"] = torch.randn(4, 2).to(torch.bfloat16)
    b2 = pickle.loads(pickle.dumps(b, protocol=5))
    assert b2["bf"].dtype == torch.bfloat16 and torch.equal(b2["bf"], b["bf"])
    assert torch.equal(b2[Keys.RESPONSE_IDS], b[Keys.RESPONSE_IDS])
    assert b2[Keys.EXTRA_INFO] == b[Keys.EXTRA_INFO] and b2.meta == b.meta
    b2[Keys.SCORES].add_(1)  # writable, and not aliasing the original
    assert b[Keys.SCORES].tolist() == [0, 1, 2, 3]


def test_setitem_pop_and_contains():
    b = make()
    b[Keys.GROUND_TRUTH] = ["1", "2", "3", "4"]
    assert Keys.GROUND_TRUTH in b and b.pop(Keys.GROUND_TRUTH) == ["1", "2", "3", "4"]
    assert Keys.GROUND_TRUTH not in b
    empty = Batch(batch_size=3)
    assert len(empty) == 3 and empty.keys() == []
