"""HostCopy (flowrl/engines/offload.py): storages leave and come back byte for byte."""

from __future__ import annotations

import pytest
import torch

from flowrl.engines.offload import HostCopy


def raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (NaN == NaN, -0.0 != 0.0)."""
    return t.detach().clone().view(torch.uint8)


def test_round_trip_is_bitwise_and_keeps_objects_and_views() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    buffer = torch.randn(10, generator=gen).to(torch.bfloat16)
    view = buffer[2:7]  # a view: its storage is the buffer's, copied once
    odd = torch.tensor([float("nan"), -0.0, float("inf")])  # bit patterns == cannot compare
    counts = torch.arange(5, dtype=torch.int64)
    tensors = [weight, buffer, view, odd, counts]
    before = [t.detach().clone() for t in tensors]
    bits = [raw(t) for t in tensors]
    copy = HostCopy()
    moved = copy.offload(tensors)
    assert moved == 6 * 4 * 4 + 10 * 2 + 3 * 4 + 5 * 8  # the view's storage counted once
    assert copy.offloaded and copy.nbytes == moved
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    with pytest.raises(RuntimeError, match="already offloaded"):
        copy.offload(tensors)
    copy.onload()
    assert not copy.offloaded and copy.nbytes == 0
    assert all(torch.equal(a, raw(t)) for a, t in zip(bits, tensors))
    assert torch.equal(view, before[2]) and view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    copy.onload()  # nothing offloaded: a no-op
    # the host buffers are reused on the next round trip, and the values still come back
    host = list(copy._host)
    weight.data.mul_(2)
    copy.offload(tensors)
    assert all(a is b for a, b in zip(host, copy._host))
    copy.onload()
    assert torch.equal(weight.detach(), before[0] * 2)


def test_an_optimizer_step_after_a_round_trip_is_the_step_without_one() -> None:
    def run(round_trip: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        x = torch.randn(4, 8)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            if round_trip:
                state = [v for s in opt.state.values() for v in s.values() if v.dim() > 0]
                copy = HostCopy()
                copy.offload([*model.parameters(), *state])
                copy.onload()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(True), run(False))
