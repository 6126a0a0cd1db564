"""The split placement's weight sync between two real processes over gloo: bucketed broadcast from
the trainer's end to a rollout worker's end, bit for bit, and a receiver whose sender goes quiet
fails within the timeout instead of hanging."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from flowrl.engines.weight_transfer import WeightReceiver, WeightSender

MANIFEST = [("embed.weight", (50, 16)), ("layers.0.q.weight", (16, 16)), ("layers.0.norm", (16,)), ("head.bias", (3,))]
CPU = torch.device("cpu")


def weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(name, torch.randn(shape, generator=g)) for name, shape in MANIFEST]


def _sender(address_q, result_q, send: bool, stream_fault: bool) -> None:
    sender = WeightSender(MANIFEST, torch.float32, 1024, 2, CPU)  # 1 KiB buckets: several of them
    address_q.put(sender.address)
    sender.connect(timeout_s=30)
    try:
        if send:
            stream = weights(0)
            if stream_fault:
                stream = stream[:1] + [("layers.0.q.weight", torch.zeros(8, 8))] + stream[2:]
            result_q.put(("sent", sender.send(stream)))
        else:
            time.sleep(8)  # quiet: never sends (the receiver's timeout is 3 s)
            result_q.put(("sent", None))
    except ValueError as e:
        result_q.put(("sender_error", str(e)))


def _receiver(address_q, result_q, timeout_s: float) -> None:
    receiver = WeightReceiver(MANIFEST, torch.float32, 1024, CPU)
    receiver.connect(address_q.get(timeout=30), 1, timeout_s)
    start = time.monotonic()
    try:
        got = receiver.receive()
        same = [n for (n, t), (m, u) in zip(got, weights(0)) if n == m and torch.equal(t, u)]
        result_q.put(("received", [n for n, _ in got], same, len(receiver.buckets)))
    except RuntimeError as e:
        result_q.put(("receiver_error", time.monotonic() - start, str(e)[:200]))


def run_pair(send: bool, timeout_s: float = 30, stream_fault: bool = False) -> dict[str, tuple]:
    ctx = mp.get_context("spawn")
    address_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_sender, args=(address_q, result_q, send, stream_fault)),
             ctx.Process(target=_receiver, args=(address_q, result_q, timeout_s))]  # fmt: skip
    for p in procs:
        p.start()
    results = {}
    for _ in range(2):
        item = result_q.get(timeout=90)
        results[item[0]] = item[1:]
        if stream_fault and item[0] == "sender_error":
            break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return results


def test_weights_arrive_bit_for_bit_in_buckets() -> None:
    res = run_pair(send=True)
    names, same, buckets = res["received"]
    assert names == [n for n, _ in MANIFEST] and same == names
    assert buckets > 1
    assert res["sent"][0]["bytes"] == sum(t.numel() * 4 for _, t in weights(0))


def test_a_stream_that_does_not_follow_the_manifest_is_refused() -> None:
    res = run_pair(send=True, timeout_s=5, stream_fault=True)
    assert "the manifest has layers.0.q.weight (16, 16)" in res["sender_error"][0]


@pytest.mark.slow
def test_a_receiver_whose_sender_goes_quiet_fails_within_its_timeout() -> None:
    res = run_pair(send=False, timeout_s=3)
    seconds, message = res["receiver_error"]
    assert seconds < 15, seconds
    assert message
