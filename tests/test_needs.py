"""What a run needs, known before it starts: figures on skeletons of real large models against a hand computation,
and oversized recipes refused in one line before any weight is loaded."""

import json

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from llmquant import memory, needs, pipeline
from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.plan import build_plan
from llmquant.recipe import Recipe
from llmquant.report import human_bytes
from llmquant.stream import skeleton

# (config class, hidden, intermediate, layers, attention heads, key/value heads, vocabulary, q/k/v biases)
MODELS = {
    "Llama-3-8B": (LlamaConfig, 4096, 14336, 32, 32, 8, 128256, False),
    "Llama-3-70B": (LlamaConfig, 8192, 28672, 80, 64, 8, 128256, False),
    "Qwen2.5-72B": (Qwen2Config, 8192, 29568, 80, 64, 8, 152064, True),
}


def _frame(name):
    cls, h, inter, layers, heads, kv, vocab, _ = MODELS[name]
    config = cls(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False)
    return skeleton(config, torch.bfloat16)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("streamed", [True, False])
def test_figures_match_a_hand_computation(name, streamed):
    _, h, inter, layers, heads, kv_heads, vocab, bias = MODELS[name]
    frame = _frame(name)
    recipe = Recipe.from_dict({"model": {"source": "x"}, "output": {"dir": "out"},
                               "quantization": {"default": "nf4", "method": "gptq"},
                               "calibration": {"text": {"source": "wikitext2"}, "nsamples": 128, "seqlen": 2048}})
    plan = build_plan(frame, recipe.quantization, torch.bfloat16)
    n = needs.estimate(recipe, plan, frame, torch.bfloat16, streamed, torch.device("cpu"), calibrated=True, tracks_float=False)
    # by hand, in bfloat16 (2 bytes)
    kv = kv_heads * (h // heads)
    layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h + (h + 2 * kv if bias else 0))
    whole = 2 * (2 * vocab * h + h) + layers * layer
    activations = 128 * 2048 * h * 2
    hessians = 4 * (6 * h * h + inter * inter)  # q, k, v, o, gate and up read width h; down reads the intermediate width
    got = {k.split(" (")[0]: v for k, v in n.host.items()}
    assert got["calibration activations"] == 2 * activations  # exactly: 2 generations
    assert got["Hessians of the largest layer"] == pytest.approx(hessians, rel=0.10)
    if streamed:
        assert got["the largest decoder layer"] == pytest.approx(layer, rel=0.10)
        assert got["the model outside its decoder layers"] == pytest.approx(2 * (2 * vocab * h + h), rel=0.10)
        assert n.disk["resume state"] == 2 * activations  # the state after a layer beside the one before it, a moment
    else:
        assert got["the float model"] == pytest.approx(whole, rel=0.10)
    assert n.disk["the export"] == pytest.approx(plan.file_bytes_estimate())
    if name == "Llama-3-70B" and streamed:  # the case: GPTQ 128 x 2048 on a 70B model, streamed
        assert sum(n.host.values()) == pytest.approx(2 * activations + hessians + layer + 2 * (2 * vocab * h + h), rel=0.10)


