"""Move a ~1 GB batch through Ray: flowrl's Batch pickling against a plain TensorDict.

    python bench/bench_batch_transfer.py [--gb 1.0] [--repeats 5]

Paths, each timed ``--repeats`` times (median and best reported, GB/s of payload):
  put       ray.put in the driver (serialize into the object store)
  get       ray.get in the driver (deserialize out of it)
  actor     driver -> an actor method that returns its argument -> driver (the payload
            crosses the object store twice, so this figure is payload / round-trip time)
Formats (the same four [rows, cols] tensors of a rollout batch):
  Batch                 flowrl.batch.Batch: numpy views as pickle-5 out-of-band buffers, copied on load
  TensorDict            the tensors in a tensordict.TensorDict, pickled the default way
  TensorDict zero-copy  the same with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 (in a child process: the
                        variable must be set before Ray starts)
With --copy-variants it only times ray.get of one stored Batch under three ways of making
the copy on load (numpy's, the current one; torch's copy_; np.copyto).
"aliases store" says whether an in-place edit of a ``ray.get`` result changes what the next
``ray.get`` of the same object returns (then every consumer must clone before mutating).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import numpy as np
import ray
import torch
from tensordict import TensorDict

import flowrl.batch as fb
from flowrl.batch import Batch
from flowrl.controller import init_ray
from flowrl.keys import Keys

ZERO_COPY = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"


def make_tensors(gb: float, rows: int = 8192) -> dict[str, torch.Tensor]:
    cols = int(gb * 1e9 / rows / 20)  # 8 + 4 + 4 + 4 bytes per token
    gen = torch.Generator().manual_seed(0)
    return {
        Keys.RESPONSE_IDS: torch.randint(0, 50_000, (rows, cols), generator=gen),  # [B, R] int64
        Keys.OLD_LOGPROBS: -torch.rand(rows, cols, generator=gen),  # [B, R]
        Keys.ADVANTAGES: torch.randn(rows, cols, generator=gen),  # [B, R]
        Keys.RESPONSE_MASK: torch.ones(rows, cols),  # [B, R]
    }


def tensors_of(obj: Batch | TensorDict) -> TensorDict:
    return obj.tensors if isinstance(obj, Batch) else obj


@ray.remote(num_cpus=0)
class Echo:
    def echo(self, x: Any) -> Any:
        return x


def measure(
    obj: Batch | TensorDict, nbytes: int, repeats: int, echo: Any
) -> tuple[dict[str, list[float]], bool]:
    rates: dict[str, list[float]] = {"put": [], "get": [], "actor": []}
    probe = tensors_of(obj)[Keys.ADVANTAGES]
    for i in range(repeats + 1):  # the first round warms the object store's pages up and is not counted
        t0 = time.perf_counter()
        ref = ray.put(obj)
        t1 = time.perf_counter()
        out = ray.get(ref)
        t2 = time.perf_counter()
        assert torch.equal(tensors_of(out)[Keys.ADVANTAGES][-1], probe[-1]), "round trip changed the data"
        del out, ref
        t3 = time.perf_counter()
        out = ray.get(echo.echo.remote(obj))
        t4 = time.perf_counter()
        assert torch.equal(tensors_of(out)[Keys.RESPONSE_IDS][0], tensors_of(obj)[Keys.RESPONSE_IDS][0])
        del out
        if i > 0:
            for path, seconds in (("put", t1 - t0), ("get", t2 - t1), ("actor", t4 - t3)):
                rates[path].append(nbytes / seconds / 1e9)
    return rates, aliases_store(obj)


def aliases_store(obj: Batch | TensorDict) -> bool:
    ref = ray.put(obj)
    first = tensors_of(ray.get(ref))[Keys.ADVANTAGES]
    before = first[0, 0].item()
    first[0, 0] += 1.0
    again = tensors_of(ray.get(ref))[Keys.ADVANTAGES][0, 0].item()
    return again != before


def row(name: str, rates: dict[str, list[float]], aliased: bool) -> str:
    cells = [f"{statistics.median(v):.2f} (best {max(v):.2f})" for v in rates.values()]
    return f"| {name} | " + " | ".join(cells) + f" | {'yes' if aliased else 'no'} |"


def run(formats: list[str], gb: float, repeats: int) -> None:
    init_ray(num_cpus=2, logging_level=logging.ERROR)
    tensors = make_tensors(gb)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    echo = Echo.remote()
    ray.get(echo.echo.remote(0))
    suffix = " zero-copy" if os.environ.get(ZERO_COPY) == "1" else ""
    for fmt in formats:
        obj = (
            Batch(tensors)
            if fmt == "Batch"
            else TensorDict(tensors, batch_size=[len(next(iter(tensors.values())))])
        )
        rates, aliased = measure(obj, nbytes, repeats, echo)
        print(row(fmt + suffix, rates, aliased), flush=True)
    ray.shutdown()


copy_numpy = fb._from_numpy  # what Batch does: np.array(arr, copy=True)


def copy_torch(dtype: str, arr: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only view, only read from
        src = torch.from_numpy(arr)
    out = torch.empty(src.shape, dtype=src.dtype)
    out.copy_(src)
    return out.view(torch.bfloat16) if dtype == "bfloat16" else out


def copy_copyto(dtype: str, arr: np.ndarray) -> torch.Tensor:
    out = np.empty_like(arr)
    np.copyto(out, arr)
    t = torch.from_numpy(out)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def compare_load_copies(gb: float, repeats: int) -> None:
    """ray.get of one stored Batch with each way of copying out of the object store."""
    init_ray(num_cpus=2, logging_level=logging.ERROR)
    ref = ray.put(Batch(make_tensors(gb)))
    variants = {"np.array copy (Batch)": copy_numpy, "torch copy_": copy_torch, "np.copyto": copy_copyto}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    original = fb._from_numpy
    try:
        for i in range(repeats + 1):
            for name, fn in variants.items():
                fb._from_numpy = fn
                t0 = time.perf_counter()
                out = ray.get(ref)
                seconds = time.perf_counter() - t0
                del out
                if i > 0:
                    rates[name].append(gb / seconds)
    finally:
        fb._from_numpy = original
    print("| copy on load | ray.get GB/s, median (best) | all runs |\n|---|---|---|")
    for name, v in rates.items():
        runs = " ".join(f"{x:.2f}" for x in v)
        print(f"| {name} | {statistics.median(v):.2f} (best {max(v):.2f}) | {runs} |")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=1.0, help="payload size in GB (1e9 bytes)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", nargs="+", default=["Batch", "TensorDict"])
    parser.add_argument("--no-zero-copy", action="store_true", help="skip the zero-copy child run")
    parser.add_argument(
        "--copy-variants", action="store_true", help="only compare ways of copying a Batch out on load"
    )
    args = parser.parse_args()
    if args.copy_variants:
        compare_load_copies(args.gb, args.repeats)
        return
    if os.environ.get(ZERO_COPY) != "1":
        cols = int(args.gb * 1e9 / 8192 / 20)
        print(
            f"payload {8192 * cols * 20 / 1e9:.2f} GB in 4 tensors of [8192, {cols}]; "
            f"GB/s, median (best) of {args.repeats}; torch threads {torch.get_num_threads()}\n"
        )
        print("| format | put | get | actor round trip | aliases store |")
        print("|---|---|---|---|---|")
    run(args.formats, args.gb, args.repeats)
    if os.environ.get(ZERO_COPY) != "1" and not args.no_zero_copy:
        cmd = [
            sys.executable,
            __file__,
            "--gb",
            str(args.gb),
            "--repeats",
            str(args.repeats),
            "--formats",
            *args.formats,
        ]
        subprocess.run(cmd, env={**os.environ, ZERO_COPY: "1"}, check=True)


if __name__ == "__main__":
    main()
