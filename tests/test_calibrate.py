"""The layer-by-layer calibration on tiny models of every family."""

import io
import json

import pytest
import torch
from rich.console import Console

from conftest import ARCHS, TEXT
from llmquant.calibrate import calibration_windows, decoder_layers
from llmquant.pipeline import run
from llmquant.recipe import Recipe


@pytest.fixture
def texts(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT * 8)
    return f


def calibrated(model_dir, out, text, method, quant=None, eval_=False, **calib):
    d = {
        "model": {"source": str(model_dir)}, "device": "cpu",
        "quantization": quant or {"default": "nf4", "method": method},
        "calibration": {"text": {"source": str(text), "range": [0.0, 0.6]}, "nsamples": 6, "seqlen": 32, **calib},
        "output": {"dir": str(out)},
    }
    if eval_:
        d["eval"] = {"text": {"source": str(text), "range": [0.6, 1.0]}, "seqlen": 32, "divergence_tokens": 512}
    return run(Recipe.from_dict(d), console=Console(file=io.StringIO()), progress=False)


def _first_layer_errors(model_dir, out, text, report, sequential: bool) -> tuple[float, dict]:
    """The first decoder layer's relative output error and its Linear layers', on the calibration windows: the float
    model against the export reloaded in plain transformers (both layers get the same input, the embeddings). Each
    Linear layer's inputs are the float layer's, or with ``sequential`` (true_sequential) the quantized layer's."""
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    from llmquant.data import TextSpec, load_text
    from llmquant.export import load_export
    from llmquant.quantize import layer_weight

    ids = calibration_windows(AutoTokenizer.from_pretrained(model_dir),
                              load_text(TextSpec(source=str(text), range=(0.0, 0.6))).text, 6, 32, 0)
    base, quant = load_export(model_dir, "cpu"), load_export(out, "cpu")
    inputs = {}

    def keep(rel):
        def hook(module, args):
            inputs[rel] = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    hooks = [(quant if sequential else base).get_submodule(f"{report['layer']}.{rel}").register_forward_pre_hook(keep(rel))
             for rel in report["linear_rel_error"]]
    with torch.no_grad():
        hf = base(ids, output_hidden_states=True).hidden_states[1]
        hq = quant(ids, output_hidden_states=True).hidden_states[1]
    for h in hooks:
        h.remove()
    linear = {}
    for rel, x in inputs.items():
        w = layer_weight(base.get_submodule(f"{report['layer']}.{rel}")).float()
        qm = quant.get_submodule(f"{report['layer']}.{rel}")
        assert isinstance(qm, bnb.nn.Linear4bit)
        q = bnb.functional.dequantize_4bit(qm.weight.data, qm.weight.quant_state).float().reshape(w.shape)
        linear[rel] = ((x @ (w - q).T).norm() / (x @ w.T).norm()).item()
    return ((hq - hf).norm() / hf.norm()).item(), linear


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["gptq", "awq+gptq", "scale_search"])
def test_every_family_calibrates_exports_and_reloads(tiny_dirs, tmp_path, texts, arch, method):
    # plain gptq re-measures inputs group by group (true_sequential), the others measure once per layer
    res = calibrated(tiny_dirs(arch), tmp_path / "out", texts, method, true_sequential=method == "gptq")
    cal = res.calibration
    assert len(cal["layers"]) == 2 and cal["windows"] == [6, 32]
    # the errors reported for the first decoder layer, measured again here on the reloaded export
    layer_error, linear_errors = _first_layer_errors(tiny_dirs(arch), tmp_path / "out", texts, cal["layers"][0],
                                                    sequential=method == "gptq")
    assert cal["layers"][0]["layer_rel_error"] == pytest.approx(layer_error, rel=0.05)
    if method != "awq+gptq":  # (scaled: its Linear layers' errors are measured on the scaled inputs)
        assert cal["layers"][0]["linear_rel_error"] == pytest.approx(linear_errors, rel=0.05)
    meta = json.loads((tmp_path / "out" / "llmquant.json").read_text())
    assert meta["calibration"]["layers"][0]["layer"].endswith(".0")
    if method == "awq+gptq" and arch in ("llama", "qwen2", "mistral", "opt"):
        assert cal["layers"][0]["scaled"], "no scaling pair found"


