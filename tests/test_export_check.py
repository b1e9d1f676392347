"""The export check: exact on tensors, noise-aware on logits, and it keeps the work when it fails."""

import io
import json
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import ARCHS
from llmquant import export as export_mod
from llmquant.cli import main
from llmquant.errors import ExportCheckError
from llmquant.export import compare_logits, logits_on, probe_ids, verify_export, verify_streamed_export, write_checkpoint
from llmquant.models import load_model, resolve_source
from llmquant.pipeline import run
from llmquant.plan import build_plan
from llmquant.quantize import quantize_model
from llmquant.recipe import Quantization, Recipe

PLAIN = {"default": {"format": "nf4", "group_size": 32}, "rules": [{"match": "*.q_proj", "format": "int8", "threshold": 0.0}]}


def quiet_run(model_dir, out, quant, **output):
    r = Recipe.from_dict({"model": {"source": str(model_dir)}, "device": "cpu", "quantization": quant,
                          "output": {"dir": str(out), **output}})
    return run(r, console=Console(file=io.StringIO()), progress=False)


# ---- logits: run-to-run noise passes, a different function fails ---------------------------------


def test_compare_logits_tolerates_noise_and_catches_real_differences():
    torch.manual_seed(0)
    ref = torch.randn(1, 48, 512) * 10
    calls = {"n": 0}

    def noisy_once():  # a busy CPU changed the reduction order in the first run only
        calls["n"] += 1
        return ref + (0.05 if calls["n"] == 1 else 0.0)

    diff, tol, noise, attempts = compare_logits(lambda: ref.clone(), noisy_once, torch.float32)
    assert diff <= tol and attempts == 2 and diff == 0
    # noise in every run of both models (each run differs from the one before): judged against that noise
    a, b = iter(range(100)), iter(range(1, 100))
    diff, tol, noise, _ = compare_logits(lambda: ref + 0.1 * (next(a) % 2), lambda: ref + 0.1 * (next(b) % 2), torch.float32)
    assert diff <= tol and noise == pytest.approx(0.1, rel=1e-3)
    # a model computing something else differs the same way every time
    for offset in (0.05, 1.0):
        diff, tol, _, attempts = compare_logits(lambda: ref.clone(), lambda: ref + offset, torch.float32)
        assert diff > tol and attempts == 3
    nan = ref.clone()
    nan[0, 3, 7] = float("nan")
    assert compare_logits(lambda: ref.clone(), lambda: nan, torch.float32)[0] == float("inf")


def test_check_passes_while_the_cpu_is_busy(tiny_dirs, tmp_path):
    """Other processes compete for every core during the whole run, its check included."""
    burners = [subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<120: sum(range(10000))"])
               for _ in range(4)]
    try:
        for i, arch in enumerate(("llama", "qwen2")):
            res = quiet_run(tiny_dirs(arch), tmp_path / f"out{i}", PLAIN)  # raises ExportCheckError when the check fails
            # and the check compared every tensor of the model with the files
            params = dict(AutoModelForCausalLM.from_pretrained(tiny_dirs(arch)).named_parameters())
            assert res.check.tensors_checked == len(params) and res.check.attempts >= 1
    finally:
        for b in burners:
            b.kill()


# ---- broken checkpoints are caught ---------------------------------------------------------------------


def _written(tiny_dirs, tmp_path, quant):
    model, tok = load_model(resolve_source(str(tiny_dirs("llama"))), "float32", "cpu")
    plan = build_plan(model, Quantization.model_validate(quant), torch.float32)
    chosen = quantize_model(model, plan, progress=False)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_checkpoint(folder, model, tok, plan, chosen, 10**10)
    return folder, model, plan, chosen


def _edit_tensors(folder, edit):
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


L = "model.layers.1.mlp.up_proj.weight"


def _scale_one_block(sd):
    sd[L + ".absmax"][3] *= 1.5


def _swap_blocks(sd):
    a = sd[L + ".absmax"]
    a[[0, 1]] = a[[1, 0]]


