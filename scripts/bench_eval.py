#!/usr/bin/env python
"""Evaluation throughput: llmquant's batched perplexity vs a plain one-window-at-a-time loop.

Same model, same text, same windows; prints tokens/s of each and their ratio, and checks
that both give the same perplexity. Runs on a GPU when one is visible (in the model's
compute dtype there), else on the CPU.

    python scripts/bench_eval.py                                   # SmolLM2 on the held-out demo text
    python scripts/bench_eval.py --model org/name --dtype bfloat16 --tokens 65536 --batch-sizes 1 8 16
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def plain_loop(model, ids, seqlen, device):
    """The straightforward loop: one window per forward, transformers' own loss."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ids) // seqlen):
            x = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
            nll += model(x, labels=x).loss.float().item() * (seqlen - 1)
            count += seqlen - 1
    return math.exp(nll / count), count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="asset:smollm2-135m-instruct")
    ap.add_argument("--text", default="asset:botchan")
    ap.add_argument("--range", nargs=2, type=float, default=[0.6, 1.0])
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens evaluated (a multiple of seqlen is used)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each (the best is reported)")
    args = ap.parse_args()

    from llmquant.data import TextSpec, load_text
    from llmquant.evaluate.perplexity import evaluate, make_windows, tokenize
    from llmquant.models import load_model, resolve_source

    model, tok = load_model(resolve_source(args.model), args.dtype, args.device)
    device = next(model.parameters()).device
    text = load_text(TextSpec(source=args.text, range=tuple(args.range)))
    ids, _ = tokenize(tok, text.text, args.tokens)
    windows = make_windows(len(ids), args.seqlen, "windows")
    print(f"model {args.model} ({model.dtype}, {device}), {len(windows)} windows of {args.seqlen} tokens")
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}")

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best, out

    plain_loop(model, ids[: args.seqlen], args.seqlen, device)  # warm-up
    t_plain, (ppl_plain, n) = timed(lambda: plain_loop(model, ids, args.seqlen, device))
    print(f"{'plain loop (1 window/forward)':34s} {n / t_plain:10.0f} tok/s   ppl {ppl_plain:.4f}")
    for b in args.batch_sizes:
        t, r = timed(lambda b=b: evaluate(model, ids, windows, batch_size=b, progress=False))
        agree = abs(r.perplexity / ppl_plain - 1)
        print(f"{'llmquant, batch ' + str(b):34s} {r.tokens / t:10.0f} tok/s   ppl {r.perplexity:.4f}   "
              f"x{t_plain / t * r.tokens / n:.2f} vs plain   (ppl agrees to {agree:.1e})")


if __name__ == "__main__":
    main()
