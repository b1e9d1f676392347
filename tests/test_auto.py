"""quantization.auto: the allocation is optimal (brute force), budgets hold on the written files, the sensitivity
ranks formats as their real effect on the model does, and the resolved recipe re-runs without searching."""

import io
import itertools
import json
import random
import tempfile
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import TEXT
from llmquant.auto import allocate
from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.export import safetensors_bytes
from llmquant.pipeline import run
from llmquant.recipe import Recipe


def brute_force(costs, values, budget):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[k] for c, k in zip(costs, pick)) <= budget:
            v = sum(x[k] for x, k in zip(values, pick))
            if best is None or v < best[0] - 1e-12:
                best = (v, list(pick))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_optimal_on_small_cases(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 5), rng.randint(1, 4)
    costs = [[rng.randint(1, 30) for _ in range(k)] for _ in range(n)]
    values = [[rng.random() for _ in range(k)] for _ in range(n)]
    budget = rng.randint(0, 30 * n)
    exact = brute_force(costs, values, budget)
    choice, unit, _ = allocate(costs, values, budget)  # small totals: unit 1, exact
    assert unit == 1
    if exact is None:
        assert choice is None
        return
    assert sum(c[i] for c, i in zip(costs, choice)) <= budget
    assert sum(v[i] for v, i in zip(values, choice)) == pytest.approx(exact[0])


def test_coarse_table_never_exceeds_the_budget_and_is_near_optimal():
    rng = random.Random(0)
    costs = [[rng.randint(1000, 9000) for _ in range(4)] for _ in range(6)]
    values = [[rng.random() for _ in range(4)] for _ in range(6)]
    for budget in range(12000, 50000, 3700):
        exact = brute_force(costs, values, budget)
        choice, unit, _ = allocate(costs, values, budget, cells=500)  # unit > 1: sizes rounded up
        assert unit > 1
        if choice is None:
            continue
        assert sum(c[i] for c, i in zip(costs, choice)) <= budget
        # optimal among choices that fit a budget smaller by one unit per item
        tight = brute_force(costs, values, budget - unit * len(costs))
        if tight is not None:
            assert sum(v[i] for v, i in zip(values, choice)) <= tight[0] + 1e-12
        assert sum(v[i] for v, i in zip(values, choice)) >= exact[0] - 1e-12


def auto_recipe(model_dir, out, text, auto, method="rtn", rules=None):
    return Recipe.from_dict({
        "model": {"source": str(model_dir)}, "device": "cpu",
        "quantization": {"default": "nf4", "method": method, "auto": auto, "rules": rules or []},
        "calibration": {"text": {"source": str(text)}, "nsamples": 4, "seqlen": 32},
        "output": {"dir": str(out)},
    })


def quiet(r, **kw):
    return run(r, console=Console(file=io.StringIO(), width=200), progress=False, **kw)


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(TEXT * 6)
    return p


@pytest.mark.parametrize("bpw", [4.3, 5.0, 7.0])
def test_bits_per_weight_budget_holds_on_the_written_files(tiny_dirs, tmp_path, text, bpw):
    out = tmp_path / "out"
    res = quiet(auto_recipe(tiny_dirs("llama"), out, text, {"bits_per_weight": bpw}))
    meta = json.loads((out / "llmquant.json").read_text())
    assert meta["sizes"]["linear_bits_per_weight"] <= bpw
    # bytes from the written files: every formatted Linear's stored tensors, bias excluded
    from safetensors import safe_open

    stored = n = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        for layer in meta["layers"]:
            if layer["format"] == "unchanged":
                continue
            n += layer["shape"][0] * layer["shape"][1]
            for k in keys:
                if k.startswith(layer["name"] + ".") and not k.endswith(".bias"):
                    t = f.get_tensor(k)
                    stored += t.numel() * t.element_size()
    assert 8 * stored / n <= bpw
    assert 8 * stored / n > bpw - 0.35  # and it uses the budget
    a = meta["auto"]
    assert a["target"] == f"bits_per_weight {bpw:g}"
    chosen = [layer["candidates"][layer["chosen"]]["predicted_kl"] for layer in a["layers"].values()]
    assert a["predicted_kl"] == pytest.approx(sum(chosen), rel=1e-9) and a["predicted_kl"] > 0
    assert len(a["layers"]) == 14 and (out / "auto.png").is_file()
    assert f"chosen by llmquant for a budget of bits per weight {bpw:g}" in (out / "README.md").read_text()
    # the resolved recipe holds explicit rules and re-runs to the same formats without searching
    saved = Recipe.load(out / "recipe.yaml")
    assert saved.quantization.auto is None and saved.quantization.rules
    again = quiet(saved.with_overrides({"output.dir": str(tmp_path / "again")}), dry_run=True)
    assert [e.label() for e in again.plan.entries] == [e.label() for e in res.plan.entries]
    assert again.auto is None


