"""Peak memory and wall time of quantizing a model larger than what should sit in memory.

Builds a random-weight Llama-architecture model from a config (default: 0.91B parameters,
hidden 2048, intermediate 5632, 16 layers, 32 heads, 4 KV heads, vocabulary 49152, untied head), saves it as
sharded bfloat16 safetensors, then measures, each in its own subprocess under
``/usr/bin/time -v`` (peak resident memory, wall time):

* ``llmquant run`` with ``default: nf4`` (block 64), ``method: rtn`` (streamed layer by layer);
* stock bitsandbytes: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit))``
  then ``save_pretrained``;
* with ``--gptq``, ``llmquant run`` with GPTQ NF4 on calibration windows of the demo text (``--activations disk``:
  its activations kept on disk between layers);
* with ``--auto N``, ``llmquant run`` with ``quantization.auto`` (4.5 bits per weight, RTN), its sensitivity pass
  streamed over N windows of the demo text; with ``--auto-kl KL`` too, the same with the quality target ``kl: KL``
  (its mixes measured streamed);
* with ``--gptq --processes N``, the same GPTQ run over N processes (``torchrun``, data-parallel calibration; gloo on
  the CPU, nccl on GPUs), its export compared with the one-process export (4-bit codes that differ, largest scale
  difference) and its speedup.

Prints a table of wall time, peak RSS and peak RSS / checkpoint bytes. Not a test: figures.

    python scripts/bench_scale.py                       # the ~1B model, RTN and stock
    python scripts/bench_scale.py --gptq --windows 64 --seqlen 512
    python scripts/bench_scale.py --hidden 4096 --intermediate 14336 --layers 32 --heads 32 --kv-heads 8 --vocab 128256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg, dtype=torch.bfloat16, device_map={"": sys.argv[3]})
m.save_pretrained(sys.argv[2])
"""


def build(folder: Path, a) -> None:
    import torch
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(a.device if a.device != "cpu" else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size=a.shard)
    from llmquant.assets import fetch
    from transformers import AutoTokenizer

    # a real tokenizer for the calibration text (the demo model's), vocabulary ids beyond it are simply unused
    AutoTokenizer.from_pretrained(str(fetch("smollm2-135m-instruct", quiet=True).parent), gguf_file=fetch("smollm2-135m-instruct", quiet=True).name).save_pretrained(folder)


