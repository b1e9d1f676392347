"""The GPU paths, on a CUDA GPU (skipped without one; `scripts/gpu_check.sh` runs them first): streamed RTN, GPTQ and
AWQ on CUDA give exports that reload and check there, INT8 and NF4 layers reload with the right statistics, a model
spread with accelerate's device map evaluates as it does whole, and the bench times with CUDA events."""

import io
import json

import pytest
import torch
from rich.console import Console

from conftest import TEXT
from llmquant.pipeline import run
from llmquant.recipe import Recipe

pytestmark = pytest.mark.cuda


def _recipe(model_dir, out, quant, calib=None, **extra):
    d = {"model": {"source": str(model_dir)}, "device": "cuda", "quantization": quant, "output": {"dir": str(out)}, **extra}
    if calib is not None:
        d["calibration"] = {"text": {"source": str(calib)}, "nsamples": 8, "seqlen": 64}
    return Recipe.from_dict(d)


def _quiet(r):
    return run(r, console=Console(file=io.StringIO()), progress=False)


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(TEXT * 4)
    return p


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq+gptq"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_methods_on_cuda_export_checked_checkpoints(tiny_dirs, tmp_path, calib, method, arch):
    quant = {"default": "nf4", "method": method, "rules": [{"match": "*.k_proj", "format": "int8"}]}
    res = _quiet(_recipe(tiny_dirs(arch), tmp_path / "out", quant, None if method == "rtn" else calib))
    assert res.streamed and res.check.passed
    assert res.check.tensors_checked > 0 and res.check.max_abs_logit_diff <= res.check.tolerance


def test_a_streamed_run_on_cuda_records_its_gpu_peak_and_leaves_no_cache(tiny_dirs, tmp_path, calib):
    torch.cuda.reset_peak_memory_stats()
    res = _quiet(_recipe(tiny_dirs("llama"), tmp_path / "out", {"default": "nf4", "method": "gptq"}, calib))
    peak = json.loads((tmp_path / "out" / "llmquant.json").read_text())["peak_memory_bytes"]
    assert 0 < peak["gpu_bytes"] == res.peak_memory["gpu_bytes"] < 2**30 and peak["host_bytes"] > 0
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 64 << 20  # the cache emptied between layers


def test_gptq_on_cuda_chooses_what_it_chooses_on_cpu(tiny_dirs, tmp_path, calib):
    """The same weights within float rounding: the codes of most blocks agree."""
    from safetensors.torch import load_file

    quant = {"default": "nf4", "method": "gptq"}
    _quiet(_recipe(tiny_dirs("llama"), tmp_path / "gpu", quant, calib))
    cpu = _recipe(tiny_dirs("llama"), tmp_path / "cpu", quant, calib).with_overrides({"device": "cpu"})
    _quiet(cpu)
    a, b = load_file(tmp_path / "gpu" / "model.safetensors"), load_file(tmp_path / "cpu" / "model.safetensors")
    codes = [k for k in a if k.endswith("proj.weight")]
    same = sum((a[k] == b[k]).float().mean().item() for k in codes) / len(codes)
    assert same > 0.95, same


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_int8_and_nf4_reload_and_check_on_cuda(tiny_dirs, tmp_path, fmt):
    import bitsandbytes as bnb

    from llmquant.export import load_export, logits_on, probe_ids

    _quiet(_recipe(tiny_dirs("llama"), tmp_path / "out", {"default": fmt}))
    model = load_export(tmp_path / "out", "cuda")
    layer = model.model.layers[0].self_attn.q_proj
    if fmt == "int8":
        assert isinstance(layer, bnb.nn.Linear8bitLt)
        assert layer.weight.SCB is not None or layer.state.SCB is not None  # the row statistics are set on the GPU
    else:
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state is not None
    base = load_export(tiny_dirs("llama"), "cuda")
    ids = probe_ids(None, 512)
    q, ref = logits_on(model, ids), logits_on(base, ids)
    assert 0 < ((q - ref).norm() / ref.norm()).item() < 0.5


def test_int8_layers_reloaded_one_at_a_time_on_cuda_have_their_row_statistics(tiny_dirs, tmp_path):
    """The layer-by-layer reload (the streamed check and evaluation) on the GPU: each INT8 weight is its own CB with
    the file's SCB, as from_pretrained loads it there, and computes what it computes there."""
    import bitsandbytes as bnb

    from llmquant.export import load_export
    from llmquant.stream import LayeredReload

    _quiet(_recipe(tiny_dirs("llama"), tmp_path / "out", {"default": "int8"}))
    whole = load_export(tmp_path / "out", "cuda")
    reload = LayeredReload(tmp_path / "out", torch.float32, "cuda")
    with reload.layer(1) as layer:
        q, ref = layer.self_attn.q_proj, whole.model.layers[1].self_attn.q_proj
        assert isinstance(q, bnb.nn.Linear8bitLt) and q.weight.device.type == "cuda"
        assert q.weight.CB is not None and q.weight.CB.data_ptr() == q.weight.data_ptr()
        assert torch.equal(q.weight.SCB, ref.weight.SCB)
        x = torch.randn(1, 5, whole.config.hidden_size, device="cuda")
        assert torch.allclose(q(x), ref(x))
    reload.close()


def test_a_device_map_spread_model_evaluates_as_it_does_whole(tiny_dirs, tmp_path):
    from llmquant.evaluate.perplexity import evaluate, make_windows
    from llmquant.models import load_model, resolve_source

    src = resolve_source(str(tiny_dirs("llama")))
    whole, _ = load_model(src, "float32", "cuda")
    spread, _ = load_model(src, "float32", "cuda", max_memory={0: 200_000, "cpu": 10**9}, offload_folder=tmp_path / "off")
    ids = torch.randint(0, whole.config.vocab_size, (4 * 64,))
    windows = make_windows(len(ids), 64, "windows")
    a = evaluate(whole, ids, windows, batch_size=2, progress=False).perplexity
    b = evaluate(spread, ids, windows, batch_size=2, progress=False).perplexity
    assert a == pytest.approx(b, rel=1e-4)


def test_bench_times_on_cuda(tiny_dirs, tmp_path):
    from llmquant.cli import main

    assert main(["bench", str(tiny_dirs("llama")), "--device", "cuda", "--batch-sizes", "1,4", "--prompt-tokens", "16",
                 "--new-tokens", "4", "--repeats", "2", "--output", str(tmp_path / "b")]) == 0
    speed = json.loads((tmp_path / "b" / "speed.json").read_text())
    row = speed["models"]["model"]["rows"][1]
    assert speed["gpu"] and row["batch_size"] == 4 and row["peak_device_bytes"] > 0
    assert row["decode_tokens_per_second"]["median"] > 0