def test_max_size_budget_holds_on_the_written_files(tiny_dirs, tmp_path, text):
    out = tmp_path / "out"
    probe = quiet(auto_recipe(tiny_dirs("llama"), tmp_path / "p", text, {"bits_per_weight": 4.3}), dry_run=True)
    cap = probe.plan.file_bytes_estimate() + 20_000
    quiet(auto_recipe(tiny_dirs("llama"), out, text, {"max_size": str(cap)}))
    assert safetensors_bytes(out) <= cap
    assert safetensors_bytes(out) > cap - 20_000  # it spent the extra bytes


def test_sensitivity_ranks_layers_as_their_real_effect_does(tiny_dirs, tmp_path, text):
    """The layer the search says matters most, quantized alone, changes the model's output more than the one it
    says matters least (measured KL on the calibration windows)."""
    from llmquant.auto import measure, score
    from llmquant.calibrate import calibration_windows
    from llmquant.models import load_model, resolve_source
    from llmquant.plan import build_plan
    from llmquant.quantize import install, layer_weight
    from llmquant.algorithms import ALGORITHMS
    from llmquant.schemes import FourBit

    model, tok = load_model(resolve_source(str(tiny_dirs("llama"))), "float32", "cpu")
    plan = build_plan(model, Recipe.from_dict({"model": {"source": "x"}, "output": {"dir": "x"},
                                               "quantization": {"default": {"format": "nf4", "group_size": 128}}}).quantization, torch.float32)
    entries = plan.quantized_entries
    windows = calibration_windows(tok, TEXT * 6, 8, 32, 0)
    fisher, stats = measure(model, entries, windows, 0, progress=False)
    nf4 = FourBit(format="nf4", group_size=128)
    scores, _ = score(model, entries, {e.name: [nf4] for e in entries}, fisher, stats, "rtn", {}, torch.float32, progress=False)
    ranked = sorted(entries, key=lambda e: scores[e.name][nf4.label()])

    def kl_with(entry):
        m, _ = load_model(resolve_source(str(tiny_dirs("llama"))), "float32", "cpu")
        with torch.no_grad():
            ref = torch.cat([model(w[None]).logits[0] for w in windows]).log_softmax(-1)
            install(m, entry, ALGORITHMS["rtn"].quantize(layer_weight(m.get_submodule(entry.name)).detach(), entry.scheme, torch.float32),
                    torch.float32)
            got = torch.cat([m(w[None]).logits[0] for w in windows]).log_softmax(-1)
        return (ref.exp() * (ref - got)).sum(-1).mean().item()

    low, high = kl_with(ranked[0]), kl_with(ranked[-1])
    assert high > 3 * low, (ranked[0].name, low, ranked[-1].name, high)
    # and the prediction is the right size (second order: within a factor of three of the measured KL)
    assert scores[ranked[-1].name][nf4.label()] / 3 < high < 3 * scores[ranked[-1].name][nf4.label()]


