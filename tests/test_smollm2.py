"""Integration tests on the real SmolLM2-135M-Instruct (offline asset), on small token counts."""

import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import assert_same_logits, repack_like_avx512bf16
from safetensors import safe_open

import bitsandbytes as bnb
from llmquant.cli import main
from llmquant.export import load_export, logits_on, probe_ids, safetensors_bytes, verify_export, write_checkpoint
from llmquant.models import load_model, resolve_source
from llmquant.pipeline import run
from llmquant.plan import build_plan
from llmquant.quantize import quantize_model
from llmquant.recipe import Quantization, Recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent

FORMATS = {
    "int8": ({"default": {"format": "int8"}}, "bitsandbytes"),
    "nf4": ({"default": {"format": "nf4"}}, "bitsandbytes"),
    "fp4-dq": ({"default": {"format": "fp4", "double_quant": True}}, "bitsandbytes"),
    "nf4-g32": ({"default": {"format": "nf4", "group_size": 32}}, "bitsandbytes"),  # block size read per tensor
    "mixed": ({"default": {"format": "nf4", "group_size": 64},
               "rules": [{"match": "*.self_attn.*", "format": "int8", "threshold": 0.0},
                         {"match": "*.layers.0.*", "format": "fp16"},
                         {"match": "*.down_proj", "format": "fp4", "group_size": 32, "double_quant": True}]}, "llmquant"),
}