def _scramble_absmax(sd):  # what bitsandbytes' CPU repacking leaves in state_dict()
    a = sd[L + ".absmax"]
    sd[L + ".absmax"] = a.reshape(256, -1).T.to(torch.bfloat16).contiguous()


def _swap_codes(sd):
    w = sd[L]
    w[:16], w[16:32] = w[16:32].clone(), w[:16].clone()


def _int8_row(sd):
    sd["model.layers.0.self_attn.q_proj.SCB"][5] *= 1.01


def _norm(sd):
    sd["model.layers.0.input_layernorm.weight"][0] += 1e-3


def _wrong_format(sd):  # the layer's packed quant_state says fp4 for codes chosen on the NF4 codebook
    key = L + ".quant_state.bitsandbytes__nf4"
    packed = bytes(sd.pop(key).tolist()).replace(b'"nf4"', b'"fp4"')
    sd[key.replace("nf4", "fp4")] = torch.tensor(list(packed), dtype=torch.uint8)


BROKEN_TENSORS = {"wrong-scale": _scale_one_block, "swapped-blocks": _swap_blocks, "scrambled-absmax": _scramble_absmax,
                  "swapped-codes": _swap_codes, "int8-row-scale": _int8_row, "norm-weight": _norm,
                  "wrong-format": _wrong_format}
BROKEN_CONFIGS = {
    "rope-theta": lambda c: c.update(rope_theta=c.get("rope_theta", 10000.0) * 2, rope_parameters=None),
    "norm-eps": lambda c: c.update(rms_norm_eps=0.5),
}


@pytest.mark.parametrize("name", list(BROKEN_TENSORS) + list(BROKEN_CONFIGS))
def test_every_broken_checkpoint_fails_the_check(tiny_dirs, tmp_path, name):
    folder, model, plan, chosen = _written(tiny_dirs, tmp_path, PLAIN)
    ids = probe_ids(None, 512)
    verify_export(folder, model, plan, chosen, ids)  # intact: passes
    if name in BROKEN_TENSORS:
        _edit_tensors(folder, BROKEN_TENSORS[name])
    else:
        _edit_config(folder, BROKEN_CONFIGS[name])
    with pytest.raises(ExportCheckError):
        verify_export(folder, model, plan, chosen, ids)


@pytest.mark.parametrize("name", list(BROKEN_TENSORS) + list(BROKEN_CONFIGS))
def test_the_layer_by_layer_check_catches_them_too(tiny_dirs, tmp_path, name):
    """A streamed run's check reloads one decoder layer at a time (layer 0 and everything outside the layers with
    from_pretrained, each other layer on its own) and compares with the logits the quantized model computed."""
    from llmquant.stream import LayeredReload

    folder, model, plan, chosen = _written(tiny_dirs, tmp_path, PLAIN)
    ids = probe_ids(None, 512)
    ref = logits_on(model, ids)
    verify_streamed_export(folder, plan, ids, ref, "cpu")  # intact: passes
    reload = LayeredReload(folder, torch.float32, "cpu")
    reload.run(ids)
    left = [n for n, t in reload.skeleton.get_submodule(reload.stack)[1:].state_dict().items() if t.device.type != "meta"]
    assert not left  # each layer was given back once it had run
    if name in BROKEN_TENSORS:
        _edit_tensors(folder, BROKEN_TENSORS[name])
    else:
        _edit_config(folder, BROKEN_CONFIGS[name])
    with pytest.raises(ExportCheckError):
        verify_streamed_export(folder, plan, ids, ref, "cpu")


