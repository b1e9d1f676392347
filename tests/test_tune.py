"""Quantization-aware tuning (methods tune and gptq+tune): the grid is bitsandbytes', the export holds exactly
the tuned weights, and a tuned layer beats round to nearest and GPTQ on inputs it was not tuned on."""

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import TEXT, VOCAB
from llmquant.algorithms import ALGORITHMS
from llmquant.algorithms.rtn import rtn_4bit, rtn_int8
from llmquant.algorithms.scale_search import LayerStats
from llmquant.algorithms.tune import ScaledLinear, TunedLinear, top_k_kl, tune_layer
from llmquant.backends.bnb import checkpoint_tensors, read_weight
from llmquant.calibrate import calibration_windows, decoder_layers
from llmquant.walk import call_layer, capture
from llmquant.errors import UserError
from llmquant.pipeline import run
from llmquant.quantized import codebook
from llmquant.recipe import Recipe
from llmquant.schemes import FourBit, Int8

SCHEMES = {
    "nf4": FourBit(format="nf4"),
    "fp4-g32": FourBit(format="fp4", group_size=32),
    "nf4-g128-dq": FourBit(format="nf4", group_size=128, double_quant=True),
    "int8": Int8(),
}


def _start(w, scheme):
    return rtn_4bit(w, scheme, torch.float32) if isinstance(scheme, FourBit) else rtn_int8(w, scheme)


def _bnb_dequantize(qw) -> torch.Tensor:
    """What bitsandbytes itself computes with, from the tensors the checkpoint stores."""
    import bitsandbytes.functional as bf
    from bitsandbytes.functional import QuantState

    t = checkpoint_tensors(qw, "")
    if "SCB" in t:
        return bf.int8_vectorwise_dequant(t["weight"], t["SCB"]).float()
    qs = QuantState.from_dict({k: v for k, v in t.items() if k.startswith("weight.")}, device=torch.device("cpu"))
    return bf.dequantize_4bit(t["weight"], qs).float()


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_the_start_is_the_starting_choice_exactly(scheme):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.02
    start = _start(w, scheme)
    got = TunedLinear(w, start, scheme, None).result(torch.float32)
    assert torch.equal(got.codes, start.codes)
    if isinstance(scheme, FourBit):
        assert torch.equal(got.scales, start.scales)
        if scheme.double_quant:
            assert torch.equal(got.nested.codes, start.nested.codes) and torch.equal(got.nested.offset, start.nested.offset)
    else:
        assert torch.equal(got.scb, start.scb)


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_the_tuned_weight_is_what_bitsandbytes_dequantizes(scheme):
    torch.manual_seed(1)
    w = torch.randn(48, 256) * 0.02
    start = _start(w, scheme)
    m = TunedLinear(w, start, scheme, None)
    with torch.no_grad():  # push every offset somewhere else, past the range allowed
        m.v.add_(torch.randn_like(m.v) * 3)
        m.step(0.0)
    # for the starting scales, each weight moved at most one code (in the codebook's sorted order)
    codes = m.result(torch.float32).codes
    if isinstance(scheme, FourBit):
        rank = torch.argsort(torch.argsort(codebook(scheme.format)))  # code -> position in sorted order
        moved = (rank[codes.long()] - rank[start.codes.long()]).abs()
    else:
        moved = (codes.int() - start.codes.int()).abs()
    assert moved.max() == 1 and moved.float().mean() > 0.1
    with torch.no_grad():  # and the scales, past their range too
        m.f.mul_(torch.empty_like(m.f).uniform_(0.3, 1.7))
        m.step(0.0)
    assert m.f.min() >= 0.5 and m.f.max() <= 1.5
    qw = m.result(torch.float32)
    assert not torch.equal(qw.codes, codes)
    # the forward's weight is exactly bitsandbytes' dequantization of the stored tensors
    assert torch.equal(m.weight_value(), _bnb_dequantize(qw))
    back = read_weight(checkpoint_tensors(qw, ""), torch.float32)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.dequantize(), qw.dequantize())


