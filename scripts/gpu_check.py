#!/usr/bin/env python
"""Everything llmquant should prove the first time a CUDA GPU is at hand, in one command (about 8 minutes on one
H100-class GPU), with one report of what it measured:

1. the tests marked ``cuda`` (streamed RTN/GPTQ/AWQ on CUDA, INT8 and NF4 reload and check, device-map evaluation,
   the bench's CUDA timing);
2. the demo recipe with ``device: cuda`` (SmolLM2, GPTQ, evaluated, exported, checked);
3. a random bfloat16 model of Llama-3-8B's shape (made on the GPU, 16 GB of safetensors), quantized streamed with
   GPTQ NF4 on 16 windows of 2048 tokens of the Wikipedia asset, and with round to nearest in NF4, NF4 with double
   quantization and INT8;
4. ``llmquant bench`` of the bfloat16 model and of each export at batch 1 and 16.

    scripts/gpu_check.sh                 # all of it; the report goes to gpu-check/report.{json,md}
    scripts/gpu_check.sh --dry-run       # print what it would run, run nothing (works without a GPU)
    scripts/gpu_check.sh --keep          # keep the 8B model and exports (about 40 GB) in gpu-check/

Each step's command, exit status, seconds and figures go into the report; a failing step is reported and the
others still run. No figure is written anywhere else: copy those you trust into the documentation with the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the steps and their commands; run nothing")
    ap.add_argument("--out", default="gpu-check", help="folder for the report and the work (default gpu-check)")
    ap.add_argument("--keep", action="store_true", help="keep the 8B model and its exports")
    ap.add_argument("--windows", type=int, default=16, help="GPTQ calibration windows of 2048 tokens (default 16)")
    ap.add_argument("--batch-sizes", default="1,16", help="bench batch sizes (default 1,16)")
    args = ap.parse_args()

    out = Path(args.out).absolute()
    work = out / "work"
    py = sys.executable
    cli = [py, "-m", "llmquant"]
    big = work / "llama3-8b-shape-bf16"
    steps = [
        ("cuda tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", str(ROOT / "tests"),
                        f"--junitxml={work / 'cuda-tests.xml'}"], None),
        ("demo on cuda", [*cli, "run", str(work / "demo.yaml"), "--device", "cuda", "--output", str(work / "demo"),
                          "--overwrite", "--quiet"], work / "demo"),
        ("random 8B-shape model", [py, __file__, "--make-model", str(big)], None),
        ("gptq nf4 8B streamed", [*cli, "run", str(work / "gptq.yaml"), "--quiet"], work / "gptq-nf4"),
    ]
    for name, fmt in (("nf4", {"format": "nf4"}), ("nf4-dq", {"format": "nf4", "double_quant": True}),
                      ("int8", {"format": "int8"})):
        steps.append((f"rtn {name} 8B streamed", [*cli, "run", str(work / f"rtn-{name}.yaml"), "--quiet"], work / f"rtn-{name}"))
    benched = {"bf16": big, "gptq-nf4": work / "gptq-nf4", "rtn-nf4-dq": work / "rtn-nf4-dq", "rtn-int8": work / "rtn-int8"}
    for name, folder in benched.items():
        steps.append((f"bench {name}", [*cli, "bench", str(folder), "--device", "cuda", "--batch-sizes", args.batch_sizes,
                                        "--output", str(work / f"bench-{name}")], work / f"bench-{name}"))

    if args.dry_run:
        print(f"would write the report to {out}/report.json and report.md, working in {work}:")
        for name, cmd, _ in steps:
            print(f"  {name}: {shlex.join(cmd)}")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible to torch (install a CUDA build of torch, or run with --dry-run)", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    _write_recipes(work, big, args.windows)
    report = {"gpu": torch.cuda.get_device_name(0), "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory,
              "torch": torch.__version__, "cuda": torch.version.cuda, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "steps": []}
    for name, cmd, folder in steps:
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        step = {"name": name, "command": shlex.join(cmd), "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
                "figures": _figures(name, folder, work), "tail": proc.stderr.strip().splitlines()[-5:]}
        report["steps"].append(step)
        print(f"   rc {proc.returncode} in {step['seconds']} s; {json.dumps(step['figures'])[:300]}", flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    print((out / "report.md").read_text())
    if not args.keep:
        for p in [big, *(work / n for n in ("gptq-nf4", "rtn-nf4", "rtn-nf4-dq", "rtn-int8"))]:
            shutil.rmtree(p, ignore_errors=True)
    return 0 if all(s["rc"] == 0 for s in report["steps"]) else 1


def _write_recipes(work: Path, big: Path, windows: int) -> None:
    from llmquant.recipes import recipe_text

    (work / "demo.yaml").write_text(recipe_text("demo"))
    calib = {"text": {"source": "asset:enwiki", "range": [0.0, 0.6]}, "nsamples": windows, "seqlen": 2048}
    recipes = {"gptq": ({"default": {"format": "nf4", "group_size": 64}, "method": "gptq"}, calib, "gptq-nf4")}
    for name, fmt in (("nf4", {"format": "nf4"}), ("nf4-dq", {"format": "nf4", "double_quant": True}), ("int8", {"format": "int8"})):
        recipes[f"rtn-{name}"] = ({"default": fmt}, None, f"rtn-{name}")
    for name, (quant, cal, folder) in recipes.items():
        r = {"model": {"source": str(big), "dtype": "bfloat16"}, "device": "cuda", "quantization": quant,
             "output": {"dir": str(work / folder), "overwrite": True}}
        if cal:
            r["calibration"] = cal
        (work / f"{name}.yaml").write_text(json.dumps(r))


def _figures(name: str, folder: Path | None, work: Path) -> dict:
    """What a step measured, read back from the files it wrote."""
    if name == "cuda tests":
        xml = work / "cuda-tests.xml"
        if xml.is_file():
            import xml.etree.ElementTree as ET

            s = ET.parse(xml).getroot().find("testsuite") or ET.parse(xml).getroot()
            return {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        return {}
    if folder is None or not folder.is_dir():
        return {}
    out: dict = {}
    meta = folder / "llmquant.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        out["timings_seconds"] = m.get("timings_seconds") or m.get("timings")
        out["check"] = {k: (m.get("check") or {}).get(k) for k in ("passed", "max_abs_logit_diff", "tensors_checked")}
    res = folder / "results.json"
    if res.is_file():
        r = json.loads(res.read_text())
        out["perplexity"] = {k: v.get("perplexity") for k, v in r["models"].items()}
    speed = folder / "speed.json"
    if speed.is_file():
        s = json.loads(speed.read_text())
        out["speed"] = {label: [{"batch": row["batch_size"], "decode_tok_s": row["decode_tokens_per_second"]["median"],
                                 "prefill_tok_s": row["prefill_tokens_per_second"]["median"],
                                 "peak_gpu_bytes": row.get("peak_device_bytes")} for row in m_["rows"]]
                        for label, m_ in s["models"].items()}
        out["load_seconds"] = {label: m_["load_seconds"] for label, m_ in s["models"].items()}
    return out


def _markdown(report: dict) -> str:
    lines = [f"# llmquant GPU check: {report['gpu']}", "",
             f"torch {report['torch']} (CUDA {report['cuda']}), {report['gpu_memory_bytes'] / 2**30:.0f} GiB, {report['started']}", "",
             "| step | status | seconds | figures |", "|---|---|---|---|"]
    for s in report["steps"]:
        figs = json.dumps(s["figures"])[:400].replace("|", "/")
        lines.append(f"| {s['name']} | {'ok' if s['rc'] == 0 else 'FAILED (' + str(s['rc']) + ')'} | {s['seconds']} | {figs} |")
    return "\n".join(lines) + "\n"


def make_model(folder: str) -> None:
    """A random bfloat16 model of Llama-3-8B's shape, made on the GPU, saved as sharded safetensors with a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmquant.models import load_tokenizer, resolve_source

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA3_8B, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    load_tokenizer(resolve_source("asset:smollm2-135m-instruct")).save_pretrained(folder)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-model":
        make_model(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
