#!/usr/bin/env python
r"""Quality of 4-bit and 8-bit weights, every method in one run on the same model, data and protocol.

Rows: the float model; stock bitsandbytes NF4 and LLM.int8 (transformers quantizing on load);
llmquant's methods (rtn, scale_search, gptq, awq, awq+gptq, tune, gptq+tune) in NF4 and INT8; and, when they are
installed, HQQ (4-bit, group 64, zero points) and llm-compressor's GPTQ (INT4 symmetric,
group 64) on the same calibration windows. For each: perplexity on the held-out text
(non-overlapping windows), KL divergence and top-1 agreement with the float model, bits per
weight of the Linear layers but the head, and the time the quantization took.

    python scripts/bench_quality.py                  # SmolLM2, held-out last 40% of the demo text
    python scripts/bench_quality.py --rows fp32 bnb-nf4 gptq-nf4 --json runs/q.json
    python scripts/bench_quality.py --model org/name --dtype bfloat16 --device cuda --nsamples 128 --seqlen 2048
    python scripts/bench_quality.py --model asset:qwen2.5-coder-0.5b-instruct --text asset:enwiki --eval-from 0.8 \
        --eval-tokens 12288 --rows fp32 bnb-nf4 gptq-nf4    # Wikipedia: calibrate on the first 60%, evaluate the last 20%

Calibration uses random windows (fixed seed) of the first 60% of the text, evaluation
the last 40%: they never overlap.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

ROWS = {
    # name: (kind, format for llmquant / options)
    "fp32": ("float", None),
    "bnb-int8": ("bnb", "8bit"),
    "bnb-nf4": ("bnb", "nf4"),
    "rtn-int8": ("llmquant", {"default": {"format": "int8"}, "method": "rtn"}),
    "rtn-int8-t1": ("llmquant", {"default": {"format": "int8", "threshold": 1.0}, "method": "rtn"}),
    "scale_search-int8": ("llmquant", {"default": {"format": "int8"}, "method": "scale_search"}),
    "gptq-int8": ("llmquant", {"default": {"format": "int8"}, "method": "gptq"}),
    "awq-int8": ("llmquant", {"default": {"format": "int8"}, "method": "awq"}),
    "awq+gptq-int8": ("llmquant", {"default": {"format": "int8"}, "method": "awq+gptq"}),
    "gptq+tune-int8": ("llmquant", {"default": {"format": "int8"}, "method": "gptq+tune"}),
    "rtn-nf4": ("llmquant", {"default": {"format": "nf4"}, "method": "rtn"}),
    "scale_search-nf4": ("llmquant", {"default": {"format": "nf4"}, "method": "scale_search"}),
    "gptq-nf4": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq"}),
    "awq-nf4": ("llmquant", {"default": {"format": "nf4"}, "method": "awq"}),
    "awq+gptq-nf4": ("llmquant", {"default": {"format": "nf4"}, "method": "awq+gptq"}),
    "tune-nf4": ("llmquant", {"default": {"format": "nf4"}, "method": "tune"}),
    "gptq+tune-nf4": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq+tune"}),
    # tuned toward the float layer's outputs on the quantized inputs (calibration.tune.target: layer)
    "gptq+tune-nf4-layer": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq+tune",
                                         "calibration": {"tune": {"target": "layer"}}}),
    # one group of Linear layers reading one input at a time (q/k/v, o, gate/up, down), each for all the steps
    "gptq+tune-nf4-group": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq+tune",
                                         "calibration": {"tune": {"scope": "group"}}}),
    # four calibration windows per tuning step instead of one
    "gptq+tune-nf4-b4": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq+tune",
                                      "calibration": {"tune": {"batch": 4}}}),
    # twice the default steps per layer (same total step size: 0.25 / steps)
    "gptq+tune-nf4-s200": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq+tune",
                                        "calibration": {"tune": {"steps": 200}}}),
    # then the stored scales of every layer tuned end to end toward the float model's predictions (64 steps)
    "gptq-nf4-e2e": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq", "calibration": {"tune": {"model_steps": 64}}}),
    "gptq+tune-nf4-e2e": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq+tune",
                                       "calibration": {"tune": {"model_steps": 64}}}),
    # half of the calibration windows sampled from the float model itself (calibration.generated), half from the text
    "gptq-nf4-gen": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq", "calibration": {"generated": 0.5}}),
    "gptq+tune-nf4-gen": ("llmquant", {"default": {"format": "nf4"}, "method": "gptq+tune", "calibration": {"generated": 0.5}}),
    "gptq-nf4-dq": ("llmquant", {"default": {"format": "nf4", "double_quant": True}, "method": "gptq"}),
    "awq+gptq-nf4-dq": ("llmquant", {"default": {"format": "nf4", "double_quant": True}, "method": "awq+gptq"}),
    # formats chosen per layer by quantization.auto for 4.5 bits per weight (the size of NF4 block 64), weights by GPTQ
    "auto-4.5-gptq": ("llmquant", {"auto": {"bits_per_weight": 4.5}, "method": "gptq"}),
    "auto-4.5-gptq-stock": ("llmquant", {"auto": {"bits_per_weight": 4.5, "loadable_by": "transformers"}, "method": "gptq"}),
    "auto-4.5-gptq-w16": ("llmquant", {"auto": {"bits_per_weight": 4.5, "windows": 16}, "method": "gptq"}),
    # the smallest mix whose KL on the calibration windows is at most 0.03 nats/token
    "auto-kl0.03-gptq": ("llmquant", {"auto": {"kl": 0.03}, "method": "gptq"}),
    "hqq-4bit-g64": ("hqq", None),
    "llmcompressor-gptq-w4g64": ("llmcompressor", None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="asset:smollm2-135m-instruct")
    ap.add_argument("--text", default="asset:botchan")
    ap.add_argument("--split", type=float, default=0.6, help="calibration uses [0, split) of the text, evaluation [split, 1)")
    ap.add_argument("--eval-from", type=float, default=None,
                    help="evaluation uses [eval-from, 1) of the text instead (at least --split): e.g. 0.8 with "
                         "asset:enwiki, the last 20%% of the articles")
    ap.add_argument("--seqlen", type=int, default=512, help="evaluation and calibration window length")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    ap.add_argument("--eval-tokens", type=int, default=None, help="evaluate only the first N held-out tokens")
    ap.add_argument("--kl-tokens", type=int, default=8192)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    ap.add_argument("--calibrate-on-held-out", action="store_true",
                    help="ablation: draw the calibration windows from the evaluated text itself (in sample), to tell how "
                         "much of a method's gap comes from generalizing to text it was not calibrated on")
    ap.add_argument("--true-sequential", action="store_true", help="calibrate with calibration.true_sequential on")
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--part-marker", default="--(THE END)--",
                    help="also report perplexity on the held-out tokens before and from this string (the demo text: the "
                         "novel, then Project Gutenberg's license); nothing when the text does not hold it")
    args = ap.parse_args()

    from llmquant.calibrate import calibration_windows
    from llmquant.data import TextSpec, load_text
    from llmquant.evaluate import linear_size
    from llmquant.evaluate.perplexity import LogprobStore, evaluate, make_windows, tokenize
    from llmquant.models import load_model, pick_device, resolve_source
    from llmquant.recipe import CalibrationSpec

    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="llmquant-bench-"))
    model, tok = load_model(resolve_source(args.model), args.dtype, str(device))
    float_dir = work / "float"  # a safetensors copy: every row starts from the same weights, fast
    model.save_pretrained(float_dir)
    tok.save_pretrained(float_dir)
    del model
    src = resolve_source(str(float_dir))

    eval_from = max(args.split, args.eval_from) if args.eval_from is not None else args.split
    held = load_text(TextSpec(source=args.text, range=(eval_from, 1.0)))
    calib = load_text(TextSpec(source=args.text, range=(0.0, args.split)))
    ids, _ = tokenize(tok, held.text, args.eval_tokens)
    windows = make_windows(len(ids), args.seqlen, "windows")
    targets = sum(w.n_targets for w in windows)
    positions = torch.cat([torch.arange(w.first_target, w.end) for w in windows])  # each scored token's index in ids
    at = held.text.find(args.part_marker) if args.part_marker else -1
    boundary = len(tokenize(tok, held.text[:at], None)[0]) if at > 0 else None  # first token of the second part
    if boundary is not None and not positions[0] < boundary <= positions[-1]:
        boundary = None  # (the evaluated tokens end before it)
    # in sample: the evaluated tokens themselves (decoded back to text), not the rest of the held-out part
    calib_text, calib_from = ((tok.decode(ids), "the evaluated text itself") if args.calibrate_on_held_out
                              else (calib.text, f"[0, {args.split})"))
    cwin = calibration_windows(tok, calib_text, args.nsamples, args.seqlen, 0)
    spec = CalibrationSpec.model_validate({"text": {"source": args.text}, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                           "true_sequential": args.true_sequential})
    print(f"model {args.model} ({args.dtype}, {device}); evaluation: {len(windows)} windows of {args.seqlen} tokens "
          f"({targets} scored) from [{eval_from}, 1) of {args.text}; calibration: {args.nsamples} windows of "
          f"{args.seqlen} from {calib_from}", flush=True)
    if boundary is not None:
        print(f"parts: the {int((positions < boundary).sum())} scored tokens before {args.part_marker!r} and the "
              f"{int((positions >= boundary).sum())} from it", flush=True)

    ref = None  # the float model's log-probabilities, written by the fp32 row (KL for the others)
    rows_out = []
    base_parts = None
    base_ppl = None
    for name in args.rows:
        kind, opt = ROWS[name]
        gc.collect()
        t0 = time.perf_counter()
        try:
            m = _make(name, kind, opt, src, args, device, cwin, spec, tok, calib_text)
        except ImportError as e:
            print(f"{name:26s} skipped ({e})", flush=True)
            continue
        seconds = time.perf_counter() - t0
        if kind == "float":
            vocab = m.get_output_embeddings().out_features
            ref = LogprobStore(work / "ref.npy", min(args.kl_tokens, targets), vocab, "w+")
            r = evaluate(m, ids, windows, 1 if device.type == "cpu" else 8, write_logprobs=ref, progress=False)
            base_ppl = r.perplexity
        else:
            r = evaluate(m, ids, windows, 1 if device.type == "cpu" else 8, reference=ref, progress=False)
        bits = _bits(kind, m, linear_size)
        d = r.divergence or {}
        row = {"row": name, "perplexity": r.perplexity, "vs_float": r.perplexity / base_ppl - 1 if base_ppl else None,
               "kl_mean": d.get("kl_divergence", {}).get("mean"), "top1": d.get("top1_agreement"),
               "bits_per_weight": bits, "quantize_seconds": seconds if kind != "float" else None}
        if boundary is not None:
            nll = torch.as_tensor(r.token_nll)
            row["parts"] = [_perplexity(nll[positions < boundary]), _perplexity(nll[positions >= boundary])]
            if kind == "float":
                base_parts = row["parts"]
            row["parts_vs_float"] = [p / b - 1 for p, b in zip(row["parts"], base_parts)] if base_parts else [None, None]
        rows_out.append(row)
        print(_fmt(row) + ("" if boundary is None else "  parts " + " / ".join(
            f"{p} ({d})" if d else p for p, d in _parts(row))), flush=True)
        del m

    print("\n| row | perplexity | vs float | KL (mean) | top-1 | bits/weight (Linear but head) | quantize time |")
    print("|---|---|---|---|---|---|---|")
    for row in rows_out:
        print("| " + " | ".join(_cells(row)) + " |")
    if boundary is not None:
        print(f"\n| row | before {args.part_marker!r} | vs float | from it | vs float |\n|---|---|---|---|---|")
        for row in rows_out:
            print("| " + " | ".join([row["row"], *(c for part in _parts(row) for c in part)]) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows_out}, indent=2))


def _parts(row) -> list[tuple[str, str]]:
    """Each part's perplexity and its change from the float model's (blank for the float row)."""
    return [(f"{p:.2f}", "" if d is None or row["row"] == "fp32" else f"{d:+.1%}")
            for p, d in zip(row["parts"], row["parts_vs_float"])]


def _perplexity(nll: torch.Tensor) -> float:
    return float(torch.exp(nll.double().mean()))


def _count(report) -> dict:
    out: dict = {}
    for layer in report["layers"].values():
        out[layer["chosen"]] = out.get(layer["chosen"], 0) + 1
    return out


def _make(name, kind, opt, src, args, device, cwin, spec, tok, calib_text):
    from transformers import AutoModelForCausalLM

    from llmquant.calibrate import SequentialCalibrator, needs_calibration
    from llmquant.models import load_model
    from llmquant.plan import build_plan
    from llmquant.quantize import quantize_model
    from llmquant.recipe import Quantization

    dtype = getattr(torch, args.dtype)
    if kind == "float":
        return load_model(src, args.dtype, str(device))[0]
    if kind == "llmquant":
        m, _ = load_model(src, args.dtype, str(device))
        opt = dict(opt)
        if "calibration" in opt:  # the row's own calibration settings over the shared ones
            own = dict(opt.pop("calibration"))
            if isinstance(own.get("generated"), float):  # a share of the windows
                own["generated"] = round(own["generated"] * spec.nsamples)
            spec = type(spec).model_validate({**spec.model_dump(), **own})
        if spec.generated:  # the windows as the pipeline makes them: from the text, then sampled from the float model
            from llmquant.data import Text
            from llmquant.pipeline import _calibration_windows

            cwin = _calibration_windows(spec, tok, Text(calib_text, {}), m, False, lambda *a: None)
        q = Quantization.model_validate(opt)
        if q.auto is not None:  # formats chosen first, on the float model (calibration: the same windows)
            from llmquant import auto
            from llmquant.recipe import Recipe

            r = Recipe.model_validate({"model": {"source": src.location}, "quantization": q, "calibration": spec, "output": {"dir": "-"}})
            r, report = auto.resolve(r, auto.prepare(r, m, m.dtype), m, tok, calib_text, progress=False, log=lambda *a: None)
            q = r.quantization
            if args.json:
                auto.plot(report, Path(args.json).with_suffix(f".{name}.png"), f"{args.model}: {report['target']}")
            measured = f", measured on calibration windows {report['measured_kl']:.4f}" if report.get("measured_kl") is not None else ""
            print(f"  auto: {report['target']}: {report['chosen_x']:.3f} bits per weight, predicted KL {report['predicted_kl']:.4f}{measured}, search {report['seconds']:.0f} s, " + ", ".join(
                f"{k} x{v}" for k, v in _count(report).items()), flush=True)
        plan = build_plan(m, q, m.dtype)
        cal = SequentialCalibrator(m, plan, cwin, spec, device, progress=False, log=lambda *a: None) if needs_calibration(plan) else None
        quantize_model(m, plan, progress=False, calibration=cal)
        m.llmquant_plan = plan  # sizes as the checkpoint stores them (a kept fp16 layer computes in the model's dtype)
        return m
    if kind == "bnb":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_8bit=True) if opt == "8bit" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=opt, bnb_4bit_compute_dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(src.location, quantization_config=q, dtype=dtype, device_map={"": str(device)}).eval()
    if kind == "hqq":  # HQQ's own layers (transformers' HqqConfig refuses CPU placement)
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        m, _ = load_model(src, args.dtype, str(device))
        cfg = BaseQuantizeConfig(nbits=4, group_size=64)
        for name, mod in list(m.named_modules()):
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                parent, _, leaf = name.rpartition(".")
                setattr(m.get_submodule(parent), leaf, HQQLinear(mod, cfg, compute_dtype=dtype, device=str(device)))
        return m
    if kind == "llmcompressor":
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        m = AutoModelForCausalLM.from_pretrained(src.location, dtype=dtype).eval()
        data = Dataset.from_dict({"input_ids": cwin.tolist(), "attention_mask": torch.ones_like(cwin).tolist()})
        recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}})
        oneshot(model=m, dataset=data, recipe=recipe, num_calibration_samples=len(cwin), max_seq_length=cwin.shape[1])
        return m.to(device).eval()
    raise ValueError(kind)


def _bits(kind, m, linear_size) -> float:
    if kind == "hqq":  # 4-bit codes, fp16 scale and zero point per group of 64
        return 4 + 2 * 16 / 64
    if kind == "llmcompressor":  # 4-bit codes, fp16 scale per group of 64 (symmetric: no zero point)
        return 4 + 16 / 64
    if hasattr(m, "llmquant_plan"):
        return m.llmquant_plan.linear_bits_per_weight()
    return linear_size(m)["linear_bits_per_weight"]


def _cells(row) -> list[str]:
    return [
        row["row"], f"{row['perplexity']:.2f}", "" if row["vs_float"] is None or row["row"] == "fp32" else f"{row['vs_float']:+.1%}",
        "" if row["kl_mean"] is None else f"{row['kl_mean']:.4f}", "" if row["top1"] is None else f"{row['top1']:.1%}",
        f"{row['bits_per_weight']:.2f}", "" if row["quantize_seconds"] is None else f"{row['quantize_seconds']:.0f} s",
    ]


def _fmt(row) -> str:
    c = _cells(row)
    return f"{c[0]:26s} ppl {c[1]:>8s} {c[2]:>7s}  KL {c[3]:>7s}  top-1 {c[4]:>6s}  {c[5]:>5s} bpw  {c[6]}"


if __name__ == "__main__":
    main()
