"""Evaluation in `llmquant run`, `llmquant eval` and `llmquant compare` (tiny models, small texts)."""

import io
import json

import pytest
from rich.console import Console

from conftest import TEXT
from llmquant import results as results_mod
from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.pipeline import run
from llmquant.recipe import Recipe


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT * 3)
    return f


def eval_recipe(model_dir, out, text, quant=None, **eval_kw):
    ev = {"text": {"source": str(text), "range": [0.2, 1.0]}, "seqlen": 32, "divergence_tokens": 64, **eval_kw}
    return Recipe.from_dict({"model": {"source": str(model_dir)}, "device": "cpu",
                             "quantization": quant or {"default": "nf4"}, "eval": ev, "output": {"dir": str(out)}})


def quiet(r):
    return run(r, console=Console(file=io.StringIO()), progress=False)


def test_run_writes_versioned_results(tiny_dirs, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    res = quiet(eval_recipe(tiny_dirs("llama"), out, text_file)).results
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema"] == "llmquant.results/1" == res["schema"]
    base, q = saved["models"]["baseline"], saved["models"]["quantized"]
    assert base["perplexity"] > 1 and q["perplexity"] > 1
    assert q["kl_divergence"]["mean"] > 0 and 0 < q["top1_agreement"] <= 1 and q["divergence_tokens"] == 64
    assert "kl_divergence" not in base
    assert base["size"]["bytes"] > 2 * q["size"]["bytes"]  # tiny model: embeddings and head dominate
    assert 4.5 <= q["size"]["linear_bits_per_weight"] < 4.8 and base["size"]["linear_bits_per_weight"] == 32
    p = saved["protocol"]["perplexity"]
    assert (p["name"], p["seqlen"], p["text"]["range"]) == ("windows", 32, [0.2, 1.0])
    assert p["tokens_scored"] == p["windows"] * 31 and len(p["text"]["sha256"]) == 64
    assert saved["deltas"]["quantized"]["perplexity"]["rel"] == pytest.approx(q["perplexity"] / base["perplexity"] - 1)
    assert set(saved["versions"]) >= {"torch", "transformers", "bitsandbytes", "lm_eval", "llmquant"}
    md = (out / "results.md").read_text()
    assert "| perplexity |" in md and "top-1 agreement with baseline" in md and "non-overlapping windows of 32 tokens" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.baseline_cache
def test_baseline_is_cached_across_runs(tiny_dirs, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    first = quiet(eval_recipe(tiny_dirs("llama"), tmp_path / "a", text_file)).results
    second = quiet(eval_recipe(tiny_dirs("llama"), tmp_path / "b", text_file, {"default": "int8"})).results
    assert not first["models"]["baseline"]["from_cache"] and second["models"]["baseline"]["from_cache"]
    assert second["models"]["baseline"]["perplexity"] == first["models"]["baseline"]["perplexity"]
    assert second["models"]["quantized"]["kl_divergence"]["mean"] < first["models"]["quantized"]["kl_divergence"]["mean"]
    # another protocol is another cache entry
    third = quiet(eval_recipe(tiny_dirs("llama"), tmp_path / "c", text_file, seqlen=16)).results
    assert not third["models"]["baseline"]["from_cache"]


def test_compare_merges_same_protocol_and_refuses_others(tiny_dirs, tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    quiet(eval_recipe(tiny_dirs("llama"), tmp_path / "nf4", text_file))
    quiet(eval_recipe(tiny_dirs("llama"), tmp_path / "int8", text_file, {"default": "int8"}))
    assert main(["compare", str(tmp_path / "nf4"), str(tmp_path / "int8" / "results.json"), "--output", str(tmp_path / "cmp")]) == 0
    merged = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert list(merged["models"]) == ["baseline", "nf4", "int8"]
    assert merged["models"]["int8"]["perplexity"] < merged["models"]["nf4"]["perplexity"]
    assert "| int8 |" in (tmp_path / "cmp" / "results.md").read_text() or "int8" in (tmp_path / "cmp" / "results.md").read_text()
    assert (tmp_path / "cmp" / "results.png").is_file()
    assert "decode tokens/s" not in (tmp_path / "cmp" / "results.md").read_text()  # no bench, no speed rows
    # with a bench beside each result, compare puts speed beside quality (same settings and device only)
    bench = ["--prompt-tokens", "8", "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--device", "cpu"]
    for name in ("nf4", "int8"):
        assert main(["bench", str(tmp_path / name), "--baseline", str(tiny_dirs("llama")), "--output", str(tmp_path / name), *bench]) == 0
        speed = json.loads((tmp_path / name / "speed.json").read_text())
    assert main(["compare", str(tmp_path / "nf4"), str(tmp_path / "int8"), "--output", str(tmp_path / "cmp")]) == 0
    merged = json.loads((tmp_path / "cmp" / "results.json").read_text())
    int8 = merged["models"]["int8"]["speed"]
    assert int8["decode_tokens_per_second"] == speed["models"]["quantized"]["rows"][0]["decode_tokens_per_second"]["median"]
    assert merged["models"]["baseline"]["speed"]["batch_size"] == 1 and "speed_left_out" not in merged
    assert "decode tokens/s (batch 1, CPU" in (tmp_path / "cmp" / "results.md").read_text()
    assert main(["bench", str(tmp_path / "int8"), "--output", str(tmp_path / "int8"), *bench[:-4], "--repeats", "2"]) == 0
    assert main(["compare", str(tmp_path / "nf4"), str(tmp_path / "int8"), "--output", str(tmp_path / "cmp")]) == 0
    merged = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert merged["speed_left_out"]["paths"] == [str(tmp_path / "int8")] and merged["models"]["int8"].get("speed") is None
    quiet(eval_recipe(tiny_dirs("llama"), tmp_path / "other", text_file, seqlen=16))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "nf4"), str(tmp_path / "other"), "--output", str(tmp_path / "cmp2")]) == 2
    err = capsys.readouterr().err
    assert "was measured under another protocol" in err and err.count("\n") == 1
    assert not (tmp_path / "cmp2").exists()