def test_tuning_state_by_hand_and_the_whole_model_stage_refused_when_it_cannot_fit(monkeypatch, tmp_path):
    """gptq+tune on Llama-3-8B: the layer stage holds one decoder layer's tuning state (42 bytes per weight, measured),
    tune.model_steps every layer's scales at once (5 bytes per weight); on 48 GB, a whole-model stage of an 8B model is refused naming tune.model_steps, the layer stage streamed fits."""
    _, h, inter, layers, heads, kv_heads, vocab, _ = MODELS["Llama-3-8B"]
    frame = _frame("Llama-3-8B")
    kv = kv_heads * (h // heads)
    linear = 2 * h * h + 2 * h * kv + 3 * h * inter  # one decoder layer's Linear weights
    made = {}
    for steps in (0, 100):
        recipe = Recipe.from_dict({"model": {"source": "x"}, "output": {"dir": str(tmp_path / "out")},
                                   "quantization": {"default": "nf4", "method": "gptq+tune"},
                                   "calibration": {"text": {"source": "wikitext2"}, "nsamples": 128, "seqlen": 2048,
                                                   "tune": {"model_steps": steps}}})
        plan = build_plan(frame, recipe.quantization, torch.bfloat16)
        n = needs.estimate(recipe, plan, frame, torch.bfloat16, steps == 0, torch.device("cpu"), calibrated=True,
                           tracks_float=False)
        assert n.host["tuning state of the largest layer"] == 42 * linear
        whole = n.host.get("tuning the whole model at once (tune.model_steps)")
        assert whole == (5 * layers * linear if steps else None)
        made[steps] = n
    monkeypatch.setattr(memory, "free_bytes", lambda device, all_gpus=False: 48 * 2**30)
    made[0].disk = made[100].disk = {}
    needs.check(made[0], tmp_path / "out", torch.device("cpu"))  # streamed, a layer at a time: fits
    with pytest.raises(UserError, match=r"^this run needs about .* of host memory .* set calibration.tune.model_steps: 0"):
        needs.check(made[100], tmp_path / "out", torch.device("cpu"))

    # tune.scope: group holds the largest group's state (gate/up) and 20 bytes for each other tuned weight; where a
    # layer's state does not fit (12 GB free: it needs 13.5, by groups 11.2) the refusal names that setting, and the group scope fits
    by_scope = {}
    for scope in ("layer", "group"):
        recipe = Recipe.from_dict({"model": {"source": "x"}, "output": {"dir": str(tmp_path / "out")},
                                   "quantization": {"default": "nf4", "method": "gptq+tune"},
                                   "calibration": {"text": {"source": "wikitext2"}, "nsamples": 16, "seqlen": 2048,
                                                   "tune": {"scope": scope}}})
        plan = build_plan(frame, recipe.quantization, torch.bfloat16)
        by_scope[scope] = needs.estimate(recipe, plan, frame, torch.bfloat16, True, torch.device("cpu"), calibrated=True,
                                         tracks_float=False)
        by_scope[scope].disk = {}
    assert by_scope["group"].host["tuning state of the largest group"] == 42 * 2 * h * inter + 20 * (linear - 2 * h * inter)
    monkeypatch.setattr(memory, "free_bytes", lambda device, all_gpus=False: 12 * 2**30)
    with pytest.raises(UserError, match=r"\(tuning state of the largest layer: .*set calibration.tune.scope: group"):
        needs.check(by_scope["layer"], tmp_path / "out", torch.device("cpu"))
    needs.check(by_scope["group"], tmp_path / "out", torch.device("cpu"))


def test_the_search_of_quantization_auto_is_refused_before_it_starts_when_its_scratch_cannot_fit(tiny_dirs, tmp_path, monkeypatch,
                                                                                                 capsys):
    """Streamed, the sensitivity pass keeps every decoder layer's inputs on disk: on Llama-3-70B with 32 windows of 2048,
    80 x 32 x 2048 x 8192 x 2 bytes = 86 GB; a recipe whose search cannot fit is refused before any weight is read."""
    import shutil

    _, h, _, layers, *_ = MODELS["Llama-3-70B"]
    frame = _frame("Llama-3-70B")
    recipe = Recipe.from_dict({"model": {"source": "x"}, "output": {"dir": "out"},
                               "quantization": {"auto": {"kl": 0.05}, "method": "gptq"},
                               "calibration": {"text": {"source": "wikitext2"}, "nsamples": 128, "seqlen": 2048}})
    from llmquant import auto

    n = needs.estimate_auto(recipe, frame, torch.bfloat16, streamed=True, problem=auto.prepare(recipe, frame, torch.bfloat16))
    assert n.disk["quantization.auto: every decoder layer's inputs"] == layers * 32 * 2048 * h * 2
    # the weights the measured mixes (7 at most) give each layer, kept for the mixes after: the 7 largest of its nine
    # candidates but the bf16 it has (int8: a byte and a float32 scale per row; NF4 block g: half a byte, a float32
    # scale per block, or with double quantization a byte per block and a float32 per 256 blocks)
    weights = layers * (2 * h * h + 2 * h * 1024 + 3 * h * 28672)
    per_weight = sorted([1.0] + [0.5 + 4 / g for g in (32, 64, 128, 256)] + [0.5 + 1 / g + 4 / (256 * g) for g in (32, 64, 128, 256)],
                        reverse=True)[:7]
    assert n.disk["quantization.auto: the candidates' weights (at most)"] == pytest.approx(weights * sum(per_weight), rel=0.05)
    assert n.disk["quantization.auto: two generations of hidden states"] == 2 * 32 * 2048 * h * 2
    assert n.disk["quantization.auto: every layer's Hessians (at most)"] == pytest.approx(
        layers * 4 * (6 * h * h + 28672 ** 2), rel=0.10)
    assert n.host["quantization.auto: one layer's hidden states and gradients"] == 32 * 2048 * h * 6
    # the tiny model: 2 layers x 16 windows x 64 tokens x 128 x 4 bytes = 1 MB of inputs, on a disk with 0.5 MB free
    d = {"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu", "output": {"dir": str(tmp_path / "out")},
         "quantization": {"auto": {"bits_per_weight": 4.5, "windows": 16}},
         "calibration": {"text": {"source": str(tmp_path / "t.txt")}, "nsamples": 16, "seqlen": 64}}
    (tmp_path / "t.txt").write_text("Some calibration text. " * 400)
    (tmp_path / "r.yaml").write_text(json.dumps(d))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2**19))
    monkeypatch.setattr(pipeline, "_choose_formats", lambda *a, **k: pytest.fail("the search started"))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "r.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(quantization.auto: every decoder layer's inputs: 1.0 MB)" in err[0], err
    assert err[0].endswith("lower quantization.auto.windows or calibration.seqlen, or free some space"), err