def test_rules_pin_their_layers_and_loadable_by_transformers_loads_stock(tiny_dirs, tmp_path, text):
    out = tmp_path / "out"
    rules = [{"match": "*.layers.0.self_attn.q_proj", "format": "nf4", "group_size": 32}]
    auto = {"bits_per_weight": 5.0, "loadable_by": "transformers", "candidates": ["int8", "nf4", {"format": "nf4", "group_size": 32},
                                                                                  "fp32"]}
    res = quiet(auto_recipe(tiny_dirs("llama"), out, text, auto, rules=rules))
    formats = {e.name: e.label() for e in res.plan.entries}
    assert formats["model.layers.0.self_attn.q_proj"] == "nf4/g32"
    assert not any(f.startswith("int8") for f in formats.values())  # dropped beside 4-bit for stock loading
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"


@pytest.mark.parametrize("auto, extra, message", [
    ({}, {}, "give one budget: bits_per_weight"),
    ({"bits_per_weight": 4.5, "max_size": "1GB"}, {}, "give one budget"),
    ({"kl": 0.02, "max_size": "1GB"}, {}, "or kl (e.g. 0.02)"),
    ({"kl": 0}, {}, "greater than 0"),
    ({"bits_per_weight": 4.5, "candidates": ["nf5"]}, {}, "unknown format 'nf5'"),
    ({"bits_per_weight": 4.5}, {"method": "awq"}, "not awq"),
    ({"bits_per_weight": 4.5}, {"no_calibration": True}, "add a calibration section"),
    ({"bits_per_weight": 1.0}, {}, "cannot be met with these candidates; the smallest mix is"),
    ({"bits_per_weight": 4.5, "loadable_by": "transformers"},
     {"rules": [{"match": "*.q_proj", "format": "int8"}, {"match": "*.k_proj", "format": "nf4"}]},
     "loadable_by transformers, but the recipe's own rules mix"),
    ({"bits_per_weight": 4.5, "candidates": [{"format": "nf4", "group_size": 256}]}, {}, "no candidate fits model.layers.0"),
])
def test_bad_auto_settings_are_one_line(tiny_dirs, tmp_path, text, capsys, auto, extra, message):
    import yaml

    d = {"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu", "output": {"dir": str(tmp_path / "out")},
         "quantization": {"auto": auto, "method": extra.get("method", "rtn"), "rules": extra.get("rules", [])}}
    if not extra.get("no_calibration"):
        d["calibration"] = {"text": {"source": str(text)}, "nsamples": 4, "seqlen": 32}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    capsys.readouterr()  # what building the tiny model printed
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_streamed_sensitivity_equals_the_whole_model_pass(tiny_dirs, arch):
    """The sensitivity pass one decoder layer at a time from the checkpoint (forward over all windows, then backward
    layer by layer from the last) measures what the pass over the whole loaded model measures: the same input
    statistics, the same Fisher weights (up to the order autograd adds a layer's input gradients in), the same scores.
    GPT-2: Conv1D, a tied head; Qwen2: biases on q/k/v."""
    from llmquant.auto import default_candidates, fits, measure, score, sensitivity_streamed
    from llmquant.calibrate import calibration_windows
    from llmquant.models import load_config, load_model, resolve_source
    from llmquant.plan import build_plan
    from llmquant.stream import CheckpointReader, skeleton

    src = resolve_source(str(tiny_dirs(arch)))
    model, tok = load_model(src, "float32", "cpu")
    q = Recipe.from_dict({"model": {"source": "x"}, "output": {"dir": "x"}, "quantization": {"default": "nf4"}}).quantization
    entries = build_plan(model, q, torch.float32).quantized_entries
    windows = calibration_windows(tok, TEXT * 6, 4, 32, 0)
    menus = {e.name: [c for c in default_candidates(torch.float32) if fits(c, e)] for e in entries}
    fisher, stats = measure(model, entries, windows, 0, progress=False)
    scores, _ = score(model, entries, menus, fisher, stats, "rtn", {}, torch.float32, progress=False)
    frame = skeleton(load_config(src), torch.float32)
    seen: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        scores_s, _ = sensitivity_streamed(frame, entries, menus, windows, 0, "rtn", {}, torch.float32, CheckpointReader(tiny_dirs(arch)),
                                           torch.device("cpu"), scratch, progress=False, record=seen)
        assert not list(Path(scratch).iterdir())  # the saved inputs were removed as the backward went
    assert all(p.device.type == "meta" for p in frame.parameters())  # every layer given back
    assert sorted(seen["fisher"]) == sorted(fisher) == sorted(e.name for e in entries) == sorted(scores_s)
    for e in entries:
        assert torch.allclose(seen["fisher"][e.name], fisher[e.name], rtol=1e-4, atol=1e-12), e.name
        st, st_s = stats[e.name], seen["stats"][e.name]
        assert st_s.tokens == st.tokens and torch.equal(st_s.h, st.h) and torch.equal(torch.cat(st_s.sample), torch.cat(st.sample)), e.name
        for k, v in scores[e.name].items():  # the same weights, read one layer at a time
            assert scores_s[e.name][k] == pytest.approx(v, rel=1e-4, abs=1e-12), (e.name, k)


