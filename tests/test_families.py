"""The family matrix: every architecture of :func:`conftest.family_config` walked layer by layer as its own forward
runs it, its activation-aware folding checked, and every method exported, reloaded and checked, streamed and in
memory (windows of 24 or 32 tokens, longer than the sliding window of 8)."""

import io
import json

import pytest
import torch
from rich.console import Console

from conftest import FAMILIES, TEXT, build_tiny, family_config
from llmquant import pipeline
from llmquant.algorithms.awq import FOLDING_TOLERANCE, apply_scales, folding_error, norm_readers, scaling_groups
from llmquant.pipeline import run
from llmquant.recipe import Recipe
from llmquant.walk import call_layer, capture, decoder_layers, logits_after_layers

SHARED_NORM = {"phi", "cohere", "stablelm", "falcon"}  # parallel blocks whose one norm feeds attention and MLP
ALTERNATING = {"qwen2", "gemma2", "gemma3", "cohere2"}  # layers of two attention types


def model_of(arch):
    return build_tiny(arch, config=family_config(arch))


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_walk_gives_every_layer_what_the_models_own_forward_gives_it(arch):
    """Layer by layer from the captured arguments, every layer's output is the model's own hidden state, and the
    logits after the last layer are the model's; layer 0's arguments given to every layer (the old walk) are not."""
    model = model_of(arch)
    ids = torch.randint(1, 512, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    stack, layers = decoder_layers(model)
    assert len(layers) == 4
    hidden, calls = capture(model, layers, ids.unsqueeze(1), "cpu")
    assert calls.distinct() == 1  # one length, no padding: the windows share one set of arguments
    for b in range(len(ids)):
        x = hidden[b]
        for i, layer in enumerate(layers):
            x = call_layer(layer, x, calls.of(b, i), "cpu")
            if i < len(layers) - 1:  # (the last hidden state transformers reports is after the final norm)
                torch.testing.assert_close(x, out.hidden_states[i + 1][b : b + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_after_layers(model, layers, ids[b : b + 1], x, stack), out.logits[b : b + 1],
                                   rtol=1e-5, atol=1e-5)
    if arch in ALTERNATING:
        x = hidden[0]
        for layer in layers:
            x = call_layer(layer, x, calls.of(0, 0), "cpu")
        assert (logits_after_layers(model, layers, ids[:1], x, stack) - out.logits[:1]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", FAMILIES)
def test_pairs_that_pass_the_folding_check_keep_the_float_model_and_the_others_are_named(arch):
    model = model_of(arch)
    ids = torch.randint(1, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    stack, layers = decoder_layers(model)
    hidden, calls = capture(model, layers, ids.unsqueeze(1), "cpu")
    folded, refused = [], []
    x = hidden[0]
    for i, layer in enumerate(layers):
        def forward(layer=layer, x=x, i=i):
            return call_layer(layer, x, calls.of(0, i), "cpu")

        reference = forward()
        groups, skipped = scaling_groups(layer, f"{stack}.{i}", model.config, norm_readers(layer, forward))
        refused += [(p, tuple(t), why) for p, t, why in skipped]
        for g in groups:
            err = folding_error(model, g, forward, reference)
            rel = lambda n: n.removeprefix(f"{stack}.{i}.")  # noqa: E731
            (folded if err <= FOLDING_TOLERANCE else refused).append((rel(g.prev), tuple(map(rel, g.targets)), err))
        x = reference
    # random scales (not powers of two) folded into every pair that passed: the float model computes what it did
    gen = torch.Generator().manual_seed(0)
    for i, layer in enumerate(layers):
        stats = norm_readers(layer, lambda layer=layer, i=i: call_layer(layer, hidden[0], calls.of(0, i), "cpu"))
        for g in scaling_groups(layer, f"{stack}.{i}", model.config, stats)[0]:
            if (g.prev.removeprefix(f"{stack}.{i}."), tuple(t.removeprefix(f"{stack}.{i}.") for t in g.targets)) in {f[:2] for f in folded}:
                apply_scales(model, g, torch.rand(model.get_submodule(g.prev).weight.shape[0], generator=gen) * 3 + 0.2)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())

    producers = {p: t for p, t, _ in folded}
    if arch in SHARED_NORM:  # the shared norm is folded into attention and MLP together, never into one alone
        shared = [t for t in producers.values() if any("mlp" in n or "h_to_4h" in n or "fc1" in n for n in t)
                  and any("proj" in n or "query_key_value" in n for n in t if "mlp" not in n)]
        assert shared, producers
    if arch == "gpt_neox":  # parallel too, but with a norm of its own for each block: each folds alone
        assert producers["input_layernorm"] == ("attention.query_key_value",)
        assert producers["post_attention_layernorm"] == ("mlp.dense_h_to_4h",)
    if arch == "olmo2":  # post-norm: its norms' outputs feed no Linear layer
        assert not any("norm" in p for p in producers), producers
    if arch in ("llama", "mistral", "qwen2"):
        assert set(producers) == {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"}
    if arch == "phi":  # GELU between fc1 and fc2: the check refuses that pair
        assert any(p == "mlp.fc1" for p, _, _ in refused) and "mlp.fc1" not in producers
    if arch in ("gemma2", "gemma3"):
        assert any("(1 + weight)" in str(why) for _, _, why in refused)
    if arch not in ("gemma2", "gemma3", "gpt2"):  # every other family takes some folding
        assert folded, refused


# ---- every method, streamed and in memory, exported, reloaded and checked -----------------------------------

# each decoder layer of the 4 its own method (and formats), so one run covers four methods
METHOD_RECIPES = {
    "a": ["rtn", "scale_search", "awq", "awq+gptq"],
    "b": ["gptq", "tune", "gptq+tune", "awq"],
}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT * 8)
    return p


def method_recipe(model_dir, out, text, methods):
    rules = [  # first match wins: INT8 and a layer kept in fp16 first, then each decoder layer's method in NF4
        {"match": ["*.1.*v_proj", "*.1.*fc2", "*.1.*c_proj", "*.1.*dense_4h_to_h"], "method": methods[1], "format": "int8",
         "threshold": 6.0},
        {"match": ["*.0.*down_proj", "*.0.*fc2", "*.0.mlp.c_proj", "*.0.*dense_4h_to_h"], "format": "fp16"},
        *({"match": f"*.{i}.*", "method": m, "format": "nf4", "group_size": 32} for i, m in enumerate(methods)),
    ]
    return Recipe.from_dict({
        "model": {"source": str(model_dir)}, "device": "cpu",
        "quantization": {"default": "nf4", "method": "rtn", "rules": rules},
        "calibration": {"text": {"source": str(text), "range": [0.0, 0.6]}, "nsamples": 4, "seqlen": 32,
                        "awq": {"grid": 4, "tokens": 64}, "tune": {"steps": 4}},
        "eval": {"text": {"source": str(text), "range": [0.6, 1.0]}, "seqlen": 32, "max_tokens": 128, "divergence_tokens": 64},
        "output": {"dir": str(out)},
    })


def quiet(r):
    return run(r, console=Console(file=io.StringIO()), progress=False)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("which", list(METHOD_RECIPES))
def test_every_method_exports_reloads_and_evaluates_the_same_streamed_and_in_memory(family_dirs, tmp_path, monkeypatch, text_file,
                                                                                   arch, which):
    methods = METHOD_RECIPES[which]
    streamed = quiet(method_recipe(family_dirs(arch), tmp_path / "streamed", text_file, methods))
    assert streamed.streamed and streamed.check.passed
    monkeypatch.setattr(pipeline, "_stream_reader", lambda *a: None)
    whole = quiet(method_recipe(family_dirs(arch), tmp_path / "whole", text_file, methods))
    assert not whole.streamed and whole.check.passed
    used = {e.method for e in streamed.plan.quantized_entries}
    assert set(methods) <= used, used
    assert {e.label().split("/")[0].split("(")[0] for e in streamed.plan.entries if e.scheme is not None} >= {"nf4", "int8", "fp16"}
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["models"] for d in ("streamed", "whole"))
    # the streamed evaluation (one decoder layer at a time, each with its own arguments) measures the whole model
    assert a["baseline"]["perplexity"] == pytest.approx(b["baseline"]["perplexity"], rel=1e-4)
    assert a["quantized"]["perplexity"] == pytest.approx(b["quantized"]["perplexity"], rel=1e-3)
    # the same calibration, layer for layer, and the same checkpoint bytes
    ea = [x["layer_rel_error"] for x in streamed.calibration["layers"]]
    eb = [x["layer_rel_error"] for x in whole.calibration["layers"]]
    assert ea == pytest.approx(eb, rel=1e-4)
    for f in sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors")):
        assert (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f


@pytest.mark.parametrize("arch", FAMILIES)
def test_auto_mixes_and_checks_every_family(family_dirs, tmp_path, text_file, arch):
    out = tmp_path / "out"
    res = quiet(Recipe.from_dict({
        "model": {"source": str(family_dirs(arch))}, "device": "cpu",
        "quantization": {"auto": {"bits_per_weight": 5.0}, "method": "rtn"},
        "calibration": {"text": {"source": str(text_file), "range": [0.0, 0.6]}, "nsamples": 4, "seqlen": 32},
        "output": {"dir": str(out)},
    }))
    assert res.check.passed and res.plan.linear_bits_per_weight() <= 5.0
    assert len({e.label() for e in res.plan.quantized_entries}) > 1  # a real mix


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_checkpoint_transformers_saved_is_described_without_problems(family_dirs, arch):
    """transformers saves some families under older names (GPT-NeoX's head as ``embed_out``) and renames them when
    it loads: the checkpoint's description knows the renamings and finds nothing missing or extra."""
    from llmquant.checkpoint import describe

    assert describe(family_dirs(arch)).problems == []


def test_a_state_space_model_is_refused_as_what_it_is():
    import transformers as tf

    from llmquant.errors import UserError
    from llmquant.plan import _refuse_fused_experts

    model = build_tiny("mamba", config=tf.MambaConfig(vocab_size=512, hidden_size=64, state_size=8, num_hidden_layers=2))
    with pytest.raises(UserError, match=r"MambaForCausalLM has convolution layers \(state-space or hybrid blocks, as in Mamba\)"):
        _refuse_fused_experts(model)


def test_a_pair_the_check_refuses_is_named_once_and_the_run_goes_on(family_dirs, tmp_path, text_file, capsys):
    res = run(Recipe.from_dict({
        "model": {"source": str(family_dirs("phi"))}, "device": "cpu", "quantization": {"default": "int8", "method": "awq"},
        "calibration": {"text": {"source": str(text_file), "range": [0.0, 0.6]}, "nsamples": 4, "seqlen": 32,
                        "awq": {"grid": 4, "tokens": 64}},
        "output": {"dir": str(tmp_path / "out")}}), console=Console(file=io.StringIO()), progress=False)
    assert res.check.passed
    err = " ".join(capsys.readouterr().err.split())
    line = "activation-aware scales are not folded from mlp.fc1 into mlp.fc2 (PhiDecoderLayer layers): folding changes"
    assert err.count(line) == 1, err  # 4 decoder layers, said once
    scaled = [s["after"] for layer in res.calibration["layers"] for s in layer["scaled"]]
    assert "input_layernorm" in scaled and "mlp.fc1" not in scaled
