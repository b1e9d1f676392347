"""Export -> reload -> same model, on tiny random models of several families."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

import bitsandbytes as bnb
from conftest import ARCHS, assert_same_logits, repack_like_avx512bf16
from llmquant.errors import ExportCheckError, UserError
from llmquant.export import load_export, logits_on, probe_ids, safetensors_bytes
from llmquant.pipeline import run
from llmquant.recipe import Recipe

pytestmark = pytest.mark.compat  # CI runs this module under the oldest and newest supported transformers

RECIPES = {
    "int8": {"default": {"format": "int8", "threshold": 6.0}},
    "nf4": {"default": {"format": "nf4", "double_quant": True}},
    "mixed": {
        "default": {"format": "nf4", "group_size": 32},
        "rules": [
            {"match": ["*.q_proj", "*.c_attn", "*.fc1"], "format": "int8", "threshold": 0.0},
            {"match": ["*.v_proj", "*.mlp.c_proj", "*.fc2"], "format": "fp4", "group_size": 128, "double_quant": True},
            {"match": ["*.up_proj", "*.c_fc", "*.out_proj"], "format": "fp16"},
        ],
    },
}


def recipe(model_dir, out, quant, **output) -> Recipe:
    return Recipe.from_dict({"model": {"source": str(model_dir)}, "device": "cpu", "quantization": quant,
                             "output": {"dir": str(out), **output}})


def quiet_run(r: Recipe, **kw):
    return run(r, console=Console(file=io.StringIO()), progress=False, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(RECIPES))
def test_export_reloads_to_the_same_model(tiny_dirs, tmp_path, arch, name):
    out = tmp_path / "out"
    res = quiet_run(recipe(tiny_dirs(arch), out, RECIPES[name]))
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "llmquant.json", "tokenizer.json"} <= files
    assert not list(tmp_path.glob(".out*")), "temporary folders left behind"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == ("llmquant" if name == "mixed" else "bitsandbytes")

    # an independent reload (not the pipeline's own check): layer types and logits
    fresh = load_export(out, "cpu")
    expected_types = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit}
    for layer in json.loads((out / "llmquant.json").read_text())["layers"]:
        m = fresh.get_submodule(layer["name"])
        fmt = layer["format"].split("/")[0].split("(")[0]
        if fmt in expected_types:
            assert isinstance(m, expected_types[fmt]), (layer, type(m))
        else:
            assert not isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)), layer
    ids = probe_ids(None, 512)
    base = load_export(tiny_dirs(arch), "cpu")
    q1, ref = logits_on(fresh, ids), logits_on(base, ids)
    rel = (q1 - ref).norm() / ref.norm()
    assert 0 < rel < 0.5, rel  # quantized: different from, but close to, the float model
    # the plan's size estimate is what was written (headers included)
    est, got = res.plan.file_bytes_estimate(), safetensors_bytes(out)
    assert abs(est - got) / got < 0.02, (est, got)


STOCK_LOADABLE = {
    "nf4": RECIPES["nf4"],
    # any mix of 4-bit types, block sizes and double quantization, and layers kept in the model's dtype
    "4bit-mix": {"default": {"format": "nf4", "group_size": 32},
                 "rules": [{"match": "*.v_proj", "format": "fp4", "group_size": 128, "double_quant": True},
                           {"match": "*.down_proj", "format": "nf4", "group_size": 256, "double_quant": True},
                           {"match": "*.layers.0.mlp.up_proj", "format": "fp32"}]},
    "int8+kept": {"default": {"format": "int8", "threshold": 0.0}, "rules": [{"match": "*.o_proj", "format": "fp32"}]},
}


@pytest.mark.parametrize("name", list(STOCK_LOADABLE))
def test_export_loads_without_llmquant(tiny_dirs, tmp_path, name):
    """Stock transformers + bitsandbytes, in a process where llmquant cannot be imported at all."""
    out = tmp_path / "out"
    quiet_run(recipe(tiny_dirs("llama"), out, STOCK_LOADABLE[name]))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    expected = logits_on(load_export(out, "cpu"), probe_ids(None, 512))
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import sys, importlib.abc
class NoLlmquant(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'llmquant': raise ImportError('llmquant is not installed')
sys.meta_path.insert(0, NoLlmquant())
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
ids = ((torch.arange(48) * 7919 + 11) % 512).unsqueeze(0)
with torch.no_grad(): got = m(ids).logits.float()
exp = torch.load({str(tmp_path / 'expected.pt')!r})
assert (got - exp).abs().max() <= 1e-4 * exp.abs().max(), (got - exp).abs().max()
assert 'llmquant' not in sys.modules
print('OK', *(type(m.get_submodule(n)).__name__ for n in ('model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj')))
qs = getattr(m.model.layers[1].mlp.down_proj.weight, 'quant_state', None)
print('down_proj', qs.blocksize if qs is not None else None)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = {"nf4": "OK Linear4bit Linear4bit\ndown_proj 64", "4bit-mix": "OK Linear Linear4bit\ndown_proj 256",
                "int8+kept": "OK Linear8bitLt Linear8bitLt\ndown_proj None"}[name]
    assert expected in proc.stdout, proc.stdout


def test_failed_check_leaves_nothing_and_keeps_previous_export(tiny_dirs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    quiet_run(recipe(tiny_dirs("llama"), out, RECIPES["int8"]))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def broken(*a, **k):
        raise ExportCheckError("simulated mismatch")

    monkeypatch.setattr("llmquant.export._verify", broken)  # the check of both the streamed and the whole-model path
    with pytest.raises(ExportCheckError):
        quiet_run(recipe(tiny_dirs("llama"), out, RECIPES["nf4"], overwrite=True))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    with pytest.raises(ExportCheckError):
        quiet_run(recipe(tiny_dirs("llama"), tmp_path / "fresh", RECIPES["nf4"]))
    assert not (tmp_path / "fresh").exists()
    # the written checkpoints are kept beside the output, visibly, for `llmquant check --into`
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and names[0].startswith("fresh.unchecked-") and names[1] == "out" and names[2].startswith("out.unchecked-")


def test_interrupt_while_writing_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    from llmquant.stream import WorkFolder

    real = WorkFolder.link_export

    def interrupted(*args):  # the export's files in place, the rest not yet
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "link_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quiet_run(recipe(tiny_dirs("llama"), tmp_path / "out", RECIPES["nf4"]))
    # nothing under the output's name; only the hidden work folder a rerun resumes from
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.llmquant-partial-"), left
    monkeypatch.undo()
    assert quiet_run(recipe(tiny_dirs("llama"), tmp_path / "out", RECIPES["nf4"])).resumed_from == 2  # both layers were done
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_folder_rules(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        quiet_run(recipe(tiny_dirs("llama"), out, RECIPES["nf4"]))
    with pytest.raises(UserError, match="was not written by llmquant"):
        quiet_run(recipe(tiny_dirs("llama"), out, RECIPES["nf4"], overwrite=True))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        quiet_run(recipe(tiny_dirs("llama"), tmp_path / "file", RECIPES["nf4"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    quiet_run(recipe(tiny_dirs("llama"), empty, RECIPES["nf4"]))  # an empty folder is fine
    quiet_run(recipe(tiny_dirs("llama"), empty, RECIPES["int8"], overwrite=True))  # our own export is replaced
    assert json.loads((empty / "config.json").read_text())["quantization_config"]["load_in_8bit"]


def test_stale_temporary_of_a_killed_run_is_cleaned(tiny_dirs, tmp_path):
    stale = tmp_path / ".out.llmquant-tmp-999999999-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    quiet_run(recipe(tiny_dirs("llama"), tmp_path / "out", RECIPES["int8"]))
    assert not stale.exists()


def test_sharded_export(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    res = quiet_run(recipe(tiny_dirs("mistral"), out, RECIPES["mixed"], max_shard_size="200KB"))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert res.check.passed and res.check.max_abs_logit_diff <= res.check.tolerance


@pytest.mark.parametrize("repacked", [False, True], ids=["plain-cpu", "avx512bf16-repacked"])
def test_exported_4bit_scales_are_exact_whatever_the_cpu_did(tiny_dirs, repacked, no_cpu_repacking):
    """The export is written from the chosen codes and scales, never from bitsandbytes' (possibly repacked) state."""
    from llmquant.quantize import collect_tensors
    from llmquant.models import load_model, resolve_source
    from llmquant.plan import build_plan
    from llmquant.quantize import quantize_model
    from llmquant.recipe import Quantization

    model, _ = load_model(resolve_source(str(tiny_dirs("llama"))), "float32", "cpu")
    plan = build_plan(model, Quantization.model_validate(RECIPES["nf4"]), torch.float32)
    chosen = quantize_model(model, plan, progress=False)
    logits_on(model, probe_ids(None, 512))  # a CPU forward (no repacking: the feature probe is off)
    if repacked:
        assert repack_like_avx512bf16(model) == 14
    name = "model.layers.0.mlp.up_proj"
    qs = model.get_submodule(name).weight.quant_state
    assert (qs.absmax.dim() == 2) == repacked  # the module's own scales: scrambled layout when repacked
    sd = collect_tensors(model, plan, chosen)
    absmax = sd[name + ".weight.absmax"]
    assert absmax.shape == (256 * 128 // 64,) and absmax.dtype == torch.uint8  # double quant: 8-bit codes, 1-D
    assert torch.equal(absmax, chosen[name].nested.codes)


@pytest.mark.parametrize("repacked", [False, True], ids=["plain-cpu", "avx512bf16-repacked"])
def test_llmquant_loaded_model_saves_exactly_after_cpu_use(tiny_dirs, tmp_path, repacked, no_cpu_repacking):
    """save_pretrained of a model loaded through llmquant is exact, whether or not bitsandbytes repacked it."""
    out = tmp_path / "out"
    quiet_run(recipe(tiny_dirs("qwen2"), out, RECIPES["mixed"]))
    m = load_export(out, "cpu")
    ids = probe_ids(None, 512)
    before = logits_on(m, ids)
    n4 = sum(isinstance(mod, bnb.nn.Linear4bit) for mod in m.modules())
    assert n4 > 0
    if repacked:  # what the forward pass does on AVX512-BF16 CPUs
        assert repack_like_avx512bf16(m) == n4
    packed = [n for n, mod in m.named_modules() if isinstance(mod, bnb.nn.Linear4bit) and getattr(mod.weight.quant_state, "packing_format_for_cpu", False)]
    assert len(packed) == (n4 if repacked else 0)
    m.save_pretrained(tmp_path / "resaved")
    assert_same_logits(logits_on(m, ids), before)  # the in-memory model is whole again
    assert_same_logits(logits_on(load_export(tmp_path / "resaved", "cpu"), ids), before)
    with safe_open(str(tmp_path / "resaved" / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        for k in b.keys():
            if k.endswith("absmax") or k.endswith(".weight"):
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