def test_a_layer_reloaded_on_its_own_has_the_statistics_transformers_gives_it(tiny_dirs, tmp_path):
    """INT8 and NF4 layers filled one at a time get what from_pretrained gives them: an int8 weight that is its own
    CB with the file's row scales (SCB), a 4-bit weight with the file's quant_state. (bitsandbytes takes an int8 weight
    the same way on any device: Int8Params of int8 data moves it and its SCB, without quantizing it again; the `cuda`
    tests check it on a GPU.)"""
    import bitsandbytes as bnb

    from llmquant.export import load_export
    from llmquant.stream import LayeredReload

    folder, *_ = _written(tiny_dirs, tmp_path, PLAIN)
    whole = load_export(folder, "cpu")
    reload = LayeredReload(folder, torch.float32, "cpu")
    with reload.layer(1) as layer:
        seen = 0
        for name, m in layer.named_modules():
            ref = whole.model.layers[1].get_submodule(name)
            if isinstance(m, bnb.nn.Linear8bitLt):
                assert m.weight.dtype == torch.int8 and m.weight.CB is not None and m.weight.CB.data_ptr() == m.weight.data_ptr()
                assert torch.equal(m.weight.SCB, ref.weight.SCB) and torch.equal(m.weight.data, ref.weight.data)
                assert not m.weight.has_fp16_weights and not ref.weight.has_fp16_weights
                seen += 1
            elif isinstance(m, bnb.nn.Linear4bit):
                a, b = m.weight.quant_state, ref.weight.quant_state
                assert torch.equal(m.weight.data, ref.weight.data) and torch.equal(a.absmax, b.absmax)
                assert (a.blocksize, a.quant_type, a.shape) == (b.blocksize, b.quant_type, b.shape)
                seen += 1
        assert seen == 7
        x = torch.randn(1, 5, whole.config.hidden_size)
        q = layer.self_attn.q_proj
        assert torch.allclose(q(x), whole.model.layers[1].self_attn.q_proj(x), atol=1e-6)
    reload.close()


def test_the_layer_by_layer_check_needs_every_tensor(tiny_dirs, tmp_path):
    folder, model, plan, chosen = _written(tiny_dirs, tmp_path, PLAIN)
    ids = probe_ids(None, 512)
    ref = logits_on(model, ids)
    for key in ("model.layers.0.post_attention_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"):
        sd = load_file(str(folder / "model.safetensors"))
        kept = sd.pop(key)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ExportCheckError, match="does not load"):
            verify_streamed_export(folder, plan, ids, ref, "cpu")
        sd[key] = kept
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_failed_check_keeps_the_work_and_check_puts_it_in_place(tiny_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(export_mod, "compare_logits", lambda *a, **k: (1.0, 1e-3, 0.0, 3))  # a spurious failure
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: {tiny_dirs('llama')}}}\ndevice: cpu\noutput: {{dir: out}}\nquantization: {{default: nf4}}\n")
    assert main(["run", str(recipe), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.unchecked-")]
    assert len(kept) == 1 and f"kept, unchecked, in {kept[0]}" in err and f"llmquant check {kept[0]} --into out" in err
    meta = json.loads((kept[0] / "llmquant.json").read_text())
    assert meta["export_check"]["passed"] is False and "does not compute like" in meta["export_check"]["error"]
    assert "did not pass" in (kept[0] / "README.md").read_text()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["push", str(kept[0]), "--repo", "me/x"]) == 2  # refused until checked
    assert "run `llmquant check" in capsys.readouterr().err
    assert main(["check", str(kept[0]), "--into", "out"]) == 0
    assert not kept[0].exists() and (out / "model.safetensors").is_file()
    meta = json.loads((out / "llmquant.json").read_text())
    assert meta["export_check"]["passed"] is True and meta["export_check"]["tensors_checked"] > 10
    assert "did not pass" not in (out / "README.md").read_text()
    assert main(["check", "out"]) == 0


def test_check_command_refuses_a_tampered_folder(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    quiet_run(tiny_dirs("llama"), out, {"default": "nf4"})
    _edit_config(out, lambda c: c.update(rms_norm_eps=0.5))  # config.json is not checksummed: the reload tells
    assert main(["check", str(out)]) == 2
    assert "reloads, but not to the model that was exported" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHS)
def test_exports_follow_the_umask(tiny_dirs, tmp_path, arch):
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        quiet_run(tiny_dirs(arch), out, {"default": "nf4"}, max_shard_size="300KB")
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
        assert len([n for n in modes if n.endswith(".safetensors")]) > 1
        assert set(modes.values()) == {0o644}, modes
    finally:
        os.umask(old)