def measure(cmd: list[str]) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    info = {}
    for line in proc.stderr.splitlines():
        if "Maximum resident set size" in line:
            info["rss"] = int(line.split(":")[1]) * 1024
        if "Elapsed (wall clock)" in line:
            parts = line.split(": ", 1)[1].strip().split(":")
            info["seconds"] = sum(float(x) * 60 ** i for i, x in enumerate(reversed(parts)))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--shard", default="500MB", help="shard size of the saved bf16 checkpoint")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gptq", action="store_true", help="also GPTQ NF4 (calibrated, streamed)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--activations", choices=["memory", "disk"], default="memory",
                    help="with --gptq: where the calibration activations wait between layers (calibration.activations)")
    ap.add_argument("--processes", type=int, default=1, help="with --gptq: also run it over this many processes")
    ap.add_argument("--auto", type=int, default=0, metavar="N",
                    help="also quantization.auto (bits_per_weight 4.5, rtn), sensitivity streamed over N windows of --seqlen tokens")
    ap.add_argument("--auto-kl", type=float, default=None, metavar="KL",
                    help="with --auto N: also quantization.auto with the target kl: KL (rtn), measured on the same windows")
    ap.add_argument("--no-rtn", action="store_true")
    ap.add_argument("--no-stock", action="store_true")
    ap.add_argument("--workdir", help="keep the model and outputs here (default: a temporary folder)")
    a = ap.parse_args()

    root = Path(a.workdir or tempfile.mkdtemp(prefix="llmquant-bench-scale-"))
    model = root / "model"
    if not (model / "config.json").is_file():
        print(f"building the model in {model} ...", file=sys.stderr)
        build(model, a)
    ckpt = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    n_shards = len(list(model.glob("*.safetensors")))
    rows, notes = [], []

    def job(name: str, extra: str, label: str, launch: tuple = (sys.executable,)) -> tuple[dict, dict]:
        """``llmquant run`` of a recipe on the model, measured; adds its row; returns (measurement, its llmquant.json)."""
        r = root / f"{name}.yaml"
        r.write_text(f"model: {{source: {model}}}\ndevice: {a.device}\noutput: {{dir: {root / name}, overwrite: true}}\n{extra}")
        m = measure([*launch, "-m", "llmquant", "run", str(r), "--quiet"])
        report = json.loads((root / name / "llmquant.json").read_text())
        rows.append((label, m, report["timings_seconds"]))
        return m, report

    if not a.no_rtn:
        job("rtn", "quantization: {default: nf4, method: rtn}\n", "llmquant run, nf4 g64, rtn (streamed)")
    if not a.no_stock:
        stock = measure([sys.executable, "-c", STOCK, str(model), str(root / "stock"), a.device])
        rows.append(("stock bitsandbytes: load_in_4bit nf4 + save_pretrained", stock, None))
    if a.gptq:
        calib = (f"quantization: {{default: nf4, method: gptq}}\ncalibration: {{text: {{source: asset:botchan, range: [0.0, 0.6]}}, "
                 f"nsamples: {a.windows}, seqlen: {a.seqlen}, activations: {a.activations}}}\n")
        g, _ = job("gptq", calib, f"llmquant run, nf4 g64, gptq {a.windows}x{a.seqlen} (streamed, activations in {a.activations})")
        if a.processes > 1:
            launch = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.processes))
            d, _ = job("gptq-dist", calib, f"same, over {a.processes} processes (torchrun; RSS of the largest)", launch)
            same = compare_exports(root / "gptq", root / "gptq-dist")
            notes.append(f"{a.processes} processes vs one: speedup {g['seconds'] / d['seconds']:.2f}x; {same}")

    if a.auto:
        search = (f"quantization: {{default: nf4, method: rtn, auto: {{bits_per_weight: 4.5, windows: {a.auto}}}}}\n"
                  f"calibration: {{text: {{source: asset:botchan, range: [0.0, 0.6]}}, nsamples: {a.auto}, seqlen: {a.seqlen}}}\n")
        job("auto", search, f"llmquant run, auto 4.5 bits per weight, rtn, sensitivity on {a.auto}x{a.seqlen} (streamed)")
        if a.auto_kl is not None:
            _, report = job("auto-kl", search.replace("bits_per_weight: 4.5", f"kl: {a.auto_kl}"),
                            f"llmquant run, auto kl {a.auto_kl:g}, rtn, on {a.auto}x{a.seqlen} (streamed)")
            notes.append(f"auto kl {a.auto_kl:g}: " + ", ".join(f"{c['x']:.2f} bits per weight measured {c['measured_kl']:.4f}"
                                                              for c in report["auto"]["kl_checks"])
                         + f"; chosen {report['auto']['chosen_x']:.2f} bits per weight")

    import torch

    n_params = ckpt / 2
    print(f"model: Llama, hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, "
          f"{a.kv_heads} KV heads, vocabulary {a.vocab}, "
          f"{n_params / 1e9:.2f}B parameters, bf16 checkpoint {ckpt / 1e9:.2f} GB in {n_shards} shards; device {a.device}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print(f"| job | wall time | peak RSS | peak RSS / checkpoint | phases (s) |")
    print("|---|---|---|---|---|")
    for name, m, phases in rows:
        ph = ", ".join(f"{k} {v:.1f}" for k, v in (phases or {}).items() if k != "total") or "–"
        print(f"| {name} | {m['seconds']:.1f} s | {m['rss'] / 1e9:.2f} GB | {m['rss'] / ckpt:.2f}× | {ph} |")
    for n in notes:
        print(n)


def compare_exports(a: Path, b: Path) -> str:
    """How two exports of the same recipe differ: 4-bit codes that differ, largest relative float difference."""
    import torch
    from llmquant.stream import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    codes = differing = 0
    worst = 0.0
    for k in ra.where:
        x, y = ra.get(k), rb.get(k)
        if x.dtype == torch.uint8 and k.endswith(".weight"):
            codes += 2 * x.numel()
            differing += int(((x & 15) != (y & 15)).sum() + ((x >> 4) != (y >> 4)).sum())
        elif x.is_floating_point():
            worst = max(worst, float(((x.float() - y.float()).abs() / x.float().abs().clamp_min(1e-12)).max()))
    ra.close()
    rb.close()
    return f"4-bit codes differing {differing} of {codes} ({differing / max(codes, 1):.4%}); largest relative float difference {worst:.2e}"


if __name__ == "__main__":
    main()
