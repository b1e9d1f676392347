"""`llmquant bench`: consistent counts and rates, one-line errors, results.json's speed section."""

import json

import pytest
import torch

from llmquant.bench import SpeedSettings, bench, bench_model, speed_table
from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.models import load_model, resolve_source


class _FakeTime:
    """A clock that moves only when the model computes: a forward pass of a [batch, L] input costs
    ``PREFILL_PER_TOKEN`` seconds per token when L > 1 (prefill), ``DECODE_STEP`` seconds when L == 1."""

    PREFILL_PER_TOKEN, DECODE_STEP = 1e-3, 0.02

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now

    def forward_done(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        bs, length = ids.shape
        self.now += bs * length * self.PREFILL_PER_TOKEN if length > 1 else self.DECODE_STEP


def test_rates_are_the_tokens_over_the_time_the_model_took(tiny_dirs, monkeypatch):
    import llmquant.bench as bench_mod

    clock = _FakeTime()
    monkeypatch.setattr(bench_mod, "time", clock)
    model, tok = load_model(resolve_source(str(tiny_dirs("llama"))), "float32", "cpu")
    model.register_forward_hook(clock.forward_done, with_kwargs=True)
    settings = SpeedSettings(batch_sizes=[1, 3], prompt_tokens=12, new_tokens=6, repeats=3, warmup=1)
    rows = bench_model(model, tok, settings, log=lambda m: None)["rows"]
    assert [row["batch_size"] for row in rows] == [1, 3]
    for row in rows:
        bs = row["batch_size"]
        prefill = bs * 12 * clock.PREFILL_PER_TOKEN
        assert row["generated_tokens"] == bs * 6 and len(row["greedy_ids"]) == 6
        assert row["prefill_seconds"]["median"] == pytest.approx(prefill)
        assert row["prefill_tokens_per_second"]["median"] == pytest.approx(1 / clock.PREFILL_PER_TOKEN)
        # 6 new tokens: the prefill inside generate makes the first, 5 decode steps the others
        assert row["decode_step_seconds"]["median"] == pytest.approx(clock.DECODE_STEP)
        assert row["decode_tokens_per_second"]["median"] == pytest.approx(bs / clock.DECODE_STEP)
        assert row["decode_throughput"]["median"] == pytest.approx(bs / clock.DECODE_STEP)
        assert row["decode_seconds"]["median"] == pytest.approx(5 * clock.DECODE_STEP)
        assert row["generate_seconds"]["median"] == pytest.approx(prefill + 5 * clock.DECODE_STEP)


def test_peak_host_memory_sees_a_short_allocation(tiny_dirs, monkeypatch):
    import time

    import psutil

    import llmquant.models as models_mod

    real_load, big = models_mod.load_model, 400 * 2**20

    def load_with_a_spike(*a, **k):  # holds 400 MB for 0.2 s while loading, then frees them
        spike = torch.ones(big // 4)
        time.sleep(0.2)
        del spike
        return real_load(*a, **k)

    monkeypatch.setattr(models_mod, "load_model", load_with_a_spike)  # (bench imports it when called)
    before = psutil.Process().memory_info().rss
    settings = SpeedSettings(batch_sizes=[1], prompt_tokens=8, new_tokens=2, repeats=1, warmup=0)
    r = bench({"model": str(tiny_dirs("llama"))}, settings, "cpu", log=lambda m: None)["models"]["model"]
    assert r["peak_host_bytes"] >= before + 0.9 * big, (r["peak_host_bytes"], before)
    assert r["load_seconds"] >= 0.2


def test_greedy_agreement_with_the_baseline_is_the_common_prefix(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmquant.bench import prompt_ids

    base_dir, other_dir = tiny_dirs("llama"), tmp_path / "other"
    other = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():  # a slightly different model: its greedy text parts from the baseline's somewhere
        for p in other.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    other.save_pretrained(other_dir)
    model, tok = load_model(resolve_source(str(base_dir)), "float32", "cpu")
    tok.save_pretrained(other_dir)
    x = prompt_ids(tok, 8, model.config.vocab_size).unsqueeze(0)
    greedy = [m.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 8:].tolist() for m in (model, other)]
    expected = next((i for i, (a, b) in enumerate(zip(*greedy)) if a != b), 12)
    settings = SpeedSettings(batch_sizes=[1], prompt_tokens=8, new_tokens=12, repeats=1, warmup=0)
    speed = bench({"baseline": str(base_dir), "quantized": str(other_dir)}, settings, "cpu", log=lambda m: None)
    assert speed["models"]["quantized"]["greedy_agrees_with_baseline_for_tokens"] == expected < 12
    assert speed["device"] == "cpu" and "| quantized | 1 |" in speed_table(speed)


@pytest.mark.parametrize("args, message", [
    (["--new-tokens", "0"], "--new-tokens must be 2 or more"),
    (["--prompt-tokens", "0"], "--prompt-tokens must be 1 or more"),
    (["--batch-sizes", "1,x"], "--batch-sizes takes comma-separated whole numbers"),
    (["--batch-sizes", "0"], "batch sizes must be 1 or more"),
])
def test_bad_settings_are_one_line(tiny_dirs, tmp_path, capsys, args, message):
    assert main(["bench", str(tiny_dirs("llama")), "--output", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_a_batch_that_does_not_fit_is_one_line(tiny_dirs, monkeypatch):
    model, tok = load_model(resolve_source(str(tiny_dirs("llama"))), "float32", "cpu")

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "forward", oom)
    with pytest.raises(UserError, match="batch size 4 with 8\\+4 tokens does not fit"):
        bench_model(model, tok, SpeedSettings([4], 8, 4, 1, 0), log=lambda m: None)


def test_the_speed_section_joins_an_exports_results(tiny_dirs, tmp_path, capsys):
    import io

    from rich.console import Console

    from conftest import TEXT
    from llmquant.pipeline import run
    from llmquant.recipe import Recipe

    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    out = tmp_path / "export"
    run(Recipe.from_dict({"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu", "quantization": {"default": "int8"},
                          "eval": {"text": {"source": str(text)}, "seqlen": 32, "max_tokens": 100}, "output": {"dir": str(out)}}),
        console=Console(file=io.StringIO()), progress=False)
    assert main(["bench", str(out), "--output", str(out), "--prompt-tokens", "8", "--new-tokens", "3",
                 "--repeats", "1", "--warmup", "0"]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert merged["speed"]["models"]["model"]["rows"][0]["generated_tokens"] == 3
    assert "quantized" in merged["models"]  # the evaluation is still there
    assert "## Speed" in (out / "results.md").read_text()
    assert json.loads((out / "speed.json").read_text())["settings"]["prompt_tokens"] == 8


def test_a_recipe_with_bench_measures_its_export_and_the_baseline(tiny_dirs, tmp_path):
    import io

    from rich.console import Console

    from llmquant.pipeline import run
    from llmquant.recipe import Recipe

    out = tmp_path / "export"
    run(Recipe.from_dict({"model": {"source": str(tiny_dirs("qwen2"))}, "device": "cpu", "quantization": {"default": "nf4"},
                          "bench": {"batch_sizes": [1, 2], "prompt_tokens": 8, "new_tokens": 4, "repeats": 1, "warmup": 0},
                          "output": {"dir": str(out)}}),
        console=Console(file=io.StringIO()), progress=False)
    speed = json.loads((out / "speed.json").read_text())
    assert set(speed["models"]) == {"baseline", "quantized"}
    assert [r["batch_size"] for r in speed["models"]["quantized"]["rows"]] == [1, 2]
    assert speed["models"]["quantized"]["source"] == str(out)
    card = (out / "README.md").read_text()
    assert "## Speed" in card and "| quantized | 2 |" in card
    assert main(["inspect", str(out)]) == 0  # the records still describe the files


def test_a_bench_out_of_memory_after_the_export_is_reported_and_the_run_goes_on(tiny_dirs, tmp_path, monkeypatch, capsys):
    import llmquant.bench as bench_mod
    import llmquant.pipeline as pipeline

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    pushed = []
    monkeypatch.setattr(bench_mod, "bench", oom)
    monkeypatch.setattr(pipeline, "_push", lambda recipe, out, console, log: pushed.append(out))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu",
                                  "quantization": {"default": "nf4"}, "bench": {"prompt_tokens": 8, "new_tokens": 4},
                                  "output": {"dir": str(tmp_path / "out")}}))
    assert main(["run", str(recipe), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: the bench did not run (CUDA out of memory. Tried to allocate 2.00 GiB); the export at" in err, err
    assert pushed == [tmp_path / "out"] and main(["inspect", str(tmp_path / "out")]) == 0  # in place, and pushed


def test_bad_bench_sections_are_refused_before_any_work(tiny_dirs, tmp_path):
    from llmquant.recipe import Recipe

    with pytest.raises(UserError, match="bench.new_tokens"):
        Recipe.from_dict({"model": {"source": "x"}, "bench": {"new_tokens": 1}, "output": {"dir": str(tmp_path)}})