def test_calibration_beats_rtn_on_held_out_text(tiny_dirs, tmp_path, texts, monkeypatch):
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    rtn = calibrated(tiny_dirs("llama"), tmp_path / "rtn", texts, "rtn", eval_=True, nsamples=16)
    gptq = calibrated(tiny_dirs("llama"), tmp_path / "gptq", texts, "gptq", eval_=True, nsamples=16)
    kl = lambda r: r.results["models"]["quantized"]["kl_divergence"]["mean"]  # noqa: E731
    assert kl(gptq) < 0.8 * kl(rtn)


def test_awq_scales_are_folded_into_the_model(tiny_dirs, tmp_path, texts):
    res = calibrated(tiny_dirs("llama"), tmp_path / "out", texts, "awq")
    pairs = {s["after"]: s for s in res.calibration["layers"][0]["scaled"]}
    # every pair, v_proj -> o_proj included although grouped-query attention makes them different widths
    assert {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"} == set(pairs)
    assert any(s["alpha"] > 0 for s in pairs.values())
    # a scaling is kept only when it lowered the error, and a norm's folded scales are in the export
    from safetensors.torch import load_file

    exported, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(tiny_dirs("llama") / "model.safetensors")
    for after, s in pairs.items():
        assert (s["alpha"] > 0) == (s["loss_ratio"] < 1), s
        if after.endswith("layernorm"):
            name = f"model.layers.0.{after}.weight"
            assert torch.equal(exported[name], original[name]) == (s["alpha"] == 0), (after, s)


def test_overlapping_calibration_and_evaluation_text_warns(tiny_dirs, tmp_path, texts, capsys, monkeypatch):
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    d = {"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu", "quantization": {"method": "gptq"},
         "calibration": {"text": {"source": str(texts), "range": [0.0, 0.7]}, "nsamples": 4, "seqlen": 32},
         "eval": {"text": {"source": str(texts), "range": [0.6, 1.0]}, "seqlen": 32, "divergence": False},
         "output": {"dir": str(tmp_path / "out")}}
    run(Recipe.from_dict(d), console=Console(file=io.StringIO()), progress=False)
    assert "calibration text overlaps the evaluation text" in capsys.readouterr().err


def test_calibration_windows_are_seeded_random_windows(tiny_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs("llama"))
    a = calibration_windows(tok, TEXT * 8, 5, 16, seed=0)
    assert a.shape == (5, 16) and torch.equal(a, calibration_windows(tok, TEXT * 8, 5, 16, seed=0))
    assert not torch.equal(a, calibration_windows(tok, TEXT * 8, 5, 16, seed=1))
    with pytest.raises(Exception, match="not enough for windows"):
        calibration_windows(tok, "short", 2, 64, 0)


def test_generated_windows_are_samples_of_the_model_itself():
    from conftest import build_tiny, tiny_tokenizer
    from llmquant.calibrate import generated_windows

    model, tok = build_tiny("llama"), tiny_tokenizer()
    with torch.no_grad():  # next-token distributions far from uniform, so sampling, greedy and random tokens differ
        model.lm_head.weight.mul_(4)
    rng = torch.get_rng_state()
    w = generated_windows(model, tok, 40, 64, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random state is left alone
    assert w.shape == (40, 64) and torch.equal(w, generated_windows(model, tok, 40, 64, seed=0, progress=False))
    assert not torch.equal(w, generated_windows(model, tok, 40, 64, seed=1, progress=False))
    assert not (w == tok.eos_token_id).any()  # end of text never ends a window early
    assert all(tok.decode(t).strip().isalpha() for t in w[:, :1]) and len(set(w[:, 0].tolist())) > 10
    with torch.no_grad():
        logp = torch.log_softmax(model(w).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, w[:, 1:, None]).mean().item()
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    greedy = (logp.argmax(-1) == w[:, 1:]).float().mean().item()
    # drawn at temperature 1 from the model: the tokens' mean surprise is the predictions' mean entropy (greedy or
    # colder sampling would be far below it, uniform tokens far above), and the most likely token is not always taken
    assert 1.5 < entropy < 5.5 and abs(nll - entropy) < 0.1 * entropy, (nll, entropy)
    assert 0.05 < greedy < 0.9


def test_calibration_on_windows_generated_by_the_model(tiny_dirs, tmp_path, texts, capsys):
    res = calibrated(tiny_dirs("llama"), tmp_path / "mixed", texts, "gptq", generated=2, nsamples=4)
    assert res.check.passed and not res.streamed  # (a safetensors folder: streamed otherwise)
    err = capsys.readouterr().err
    assert "calibration.generated samples calibration windows from the whole float model" in err
    assert "calibration: 2 windows of 32 tokens sampled from the float model" in err and "2 drawn from the text" in err
    meta = json.loads((tmp_path / "mixed" / "llmquant.json").read_text())["calibration"]
    assert meta["generated"] == 2 and meta["windows"] == [4, 32] and meta["text"]["source"] == str(texts)
    assert "(2 generated)" in meta["summary"]
    # all windows generated: no text is read (this one does not exist)
    res = calibrated(tiny_dirs("llama"), tmp_path / "free", tmp_path / "missing.txt", "gptq", generated=4, nsamples=4)
    meta = json.loads((tmp_path / "free" / "llmquant.json").read_text())["calibration"]
    assert res.check.passed and meta["text"] is None and meta["generated"] == 4
    with pytest.raises(ValueError, match="calibration.generated 5 is more than calibration.nsamples 4: allowed 0 to nsamples"):
        calibrated(tiny_dirs("llama"), tmp_path / "o", texts, "gptq", generated=5, nsamples=4)
    with pytest.raises(ValueError, match="calibration.generated does not work with quantization.auto"):
        Recipe.from_dict({"model": {"source": "x"}, "quantization": {"method": "gptq", "auto": {"bits_per_weight": 4.5}},
                          "calibration": {"generated": 2}, "output": {"dir": "o"}})
    assert not (tmp_path / "o").exists()


def test_decoder_layers_are_found_in_every_family():
    from conftest import build_tiny

    for arch in ARCHS:
        name, layers = decoder_layers(build_tiny(arch))
        assert len(layers) == 2, arch


@pytest.mark.parametrize("arch", ARCHS)
def test_measured_inputs_are_each_layers_own(arch):
    """Layers share statistics only when they read the very same tensor, and every layer's
    Hessian is the one of its own inputs (freed activations whose memory comes back at the
    same address must not be taken for an earlier layer's input)."""
    from types import SimpleNamespace

    from conftest import build_tiny
    from llmquant.calibrate import SequentialCalibrator
    from llmquant.plan import quantizable

    model = build_tiny(arch)
    windows = torch.randint(0, 512, (8, 24), generator=torch.Generator().manual_seed(0))
    cal = SequentialCalibrator(model, SimpleNamespace(entries=[]), windows, None, torch.device("cpu"), progress=False)
    name, layers = decoder_layers(model)
    inputs, cal.calls = cal._capture_inputs(layers)
    cal._index = 0
    names = [f"{name}.0.{n}" for n, m in layers[0].named_modules() if n and quantizable(m)]

    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]).clone()))
             for n in names]
    with torch.no_grad():
        for b, x in enumerate(inputs):
            args, kwargs = cal.calls.of(b, 0)
            layers[0](x, *args, **kwargs)
    for h in hooks:
        h.remove()

    stats, groups, _ = cal._measure(layers[0], inputs, names)
    assert sorted(n for g in groups for n in g) == sorted(names)
    for g in groups:
        assert all(stats[n] is stats[g[0]] for n in g)
        assert all(torch.equal(seen[n][i], seen[g[0]][i]) for n in g for i in range(len(inputs)))
    for n in names:
        x = torch.cat(seen[n]).float()
        assert stats[n].tokens == windows.numel(), n
        assert torch.allclose(stats[n].hessian, x.t() @ x / len(x), rtol=1e-4, atol=1e-6), n
    if arch in ("llama", "qwen2", "mistral"):
        assert sorted(len(g) for g in groups) == [1, 1, 2, 3]  # o, down; gate+up; q+k+v


@pytest.mark.parametrize("n", [100, 1100])
def test_input_statistics_kept_as_a_triangle_are_the_whole_xtx(n):
    """H = XᵀX / tokens, summed window by window as upper-triangle column blocks (n = 1100: 16 blocks, the last
    narrower), comes out whole and exactly symmetric, as the float64 sum of the whole products gives it."""
    from llmquant.calibrate import _Inputs

    g = torch.Generator().manual_seed(0)
    windows = [torch.randn(1, t, n, generator=g) * torch.linspace(0.1, 3, n) for t in (40, 57, 33)]
    st = _Inputs()
    for x in windows:
        st.add(x, keep_tokens=0)
    st.finish()
    whole = sum((x[0].t() @ x[0]).double() for x in windows) / 130
    assert not st.parts and st.h.dtype == torch.float32 and torch.equal(st.h, st.h.t())
    assert torch.allclose(st.h.double(), whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