def test_gradients_reach_offsets_and_scales():
    torch.manual_seed(2)
    w = torch.randn(32, 128) * 0.02
    m = TunedLinear(w, _start(w, SCHEMES["nf4"]), SCHEMES["nf4"], None)
    x = torch.randn(16, 128)
    torch.nn.functional.mse_loss(m(x), x @ w.t()).backward()
    assert m.v.grad.abs().sum() > 0 and m.f.grad.abs().sum() > 0


# ---- one real decoder layer (SmolLM2) -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_layer(smollm2_dir, botchan_text):
    """Layer 3 of SmolLM2 with its inputs (float model) on calibration windows and on held-out windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    n = len(botchan_text)
    _, layers = decoder_layers(model)

    def inputs(windows):
        xs, calls = capture(model, layers, windows.unsqueeze(1), "cpu")
        for b in range(len(xs)):
            for i in range(3):
                xs[b] = call_layer(layers[i], xs[b], calls.of(b, i), "cpu")
        return xs, calls.of(0, 3)

    calib, call = inputs(calibration_windows(tok, botchan_text[: int(0.6 * n)], 32, 256, 0))
    held, _ = inputs(calibration_windows(tok, botchan_text[int(0.6 * n):], 8, 256, 1))
    return layers[3], calib, held, call


def _outputs(layer, xs, call, weights=None):
    saved = {}
    if weights:
        for n, qw in weights.items():
            saved[n] = layer.get_submodule(n).weight.data
            layer.get_submodule(n).weight.data = qw.dequantize()
    try:
        with torch.no_grad():
            return [call_layer(layer, x, call, "cpu") for x in xs]
    finally:
        for n, w in saved.items():
            layer.get_submodule(n).weight.data = w


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_an_int8_layer_tunes_on_the_product_llm_int8_computes(threshold):
    """bitsandbytes' INT8 product rounds the inputs too (per token, outlier columns aside): the tuning's forward
    computes that product, not the float inputs times the dequantized weight."""
    from llmquant.backends.bnb import build_module

    torch.manual_seed(3)
    w = torch.randn(64, 256) * 0.02
    scheme = Int8(threshold=threshold)
    m = TunedLinear(w, _start(w, scheme), scheme, None)
    x = torch.randn(40, 256)
    x[3, 7] = 9.0  # an outlier column above the threshold 6
    with torch.no_grad():
        y = build_module(m.result(torch.float32), None, torch.float32, "cpu")(x)
        plain = x @ m.weight_value().t()
        assert (m(x) - y).norm() < 0.05 * (plain - y).norm()
    torch.nn.functional.mse_loss(m(x), x @ w.t()).backward()
    assert m.v.grad.abs().sum() > 0 and m.f.grad.abs().sum() > 0


def test_a_tuned_layer_beats_rtn_and_gptq_on_held_out_inputs(smollm2_layer):
    layer, calib, held, call = smollm2_layer
    scheme = FourBit(format="nf4")
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    hess: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: hess.__setitem__(n, hess.get(n, 0) + (
        lambda x: x.t().double() @ x.double())(a[0].reshape(-1, a[0].shape[-1])))) for n, m in linears.items()]
    targets = _outputs(layer, calib, call)
    for h in hooks:
        h.remove()
    tokens = sum(x.shape[1] for x in calib)
    weights = {n: m.weight.detach().float().clone() for n, m in linears.items()}
    rtn = {n: ALGORITHMS["rtn"].quantize(w, scheme, torch.float32) for n, w in weights.items()}
    gptq = {n: ALGORITHMS["gptq"].quantize(w, scheme, torch.float32, LayerStats((hess[n] / tokens).float(), tokens, {}))
            for n, w in weights.items()}
    opts = {"steps": 100, "lr": None, "batch": 1, "seed": 0}
    tuned, report = tune_layer(layer, {n: (weights[n], gptq[n], scheme) for n in linears}, {}, calib, targets, call,
                               torch.device("cpu"), opts, torch.float32)
    assert all(torch.equal(layer.get_submodule(n).weight, w) for n, w in weights.items())  # the layer is given back as it was

    truth = _outputs(layer, held, call)

    def held_out_error(qws):
        return sum(((y - t) ** 2).mean().item() for y, t in zip(_outputs(layer, held, call, qws), truth)) / len(held)

    e_rtn, e_gptq, e_tuned = held_out_error(rtn), held_out_error(gptq), held_out_error(tuned)
    assert report["loss_after"] < 0.95 * report["loss_before"] and not report["kept_start"]
    assert e_tuned < 0.97 * e_gptq < 0.97 * e_rtn, (e_rtn, e_gptq, e_tuned)


# ---- through the pipeline (tiny models) -----------------------------------------------------------


@pytest.fixture
def texts(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT * 8)
    return f


def _recipe(model_dir, out, text, method="gptq+tune", fmt="nf4", **tune):
    return Recipe.from_dict({
        "model": {"source": str(model_dir)}, "device": "cpu",
        "quantization": {"default": fmt, "method": method},
        "calibration": {"text": {"source": str(text), "range": [0.0, 0.6]}, "nsamples": 8, "seqlen": 32,
                        "tune": {"steps": 20, **tune}},
        "output": {"dir": str(out)},
    })


def _run(recipe):
    return run(recipe, console=Console(file=io.StringIO()), progress=False)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_the_export_holds_exactly_the_tuned_weights(tiny_dirs, tmp_path, texts, monkeypatch, fmt):
    import llmquant.algorithms.tune as tune_mod

    seen: list = []  # each decoder layer's tuned weights, in order
    real = tune_mod.tune_layer

    def spy(layer, tuned, *a, **kw):
        results, report = real(layer, tuned, *a, **kw)
        seen.append(results)
        return results, report

    monkeypatch.setattr(tune_mod, "tune_layer", spy)
    res = _run(_recipe(tiny_dirs("llama"), tmp_path / "out", texts, fmt=fmt))
    assert res.check.passed
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    meta = json.loads((tmp_path / "out" / "llmquant.json").read_text())
    reports = [layer["tune"] for layer in meta["calibration"]["layers"]]
    # the report keeps the best step: tuning that moved nothing (no gradient, a zero step) would report equal losses
    assert len(reports) == 2 and all(r["loss_after"] < 0.999 * r["loss_before"] for r in reports), reports
    compared = 0
    for i, results in enumerate(seen):
        for rel, qw in results.items():
            prefix = f"model.layers.{i}.{rel}."
            got = read_weight({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}, torch.float32)
            assert torch.equal(got.codes, qw.codes)
            assert torch.equal(got.dequantize(), qw.dequantize())
            compared += 1
    assert compared == 14  # 7 Linear layers in each of 2 decoder layers


def test_tuning_is_deterministic_and_a_worse_tuning_is_dropped(tiny_dirs, tmp_path, texts):
    digest = lambda d: hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    _run(_recipe(tiny_dirs("qwen2"), tmp_path / "a", texts))
    _run(_recipe(tiny_dirs("qwen2"), tmp_path / "b", texts))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    # one signed step of a whole code moves every weight: worse than GPTQ's choice, so GPTQ's choice is kept
    _run(_recipe(tiny_dirs("qwen2"), tmp_path / "worse", texts, steps=1, lr=1.0))
    _run(_recipe(tiny_dirs("qwen2"), tmp_path / "gptq", texts, method="gptq"))
    meta = json.loads((tmp_path / "worse" / "llmquant.json").read_text())
    assert all(layer["tune"]["kept_start"] for layer in meta["calibration"]["layers"])
    assert digest(tmp_path / "worse") == digest(tmp_path / "gptq")
    assert digest(tmp_path / "a") != digest(tmp_path / "gptq")


def test_tune_from_rtn_on_a_bfloat16_model(tmp_path, texts):
    from conftest import build_tiny, tiny_tokenizer

    d = tmp_path / "bf16"
    build_tiny("mistral", torch.bfloat16).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    res = _run(_recipe(d, tmp_path / "out", texts, method="tune"))
    assert res.check.passed
    layers = res.calibration["layers"]
    assert all(layer["tune"]["loss_after"] < layer["tune"]["loss_before"] for layer in layers)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"  # uniform NF4: stock-loadable
    norms = {k: v.dtype for k, v in load_file(tmp_path / "out" / "model.safetensors").items() if "norm" in k}
    assert norms and set(norms.values()) == {torch.bfloat16}


def test_settings_and_refusals(tiny_dirs, tmp_path, texts, monkeypatch):
    with pytest.raises(ValueError, match="steps"):
        _recipe(tiny_dirs("llama"), tmp_path / "o", texts, steps=0)
    with pytest.raises(ValueError, match="momentum"):
        _recipe(tiny_dirs("llama"), tmp_path / "o", texts, momentum=0.9)
    with pytest.raises(ValueError, match="needs calibration data"):
        Recipe.from_dict({"model": {"source": "x"}, "quantization": {"method": "tune"}, "output": {"dir": "o"}})
    with pytest.raises(ValueError, match="quantization.auto works with methods rtn, scale_search and gptq, not gptq\\+tune"):
        Recipe.from_dict({"model": {"source": "x"}, "quantization": {"method": "gptq+tune", "auto": {"bits_per_weight": 4.5}},
                          "calibration": {"nsamples": 2, "seqlen": 16}, "output": {"dir": "o"}})
    with pytest.raises(ValueError, match="model_steps tunes the scales a calibrated method chose; this recipe's methods \\(rtn\\)"):
        _recipe(tiny_dirs("llama"), tmp_path / "o", texts, method="rtn", model_steps=10)
    with pytest.raises(ValueError, match="model_steps does not work with quantization.auto"):
        Recipe.from_dict({"model": {"source": "x"}, "quantization": {"method": "gptq", "auto": {"bits_per_weight": 4.5}},
                          "calibration": {"tune": {"model_steps": 5}}, "output": {"dir": "o"}})
    from llmquant import distributed

    monkeypatch.setattr(distributed, "launched", lambda: True)
    with pytest.raises(UserError, match="method gptq\\+tune tunes each decoder layer in one process"):
        run(_recipe(tiny_dirs("llama"), tmp_path / "o", texts), console=Console(file=io.StringIO()), progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_families_tune_export_and_reload(tiny_dirs, tmp_path, texts, arch):
    res = _run(_recipe(tiny_dirs(arch), tmp_path / "out", texts, steps=5))
    assert res.check.passed
    assert all("loss_after" in layer["tune"] for layer in res.calibration["layers"])


def test_tuning_toward_the_float_model_gets_its_activations_streamed_or_not(tiny_dirs, tmp_path, texts, monkeypatch):
    """tune.target: model: each layer is tuned toward the float model's own outputs at that layer (computed
    independently here with hooks on the float model); a streamed run and an in-memory run export the same bytes."""
    import llmquant.algorithms.tune as tune_mod
    from llmquant import pipeline
    from llmquant.data import load_text
    from llmquant.models import load_model, resolve_source

    seen: list = []
    real = tune_mod.tune_layer

    def spy(layer, tuned, frozen, inputs, targets, *a, **kw):
        seen.append([t.clone() for t in targets])
        return real(layer, tuned, frozen, inputs, targets, *a, **kw)

    monkeypatch.setattr(tune_mod, "tune_layer", spy)
    recipe = _recipe(tiny_dirs("llama"), tmp_path / "streamed", texts)  # target: model, the default
    res = _run(recipe)
    assert res.check.passed and len(seen) == 2

    model, tok = load_model(resolve_source(str(tiny_dirs("llama"))), "float32", "cpu")
    c = recipe.calibration
    windows = calibration_windows(tok, load_text(c.text, "calib").text, c.nsamples, c.seqlen, c.seed)
    outs: dict[int, list] = {0: [], 1: []}
    _, layers = decoder_layers(model)
    hooks = [layers[i].register_forward_hook(lambda m, a, y, i=i: outs[i].append((y[0] if isinstance(y, tuple) else y).detach()))
             for i in range(2)]
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    for i in range(2):
        assert len(seen[i]) == len(outs[i])
        for got, want in zip(seen[i], outs[i]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # target layer (the float layer on the quantized inputs) differs from the second layer on
    seen.clear()
    _run(_recipe(tiny_dirs("llama"), tmp_path / "layer", texts, target="layer"))
    assert torch.equal(seen[0][0], outs[0][0]) or torch.allclose(seen[0][0], outs[0][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen[1][0], outs[1][0], rtol=1e-4, atol=1e-5)

    monkeypatch.setattr(pipeline, "_stream_reader", lambda *a: None)  # the whole model in memory
    _run(_recipe(tiny_dirs("llama"), tmp_path / "memory", texts))
    digest = lambda d: hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "memory") == digest(tmp_path / "streamed")
    assert digest(tmp_path / "layer") != digest(tmp_path / "streamed")


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_scope_group_holds_one_groups_tuning_state_at_a_time(tiny_dirs, family_dirs, tmp_path, texts, monkeypatch, arch):
    """tune.scope: group: the groups of Linear layers reading one input are tuned in turn (q/k/v, o, gate/up, down;
    Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj), only that group's tuning modules alive while it is tuned, each
    group starting where the one before ended (the others computing with their weights as chosen so far); the export
    holds the tuned weights, reloads and passes the check."""
    import gc
    import weakref

    import llmquant.algorithms.tune as tune_mod

    alive: list = []  # weak references to every TunedLinear made
    real_init = TunedLinear.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        alive.append(weakref.ref(self))

    peak = {"weights": 0}

    def count(*a):
        gc.collect()
        peak["weights"] = max(peak["weights"], sum(r().w.numel() for r in alive if r() is not None))

    monkeypatch.setattr(TunedLinear, "__init__", init)
    real = tune_mod.tune_layer
    layers_seen: list = []

    def spy(layer, tuned, frozen, inputs, targets, call, device, options, dtype, on_step, groups):
        layers_seen.append({n: w.numel() for n, (w, _, _) in tuned.items()})

        def counting(*s):
            count()
            on_step(*s)

        return real(layer, tuned, frozen, inputs, targets, call, device, options, dtype, counting, groups)

    monkeypatch.setattr(tune_mod, "tune_layer", spy)
    res = _run(_recipe((tiny_dirs if arch == "llama" else family_dirs)(arch), tmp_path / "out", texts, steps=6, scope="group"))
    assert res.check.passed
    reports = [layer["tune"] for layer in res.calibration["layers"]]
    expected = {"llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
                "phi3": [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]}[arch]
    for rep in reports:
        assert [g["layers"] for g in rep["groups"]] == expected
        for before, after in zip(rep["groups"], rep["groups"][1:]):  # each group starts from the end of the one before
            assert after["loss_before"] == pytest.approx(before["loss_after"], rel=1e-5)
        assert rep["loss_after"] < rep["loss_before"]
    sizes = layers_seen[0]
    largest = max(sum(sizes[n] for n in g) for g in expected)
    assert peak["weights"] == largest < sum(sizes.values())


# ---- the end-to-end stage (calibration.tune.model_steps) --------------------------------------------


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_a_scaled_layer_computes_what_bitsandbytes_dequantizes(scheme):
    torch.manual_seed(3)
    w = torch.randn(48, 256) * 0.02
    start = _start(w, scheme)
    m = ScaledLinear(start, scheme, None, torch.device("cpu"))
    assert torch.equal(m.weight_value(), _bnb_dequantize(start))  # untouched: exactly the start
    with torch.no_grad():
        m.f.mul_(torch.empty_like(m.f).uniform_(0.8, 1.2))
    qw = m.result()
    assert torch.equal(qw.codes, start.codes)  # the codes stay; the scales are the tuned ones, as stored
    assert not torch.equal(qw.dequantize(), start.dequantize())
    assert torch.equal(m.weight_value(), _bnb_dequantize(qw))
    m(torch.randn(16, 256)).square().sum().backward()
    assert m.f.grad.abs().sum() > 0


def test_the_top_k_kl_is_the_kl_with_the_whole_vocabulary_and_a_lower_bound_with_less():
    torch.manual_seed(4)
    t, s = torch.randn(1, 10, 50) * 2, torch.randn(1, 10, 50) * 2
    lt = torch.log_softmax(t, -1)
    full = (lt.exp() * (lt - torch.log_softmax(s, -1))).sum(-1).mean()
    torch.testing.assert_close(top_k_kl(s, *lt.topk(50, -1)), full)
    assert 0 < top_k_kl(s, *lt.topk(8, -1)) < full
    assert abs(top_k_kl(t, *lt.topk(8, -1))) < 1e-6


def _held_out_kl(model_dir, out_dir, text) -> float:
    """KL divergence of the exported weights (dequantized as bitsandbytes does, computed in float32 whatever this
    CPU's bitsandbytes branch) from the float model, on the text's last 40% (windows of 32)."""
    from llmquant.data import TextSpec, load_text
    from llmquant.models import load_model, resolve_source

    float_model, tok = load_model(resolve_source(str(model_dir)), "float32", "cpu")
    quantized, _ = load_model(resolve_source(str(model_dir)), "float32", "cpu")
    tensors = load_file(Path(out_dir) / "model.safetensors")
    swapped = 0
    for name, module in quantized.named_modules():
        if type(module) is torch.nn.Linear and f"{name}.weight.absmax" in tensors:
            prefix = name + "."
            qw = read_weight({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}, torch.float32)
            module.weight.data = qw.dequantize()
            swapped += 1
    assert swapped == 14
    ids = tok(load_text(TextSpec(source=str(text), range=(0.6, 1.0))).text, return_tensors="pt").input_ids[0]
    ids = ids[: len(ids) // 32 * 32].view(-1, 32)
    with torch.no_grad():
        lf = torch.log_softmax(float_model(ids).logits.float(), -1)
        lq = torch.log_softmax(quantized(ids).logits.float(), -1)
    return (lf.exp() * (lf - lq)).sum(-1).mean().item()


@pytest.mark.parametrize("method", ["gptq+tune", "gptq"])
def test_the_model_stage_tunes_the_scales_only_and_lowers_held_out_kl(tiny_dirs, tmp_path, texts, monkeypatch, method):
    import llmquant.algorithms.tune as tune_mod

    monkeypatch.setattr(tune_mod, "TEACHER_TOP_K", VOCAB)  # a random tiny model's predictions are flat: the whole KL
    model_dir = tiny_dirs("llama")
    res = _run(_recipe(model_dir, tmp_path / "e2e", texts, method=method, model_steps=30, model_lr=3e-3))
    assert res.check.passed and not res.streamed
    e2e = json.loads((tmp_path / "e2e" / "llmquant.json").read_text())["calibration"]["model_tune"]
    assert e2e["kl_after"] < 0.9 * e2e["kl_before"] and not e2e["kept_start"] and e2e["steps"] == 30
    _run(_recipe(model_dir, tmp_path / "layers", texts, method=method))  # the same without the end-to-end stage
    tuned, start = (load_file(tmp_path / d / "model.safetensors") for d in ("e2e", "layers"))
    codes = [k for k in start if k.endswith("proj.weight")]
    assert len(codes) == 14 and all(torch.equal(tuned[k], start[k]) for k in codes)  # the codes stay
    assert all(not torch.equal(tuned[k + ".absmax"], start[k + ".absmax"]) for k in codes)  # every layer's scales moved
    assert _held_out_kl(model_dir, tmp_path / "e2e", texts) < 0.95 * _held_out_kl(model_dir, tmp_path / "layers", texts)