def windows_nll(model, ids: torch.Tensor, seqlen: int) -> float:
    """Mean next-token NLL over non-overlapping windows (a plain reference loop)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - seqlen + 1, seqlen):
            x = ids[:, start : start + seqlen]
            logits = model(x).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
            count += seqlen - 1
    return total / count


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_exports_and_reloads(smollm2_dir, tmp_path, name):
    quant, method = FORMATS[name]
    out = tmp_path / "out"
    r = Recipe.from_dict({"model": {"source": str(smollm2_dir)}, "device": "cpu", "quantization": quant, "output": {"dir": str(out)}})
    res = run(r, console=Console(file=io.StringIO()), progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == method
    assert res.check.passed and res.check.max_abs_logit_diff <= res.check.tolerance
    est, got = res.plan.file_bytes_estimate(), safetensors_bytes(out)
    assert abs(est - got) / got < 0.01, (est, got)
    fresh = load_export(out, "cpu")
    ids = probe_ids(None, 49152)
    assert_same_logits(logits_on(fresh, ids), logits_on(load_export(out, "cpu"), ids))
    n_quantized = sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in fresh.modules())
    assert n_quantized == len(res.plan.quantized_entries) == {"mixed": 207}.get(name, 210)  # mixed: layer 0 MLP kept in fp16


def test_cpu_repacking_cannot_reach_our_export(smollm2_dir, botchan_text, tmp_path):
    """The upstream save defect: after a CPU forward, bitsandbytes' state_dict() scrambles 4-bit scales.

    We run forwards on the in-memory model first (as evaluation does), then export: the
    written scales are exact and the reloaded model has the in-memory model's perplexity.
    """
    model, tok = load_model(resolve_source(str(smollm2_dir)), "float32", "cpu")
    plan = build_plan(model, Quantization.model_validate({"default": "nf4"}), torch.float32)
    chosen = quantize_model(model, plan, progress=False)
    ids = tok(botchan_text[-20000:], return_tensors="pt").input_ids[:, :1024]
    nll_mem = windows_nll(model, ids, 256)  # repacks every 4-bit layer on AVX512-BF16 CPUs
    write_checkpoint(tmp_path, model, tok, plan, chosen, 10**10)
    check = verify_export(tmp_path, model, plan, chosen, probe_ids(tok, 49152))
    assert check.passed and check.max_abs_logit_diff <= check.tolerance
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        absmax = f.get_tensor("model.layers.3.mlp.down_proj.weight.absmax")
    assert absmax.dtype == torch.float32 and absmax.shape == (1536 * 576 // 64,)
    assert torch.equal(absmax, chosen["model.layers.3.mlp.down_proj"].scales)
    nll_disk = windows_nll(load_export(tmp_path, "cpu"), ids, 256)
    assert nll_disk == pytest.approx(nll_mem, abs=1e-6)
    assert math.exp(nll_disk) < 80  # a working model (a scrambled one is in the millions)


@pytest.mark.parametrize("repacked", [False, True], ids=["plain-cpu", "avx512bf16-repacked"])
def test_stock_save_after_cpu_forward_is_scrambled_and_we_refuse_it(smollm2_dir, tmp_path, repacked, no_cpu_repacking):
    """Documents the upstream defect we guard against, and llmquant's clear refusal of such a file.

    Both CPU branches on any machine: without repacking, stock save_pretrained is exact; after
    bitsandbytes' AVX512-BF16 repacking (applied here as its forward applies it), it is scrambled.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmquant.backends.bnb import read_weight

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), quantization_config=cfg, dtype=torch.float32)
    prefix = "model.layers.0.mlp.up_proj."
    exact = m.get_submodule(prefix[:-1]).weight.quant_state.absmax.clone()
    logits_on(m, probe_ids(None, 49152))  # a CPU forward; repacks only where the CPU has AVX512-BF16
    if repacked:
        assert repack_like_avx512bf16(m) == 210
    m.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix + "weight")}
    if not repacked:
        assert torch.equal(tensors["weight.absmax"], exact)
        assert read_weight(tensors).scales.shape == exact.shape
        return
    assert tensors["weight.absmax"].dim() == 2 and tensors["weight.absmax"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scales are scrambled"):
        read_weight(tensors)


def test_demo_command(tmp_path, capsys):
    """The README's main command, on the GGUF asset, into a temporary folder."""
    out = tmp_path / "demo"
    recipe = tmp_path / "demo.yaml"
    assert main(["init", "demo", "-o", str(recipe)]) == 0  # as the README starts
    assert main(["run", str(recipe), "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.*.self_attn.q_proj" in printed and "int8" in printed and "nf4/g64" in printed
    for row in ("│ perplexity", "│ KL divergence, mean", "│ top-1 agreement with baseline", "│ botchan_cloze acc", "│ botchan_continuation acc"):
        assert row in printed, row  # baseline vs quantized in one table
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "llmquant.json", "tokenizer.json", "results.json", "results.md", "results.png"} <= files
    meta = json.loads((out / "llmquant.json").read_text())
    assert meta["checkpoint_format"] == "llmquant" and meta["export_check"]["passed"] is True
    res = json.loads((out / "results.json").read_text())
    base, q = res["models"]["baseline"], res["models"]["quantized"]
    assert 25 < base["perplexity"] < q["perplexity"] < 1.5 * base["perplexity"]  # SmolLM2 on held-out Botchan
    assert 0 < q["kl_divergence"]["mean"] < 1 and 0.5 < q["top1_agreement"] < 1
    assert set(base["tasks"]) == set(q["tasks"]) == {"botchan_cloze", "botchan_continuation"}
    assert res["protocol"]["perplexity"]["text"]["range"] == [0.6, 1.0]


def test_bad_recipe_on_real_model_fails_before_writing(smollm2_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {{source: {smollm2_dir}}}\nquantization:\n  rules: [{{match: '*.attn.*', format: int8}}]\noutput: {{dir: {tmp_path / 'out'}}}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: quantization.rules[0] (match *.attn.*): matches no Linear layer"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    bad.write_text(f"model: {{source: {smollm2_dir}}}\nquantization: {{default: {{format: nf4, group_size: 128}}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    assert main(["run", str(bad)]) == 2
    assert "group_size 128 does not divide its 576 inputs; block sizes that fit it: 32, 64" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_calibrated_nf4_export_beats_rtn_and_loads_in_plain_transformers(smollm2_dir, tmp_path):
    """GPTQ onto NF4 (stock block size, so a stock bitsandbytes checkpoint), on small token counts."""
    import os
    import subprocess
    import sys

    from llmquant.assets import asset_path

    def recipe(method, out):
        return Recipe.from_dict({
            "model": {"source": str(smollm2_dir)}, "device": "cpu",
            "quantization": {"default": {"format": "nf4"}, "method": method},
            "calibration": {"text": {"source": "asset:botchan", "range": [0.0, 0.6]}, "nsamples": 16, "seqlen": 256},
            "eval": {"text": {"source": "asset:botchan", "range": [0.6, 1.0]}, "seqlen": 512, "max_tokens": 2048,
                     "divergence_tokens": 1024},
            "output": {"dir": str(out)},
        })

    rtn = run(recipe("rtn", tmp_path / "rtn"), console=Console(file=io.StringIO()), progress=False).results
    gptq = run(recipe("gptq", tmp_path / "gptq"), console=Console(file=io.StringIO()), progress=False).results
    p_rtn, p_gptq = (r["models"]["quantized"]["perplexity"] for r in (rtn, gptq))
    assert p_gptq < 0.95 * p_rtn, (p_gptq, p_rtn)
    assert gptq["models"]["quantized"]["kl_divergence"]["mean"] < 0.8 * rtn["models"]["quantized"]["kl_divergence"]["mean"]
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    # plain transformers, llmquant not importable: the same perplexity on the same windows
    ids = torch.tensor(gptq["protocol"]["perplexity"]["tokens_used"])
    code = f"""
import sys, math, importlib.abc
class NoLlmquant(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'llmquant': raise ImportError('llmquant is not installed')
sys.meta_path.insert(0, NoLlmquant())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'gptq')!r})
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'gptq')!r}).eval()
text = open({str(asset_path("botchan"))!r}, encoding='utf-8').read()
ids = tok(text[int(len(text) * 0.6):], return_tensors='pt').input_ids[0][:{int(ids)}]
nll = 0.0
with torch.no_grad():
    for i in range(len(ids) // 512):
        x = ids[i * 512:(i + 1) * 512].unsqueeze(0)
        nll += m(x, labels=x).loss.double().item()
print('PPL', math.exp(nll / (len(ids) // 512)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    stock_ppl = float(proc.stdout.split("PPL")[1])
    assert stock_ppl == pytest.approx(p_gptq, rel=1e-4)
