"""`llmquant bench`: consistent counts and rates, one-line errors, results.json's speed section."""

import json

import pytest
import torch

from llmquant.bench import SpeedSettings, bench, bench_model, speed_table
from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.models import load_model, resolve_source


def test_counts_and_rates_are_consistent(tiny_dirs):
    settings = SpeedSettings(batch_sizes=[1, 3], prompt_tokens=12, new_tokens=6, repeats=3, warmup=1)
    speed = bench({"model": str(tiny_dirs("llama"))}, settings, "cpu", log=lambda m: None)
    r = speed["models"]["model"]
    assert [row["batch_size"] for row in r["rows"]] == [1, 3]
    for row in r["rows"]:
        bs = row["batch_size"]
        assert row["generated_tokens"] == bs * 6 and len(row["greedy_ids"]) == 6
        p, g = row["prefill_seconds"], row["generate_seconds"]
        assert 0 < p["min"] <= p["median"] <= p["max"]
        # three repeats: the median rate is the rate of the median time
        assert row["prefill_tokens_per_second"]["median"] == pytest.approx(bs * 12 / p["median"])
        assert row["decode_tokens_per_second"]["max"] >= row["decode_tokens_per_second"]["median"] >= row["decode_tokens_per_second"]["min"] > 0
        # decode: batch / the median step (5 decode steps per run), and over the whole decode, which is part of generate
        assert row["decode_tokens_per_second"]["median"] == pytest.approx(bs / row["decode_step_seconds"]["median"])
        assert row["decode_throughput"]["median"] == pytest.approx(bs * 5 / row["decode_seconds"]["median"])
        assert row["decode_seconds"]["median"] < g["median"]
        assert g["median"] > 0
    assert r["load_seconds"] > 0 and r["peak_host_bytes"] > 100e6
    assert isinstance(r["greedy_text"], str)
    assert speed["device"] == "cpu" and speed["settings"]["new_tokens"] == 6
    assert "| model | 3 |" in speed_table(speed)


def test_a_model_compared_with_itself_agrees_on_every_greedy_token(tiny_dirs):
    settings = SpeedSettings(batch_sizes=[1], prompt_tokens=8, new_tokens=5, repeats=1, warmup=0)
    d = str(tiny_dirs("llama"))
    speed = bench({"baseline": d, "quantized": d}, settings, "cpu", log=lambda m: None)
    assert speed["models"]["quantized"]["greedy_agrees_with_baseline_for_tokens"] == 5


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


def test_bad_bench_sections_are_refused_before_any_work(tiny_dirs, tmp_path):
    from llmquant.recipe import Recipe

    with pytest.raises(UserError, match="bench.new_tokens"):
        Recipe.from_dict({"model": {"source": "x"}, "bench": {"new_tokens": 1}, "output": {"dir": str(tmp_path)}})