def test_eval_command_on_an_export_and_on_a_stock_load(tiny_dirs, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    run_res = quiet(eval_recipe(tiny_dirs("qwen2"), tmp_path / "q", text_file, {"default": "nf4", "rules": [{"match": "*.q_proj", "format": "int8"}]})).results
    args = ["--text", str(text_file), "--range", "0.2", "1.0", "--seqlen", "32", "--quiet"]
    cfg = tmp_path / "ev.yaml"
    cfg.write_text("divergence_tokens: 64\n")
    assert main(["eval", str(tmp_path / "q"), "--baseline", str(tiny_dirs("qwen2")), "--config", str(cfg), "--output", str(tmp_path / "e1"), *args]) == 0
    e1 = json.loads((tmp_path / "e1" / "results.json").read_text())
    # the reloaded export scores exactly what the run measured in memory
    assert e1["models"]["quantized"]["perplexity"] == pytest.approx(run_res["models"]["quantized"]["perplexity"], rel=1e-9)
    assert e1["models"]["quantized"]["kl_divergence"]["mean"] == pytest.approx(run_res["models"]["quantized"]["kl_divergence"]["mean"], rel=1e-6)
    assert e1["models"]["quantized"]["size"]["measured_from"] == "safetensors files"
    with pytest.raises(UserError, match="results.json exists; pass --overwrite"):
        from llmquant.pipeline import evaluate_only
        from llmquant.recipe import EvalSpec

        evaluate_only(str(tmp_path / "q"), EvalSpec(text={"source": str(text_file)}, seqlen=32), tmp_path / "e1")
    assert main(["eval", str(tiny_dirs("qwen2")), "--load-in", "4bit-nf4", "--output", str(tmp_path / "e2"), *args]) == 0
    e2 = json.loads((tmp_path / "e2" / "results.json").read_text())
    assert list(e2["models"]) == ["quantized"] and "kl_divergence" not in e2["models"]["quantized"]
    assert e2["model"]["load_in"] == "4bit-nf4"


@pytest.mark.parametrize("argv,expected", [
    (["eval", "x", "--output", "o", "--seqlen", "4"], "error: evaluation settings: seqlen: Input should be greater than or equal to 8"),
    (["eval", "x", "--output", "o", "--stride", "8"], "error: evaluation settings: stride goes with protocol: sliding"),
    (["eval", "x", "--output", "o", "--text", "nope.txt"], "error: text source 'nope.txt' is not a file, an asset or a dataset"),
    (["eval", "./no/model", "--output", "o"], "error: model './no/model' does not exist as a file or folder"),
])
def test_eval_command_errors(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_offline_tasks_run_through_lm_eval(tiny_dirs):
    from llmquant.evaluate.tasks import run_tasks
    from llmquant.export import load_export
    from transformers import AutoTokenizer

    model = load_export(tiny_dirs("llama"), "cpu")
    tok = AutoTokenizer.from_pretrained(tiny_dirs("llama"))
    res = run_tasks(model, tok, ["botchan_cloze", "botchan_continuation"], limit=3, batch_size=4)
    assert set(res) == {"botchan_cloze", "botchan_continuation"}
    assert 0 <= res["botchan_cloze"]["acc"] <= 1 and res["botchan_cloze"]["samples"] == 3
    assert 0 <= res["botchan_continuation"]["acc_norm"] <= 1 and "acc_stderr" in res["botchan_continuation"]
    with pytest.raises(UserError, match="unknown lm-eval task 'botchan_clozee'; llmquant's offline tasks: botchan_cloze, botchan_continuation"):
        run_tasks(model, tok, ["botchan_clozee"])


def test_results_table_lists_every_metric():
    res = {
        "protocol": {"perplexity": {"name": "sliding", "seqlen": 8, "stride": 4, "windows": 2, "tokens_scored": 10,
                                     "text": {"source": "t", "range": [0, 1], "sha256": "ab" * 32}}},
        "models": {
            "baseline": {"label": "float32", "size": {"bytes": 1000}, "perplexity": 10.0, "tasks": {"t": {"acc": 0.5, "acc_stderr": 0.1}}},
            "quantized": {"label": "nf4", "size": {"bytes": 250}, "perplexity": 11.0, "kl_divergence": {"mean": 0.1, "median": 0.05, "p99": 0.9},
                          "top1_agreement": 0.9, "tasks": {"t": {"acc": 0.4, "acc_stderr": 0.1}}},
        },
        "model": {"source": "m"}, "versions": {"torch": "x"},
    }
    header, rows = results_mod.table_rows(res)
    assert header == ["metric", "baseline (float32)", "quantized (nf4)", "Δ"]
    byname = {r[0]: r for r in rows}
    assert byname["perplexity"][1:] == ["10", "11", "+10.00%"]
    assert byname["size"][3] == "×0.250"
    assert byname["top-1 agreement with baseline"][2] == "90.00%"
    assert byname["t acc"][1:] == ["0.5000 ± 0.1000", "0.4000 ± 0.1000", "-0.1000"]
    assert "sliding windows (stride 4) of 8 tokens" in results_mod.protocol_line(res)


def test_compare_refuses_results_whose_baselines_are_different_models(tiny_dirs, tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    quiet(eval_recipe(tiny_dirs("llama"), tmp_path / "a", text_file))
    quiet(eval_recipe(tiny_dirs("llama"), tmp_path / "b", text_file, {"default": "int8"}))
    quiet(eval_recipe(tiny_dirs("mistral"), tmp_path / "c", text_file))  # same protocol, another model
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "ok")]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c"), "--output", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'c'} has another baseline model than {tmp_path / 'a'}" in err[0], err
    assert not (tmp_path / "cmp").exists()
