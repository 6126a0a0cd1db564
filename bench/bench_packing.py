"""Forward + backward of one micro-batch, padded rows against one packed row (block-diagonal mask).

Eight sequences of equal length (128) and eight spread over 24-256 tokens, through a
Hugging Face causal LM with sdpa attention, in fp32 on the machine's CPU (or GPU with
--device cuda). This is the cost model behind ``flowrl.engines.packing.packing_pays``.

    python -m flowrl.models.smollm2 /tmp/smollm2
    python bench/bench_packing.py /tmp/smollm2

Prints seconds per forward + backward (the second of two repetitions) for each layout.
"""

from __future__ import annotations

import argparse
import time

import torch

WORKLOADS = {"equal": [128] * 8, "spread": [24, 40, 64, 100, 130, 170, 210, 256]}


def padded(model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()  # [b, T]
    return model(input_ids=ids, attention_mask=mask).logits


def packed(model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    keep = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]  # [b, T]
    seq = torch.arange(len(lengths), device=ids.device).repeat_interleave(lengths)  # [N]
    n = len(seq)
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
    positions = torch.cat([torch.arange(int(length), device=ids.device) for length in lengths])[None]  # [1, N]
    return model(input_ids=ids[keep][None], position_ids=positions, attention_mask=allowed[None, None]).logits


def seconds(fn, model, ids: torch.Tensor, lengths: torch.Tensor, device: str) -> float:
    for _ in range(2):  # the first warms up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        fn(model, ids, lengths).float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a Hugging Face causal LM folder")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.to(args.device)
    for name, lens in WORKLOADS.items():
        lengths = torch.tensor(lens, device=args.device)
        ids = torch.randint(100, 1000, (len(lens), max(lens)), device=args.device)
        pad_s, pack_s = (seconds(f, model, ids, lengths, args.device) for f in (padded, packed))
        print(f"{name:>6} lengths {lens}: padded {pad_s:.2f} s, packed {pack_s:.2f} s ({pad_s / pack_s:.2f}x)")


if __name__ == "__main__":
    main()