OVERSIZED = {
    # a typo for 1000: 100000 x 512 x 64 x 4 bytes x 2 generations = 26 GB of activations
    "nsamples": ({"calibration": {"nsamples": 100000, "seqlen": 512}}, "host memory (calibration activations",
                 "lower calibration.nsamples or calibration.seqlen, or set calibration.activations: disk"),
    "seqlen": ({"calibration": {"nsamples": 128, "seqlen": 1_000_000}}, "host memory (calibration activations",
               "lower calibration.nsamples or calibration.seqlen"),
    "tuned": ({"quantization": {"default": "nf4", "method": "gptq+tune"}, "calibration": {"nsamples": 20000, "seqlen": 512}},
              "host memory (calibration activations (3 x", "lower calibration.nsamples"),
    "disk": ({"calibration": {"nsamples": 1000, "seqlen": 512, "activations": "disk"}}, "of disk in",
             "lower calibration.nsamples or calibration.seqlen"),
}


@pytest.mark.parametrize("case", list(OVERSIZED))
def test_oversized_recipes_are_refused_in_one_line_before_any_weight_loads(tiny_dirs, tmp_path, monkeypatch, capsys, case):
    import shutil

    extra, where, hint = OVERSIZED[case]
    d = {"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu", "output": {"dir": str(tmp_path / "out")},
         "quantization": {"default": "nf4", "method": "gptq"},
         "calibration": {"text": {"source": str(tmp_path / "t.txt")}}}
    for k, v in extra.items():
        d[k] = {**d[k], **v}
    (tmp_path / "t.txt").write_text("Some calibration text. " * 400)
    (tmp_path / "r.yaml").write_text(json.dumps(d))
    monkeypatch.setattr(memory, "free_bytes", lambda device, all_gpus=False: 2 * 2**30)  # 2 GB free
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=50 * 2**20))  # 50 MB free

    def no_load(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    monkeypatch.setattr(pipeline, "_run_streamed", no_load)
    capsys.readouterr()
    assert main(["run", str(tmp_path / "r.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: this run needs about") and where in err[0] and hint in err[0], err
    assert not (tmp_path / "out").exists()
    # the dry run prints the same figures and refuses nothing
    assert main(["run", str(tmp_path / "r.yaml"), "--dry-run"]) == 0
    assert "what the run needs" in capsys.readouterr().out


def test_a_recipe_that_fits_runs_and_records_its_peak_memory(tiny_dirs, tmp_path, monkeypatch, capsys):
    import psutil

    from llmquant import stream

    d = {"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu", "output": {"dir": str(tmp_path / "out")},
         "quantization": {"default": "nf4", "method": "gptq"},
         "calibration": {"text": {"source": str(tmp_path / "t.txt")}, "nsamples": 4, "seqlen": 32}}
    (tmp_path / "t.txt").write_text("Some calibration text. " * 400)
    (tmp_path / "r.yaml").write_text(json.dumps(d))
    monkeypatch.setattr(memory, "free_bytes", lambda device, all_gpus=False: 2 * 2**30)
    given = []
    monkeypatch.setattr(stream, "give_memory_back", lambda device=None: given.append(device))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    peak = json.loads((tmp_path / "out" / "llmquant.json").read_text())["peak_memory_bytes"]
    assert set(peak) == {"host_bytes"} and peak["host_bytes"] >= psutil.Process().memory_info().rss  # bytes, not KB
    assert f"peak memory: host {human_bytes(peak['host_bytes'])}" in capsys.readouterr().out
    # between decoder layers the streamed run gives its device's memory back (on a GPU: the allocator's cache too)
    assert given.count(torch.device("cpu")) >= 2


def test_memory_on_a_gpu_is_given_back_and_its_peak_read(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 12345)
    memory.give_memory_back()
    memory.give_memory_back(torch.device("cpu"))
    assert not emptied
    memory.give_memory_back(torch.device("cuda", 0))
    assert emptied == [1]
    assert memory.peaks(torch.device("cuda", 0))["gpu_bytes"] == 12345 and "gpu_bytes" not in memory.peaks(torch.device("cpu"))


def test_dtype_auto_keeps_the_checkpoints_dtype_and_a_gguf_file_computes_in_bfloat16_on_a_gpu(monkeypatch):
    from types import SimpleNamespace

    from llmquant.models import ModelSource, resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gguf, folder = ModelSource("gguf", "m.gguf"), ModelSource("folder", "m")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    bf16 = SimpleNamespace(dtype=torch.bfloat16)
    assert resolve_dtype("auto", folder, bf16, cpu) == resolve_dtype("auto", folder, bf16, gpu) == torch.bfloat16
    assert resolve_dtype("auto", gguf, bf16, cpu) == torch.float32  # transformers dequantizes GGUF to float32
    assert resolve_dtype("auto", gguf, bf16, gpu) == torch.bfloat16
    assert resolve_dtype("auto", folder, SimpleNamespace(), gpu) == torch.bfloat16
    assert resolve_dtype("float16", gguf, bf16, gpu) == torch.float16