@pytest.mark.parametrize("arch,method", [("llama", "gptq"), ("gpt2", "rtn"), ("qwen2", "scale_search")])
def test_streamed_kl_meter_equals_the_whole_model_meter(tiny_dirs, arch, method):
    """A kl target's measurement one decoder layer at a time from the checkpoint gives the KL the loaded model gives
    for the same mixes (an untied head quantized too; GPT-2 and Qwen2 tie theirs to the embeddings), with the method's weights chosen on
    the float model's statistics; the second mix reuses weights chosen for the first."""
    import random

    from llmquant.auto import KLMeter, StreamedKLMeter, default_candidates, fits, measure
    from llmquant.calibrate import calibration_windows
    from llmquant.models import load_config, load_model, resolve_source
    from llmquant.plan import build_plan
    from llmquant.stream import CheckpointReader, skeleton

    src = resolve_source(str(tiny_dirs(arch)))
    model, tok = load_model(src, "float32", "cpu")
    ignore = [] if arch == "llama" else ["lm_head"]  # a tied head stays as it is
    q = Recipe.from_dict({"model": {"source": "x"}, "output": {"dir": "x"}, "quantization": {"default": "nf4", "ignore": ignore}}).quantization
    entries = build_plan(model, q, torch.float32).quantized_entries
    assert any(e.name == "lm_head" for e in entries) == (arch == "llama")
    windows = calibration_windows(tok, TEXT * 6, 3, 32, 0)
    menus = {e.name: [c for c in default_candidates(torch.float32) if fits(c, e)] for e in entries}
    _, stats = measure(model, entries, windows, 0, progress=False)
    rng = random.Random(0)
    mixes = [{e.name: rng.choice(menus[e.name]) for e in entries} for _ in range(2)]
    mixes[1] = {n: c if rng.random() < 0.5 else mixes[0][n] for n, c in mixes[1].items()}
    whole = KLMeter(model, entries, windows, stats, method, {}, False)
    expected = [whole(m) for m in mixes]
    frame = skeleton(load_config(src), torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        meter = StreamedKLMeter(frame, entries, windows, method, {}, CheckpointReader(tiny_dirs(arch)), torch.device("cpu"),
                                scratch, progress=False)
        got = [meter(m) for m in mixes]
        meter.close()
        assert not list(Path(scratch).iterdir())
    assert all(p.device.type == "meta" for p in frame.parameters())  # every layer given back
    assert min(expected) > 1e-4 and got == pytest.approx(expected, rel=1e-4)


def test_auto_streams_a_model_larger_than_free_memory_and_refuses_one_it_cannot_stream(tiny_dirs, tmp_path, text, capsys,
                                                                                     monkeypatch):
    """With less free memory than the model's weights, a size budget and a kl target are searched streamed (the model
    never loaded whole); a model that cannot be streamed is refused in one line before anything is loaded."""
    import yaml

    import llmquant.pipeline as pipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    from llmquant import memory, needs

    monkeypatch.setattr(memory, "free_bytes", lambda device, all_gpus=False: 10_000)
    monkeypatch.setattr(needs, "check", lambda *a: None)  # (what a run needs, checked against free memory: test_needs)
    monkeypatch.setattr(pipeline, "load_model", no_load)
    res = quiet(auto_recipe(tiny_dirs("llama"), tmp_path / "streamed", text, {"bits_per_weight": 4.5}))
    assert res.check.passed and res.plan.linear_bits_per_weight() <= 4.5 and res.auto["target"] == "bits_per_weight 4.5"
    assert not list(tmp_path.glob(".streamed.llmquant-auto-*"))  # the layers' saved inputs are gone
    res = quiet(auto_recipe(tiny_dirs("llama"), tmp_path / "kl", text, {"kl": 1e6}, method="gptq"))
    # any mix meets that target: the smallest is chosen, its KL measured once
    for layer in res.auto["layers"].values():
        assert layer["chosen"] == min(layer["candidates"], key=lambda k: layer["candidates"][k]["bytes"]), layer
    assert [c["measured_kl"] for c in res.auto["kl_checks"]] == [res.auto["measured_kl"]] and res.auto["measured_kl"] > 0
    assert not list(tmp_path.glob(".kl.llmquant-auto-*"))
    monkeypatch.setattr(pipeline, "_stream_reader", lambda *a: None)  # as for a GGUF file
    d = {"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu", "output": {"dir": str(tmp_path / "out")},
         "quantization": {"auto": {"kl": 0.05}},
         "calibration": {"text": {"source": str(text)}, "nsamples": 4, "seqlen": 32}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantization.auto loads the float model whole" in err[0] and "10.0 KB free on cpu" in err[0], err
    assert not (tmp_path / "out").exists()


def test_dry_run_shows_the_allocation_and_writes_nothing(tiny_dirs, tmp_path, text):
    buf = io.StringIO()
    res = run(auto_recipe(tiny_dirs("llama"), tmp_path / "out", text, {"bits_per_weight": 5.0}), dry_run=True,
              console=Console(file=buf, width=200), progress=False)
    shown = buf.getvalue()
    assert "predicted KL divergence" in shown and "rules:" in shown and "estimated checkpoint size" in shown
    assert res.plan.linear_bits_per_weight() <= 5.0
    assert not (tmp_path / "out").exists()


def test_auto_with_gptq_uses_the_methods_gain(tiny_dirs, tmp_path, text):
    res = quiet(auto_recipe(tiny_dirs("llama"), tmp_path / "out", text, {"bits_per_weight": 4.5}, method="gptq"))
    plain = quiet(auto_recipe(tiny_dirs("llama"), tmp_path / "rtn", text, {"bits_per_weight": 4.5}, method="rtn"))
    ratios = [x["method_error_ratio"] for x in res.auto["layers"].values()]
    assert sum(r < 0.95 for r in ratios) >= len(ratios) // 2  # GPTQ lowers most layers' 4-bit error
    # each layer's 4-bit predictions are round-to-nearest's (same sensitivity windows) times the method's gain
    for name, layer in res.auto["layers"].items():
        rtn_layer = plain.auto["layers"][name]
        assert rtn_layer["method_error_ratio"] is None
        for label, c in layer["candidates"].items():
            gain = layer["method_error_ratio"] if label.startswith("nf4") else 1.0
            assert c["predicted_kl"] == pytest.approx(gain * rtn_layer["candidates"][label]["predicted_kl"], rel=1e-6, abs=1e-12)
    assert all(e.method == "gptq" for e in res.plan.quantized_entries)
    with pytest.raises(UserError):
        Recipe.from_dict({"model": {"source": "x"}, "output": {"dir": "x"}, "quantization": {"auto": {"bits_per_weight": 4.5}}})


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "opt", "mistral"])
def test_auto_on_other_families(tiny_dirs, tmp_path, text, arch):
    """GPT-2's Conv1D (fused q/k/v, transposed weights), a tied head, OPT's biases: the budget holds on the export."""
    out = tmp_path / "out"
    res = quiet(auto_recipe(tiny_dirs(arch), out, text, {"bits_per_weight": 5.0}))
    assert res.check.passed and res.plan.linear_bits_per_weight() <= 5.0
    assert json.loads((out / "llmquant.json").read_text())["sizes"]["linear_bits_per_weight"] <= 5.0
    assert len({e.label() for e in res.plan.quantized_entries}) > 1  # a real mix


def test_kl_search_finds_the_smallest_frontier_mix_that_meets_the_target():
    """The prediction is off by a factor (as real ones are): the corrected search still ends at the smallest mix whose
    measured KL meets the target, in a few measurements, never at one that misses it."""
    from types import SimpleNamespace

    import llmquant.auto as A

    rng = random.Random(1)
    n, k = 5, 4
    costs = [sorted(rng.randint(10, 60) for _ in range(k)) for _ in range(n)]
    values = [sorted((rng.random() for _ in range(k)), reverse=True) for _ in range(n)]
    p = SimpleNamespace(free=[SimpleNamespace(name=f"l{i}") for i in range(n)], menus={f"l{i}": list(range(k)) for i in range(n)},
                        costs=costs, fixed=0, per_weight=True, weights=8)
    span = sum(max(c) for c in costs)
    _, unit, best = allocate(costs, values, span, span=span)
    for factor in (0.4, 1.0, 2.5):
        calls = []

        class Meter:  # "measured" = the prediction times a factor
            def __init__(self, *a):
                pass

            def __call__(self, picked):
                calls.append(picked)
                return factor * sum(values[int(name[1:])][c] for name, c in picked.items())

            def close(self):
                pass

        for target in (0.3, 0.8, 1.5):
            calls.clear()
            try:
                choice, checks, measured = A.meet_kl(p, values, best, unit, Meter(), target, lambda *a: None)
            except UserError:
                assert factor * min(sum(v[-1] for v in values), brute_force(costs, values, span)[0]) > target
                continue
            assert measured <= target and measured == pytest.approx(factor * sum(v[c] for v, c in zip(values, choice)))
            size = sum(c[i] for c, i in zip(costs, choice))
            # no mix of the frontier smaller than the chosen one meets the target
            smaller = brute_force(costs, values, size - 1)
            assert smaller is None or factor * smaller[0] > target
            assert len(calls) <= A.KL_ROUNDS + 1 and len(checks) == len(calls)


def test_unreachable_kl_target_is_one_line_and_writes_nothing(tiny_dirs, tmp_path, text, capsys):
    import yaml

    d = {"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu", "output": {"dir": str(tmp_path / "out")},
         "quantization": {"auto": {"kl": 1e-9, "candidates": ["nf4", "int8"]}},
         "calibration": {"text": {"source": str(text)}, "nsamples": 4, "seqlen": 32}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["run", str(path), "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "kl 1e-09 cannot be met with these candidates; the best mix measures" in last
    assert not (tmp_path / "out").exists()


def test_kl_target_is_met_on_the_calibration_text(tiny_dirs, tmp_path, text):
    """The export of a kl target, loaded back, is within the target on the calibration windows, and it is not
    needlessly large: the smallest mix measured above the target."""
    from llmquant.calibrate import calibration_windows
    from llmquant.data import load_text
    from llmquant.export import load_export
    from llmquant.models import load_model, resolve_source

    loose = quiet(auto_recipe(tiny_dirs("llama"), tmp_path / "loose", text, {"kl": 1e6}), dry_run=True).auto
    smallest = loose["measured_kl"]  # any mix meets a huge target: the smallest one is taken
    assert loose["chosen_x"] == min(c["x"] for c in loose["kl_checks"])
    target = smallest / 3
    recipe = auto_recipe(tiny_dirs("llama"), tmp_path / "out", text, {"kl": target})
    res = quiet(recipe)
    a = res.auto
    assert a["target"] == f"kl {target:g}" and a["measured_kl"] <= target and a["chosen_x"] > loose["chosen_x"]
    assert all(c["measured_kl"] > target for c in a["kl_checks"] if c["x"] < a["chosen_x"])
    # measured again here, independently, on the export loaded from disk
    float_model, tok = load_model(resolve_source(str(tiny_dirs("llama"))), "float32", "cpu")
    quant_model = load_export(tmp_path / "out", "cpu")
    c = recipe.calibration
    windows = calibration_windows(tok, load_text(c.text, "calib").text, min(recipe.quantization.auto.windows, c.nsamples),
                                  c.seqlen, c.seed)
    with torch.no_grad():
        ref = torch.cat([float_model(w[None]).logits[0] for w in windows]).float().log_softmax(-1)
        got = torch.cat([quant_model(w[None]).logits[0] for w in windows]).float().log_softmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1).clamp_min(0).mean().item()
    assert kl == pytest.approx(a["measured_kl"], rel=1e-3) and kl <= target * (1 + 1e-3)
    assert "quality target of kl" in (tmp_path / "out" / "README.md").read_text()
    assert Recipe.load(tmp_path / "out" / "recipe.yaml").quantization.auto is None


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "opt"])
@pytest.mark.parametrize("streamed", [True, False])
def test_a_tied_head_stays_tied_in_an_auto_export(tiny_dirs, tmp_path, text, monkeypatch, arch, streamed):
    """A head tied to the input embeddings is one tensor in the files whatever path chose the mix, the reloaded
    model's head and embeddings share it, and the export is the size of a rules-based export of the same formats."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from llmquant import pipeline

    if not streamed:
        monkeypatch.setattr(pipeline, "_stream_reader", lambda *a: None)
    res = quiet(auto_recipe(tiny_dirs(arch), tmp_path / "auto", text, {"bits_per_weight": 5.0}))
    assert res.streamed == streamed and res.check.passed
    keys = []
    for f in (tmp_path / "auto").glob("*.safetensors"):
        keys += list(safe_open(str(f), "pt").keys())
    head = {"qwen2": "lm_head.weight", "gpt2": "lm_head.weight", "opt": "lm_head.weight"}[arch]
    assert head not in keys, "the tied head was written a second time"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "auto")
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    rules = [{"match": e.name, **e.scheme.model_dump()} for e in res.plan.entries if e.scheme is not None]
    same = quiet(Recipe.from_dict({"model": {"source": str(tiny_dirs(arch))}, "device": "cpu",
                                   "quantization": {"default": "nf4", "rules": rules}, "output": {"dir": str(tmp_path / "rules")}}))
    assert same.check.passed
    assert safetensors_bytes(tmp_path / "auto") == safetensors_bytes(tmp_path / "rules")
    # the report's whole-file sizes (llmquant.json, auto.png) are those of the files: the chosen mix and uniform NF4
    uniform = quiet(Recipe.from_dict({"model": {"source": str(tiny_dirs(arch))}, "device": "cpu",
                                      "quantization": {"default": {"format": "nf4", "group_size": 64}},
                                      "output": {"dir": str(tmp_path / "uniform")}}))
    for predicted, folder in ((res.auto["chosen_file_bytes"], "auto"), (res.auto["uniform"]["nf4/g64"][2], "uniform")):
        got = safetensors_bytes(tmp_path / folder)  # (header entries differ by a few hundred bytes a layer)
        assert abs(predicted - got) <= 2e-3 * got, (folder, predicted, got)
    assert uniform.check.passed
