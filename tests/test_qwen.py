"""Integration tests on the real Qwen2.5-Coder-0.5B-Instruct (offline asset: Qwen2 architecture, untied head, biases on
q/k/v) and the Wikipedia text, on small token counts."""

import io
import json
import re

import pytest
from rich.console import Console

from llmquant import assets, pipeline
from llmquant.pipeline import run
from llmquant.recipe import Recipe

pytestmark = pytest.mark.slow


def recipe(model_dir, out):
    text = {"source": "asset:enwiki"}
    return Recipe.from_dict({
        "model": {"source": str(model_dir)}, "device": "cpu",
        # GPTQ on the last decoder layer (calibrated on what the 23 quantized layers before it give it), the others
        # rounded: attention INT8, MLP NF4 (a mix in llmquant's format)
        "quantization": {"default": {"format": "nf4", "group_size": 64}, "method": "rtn",
                         "rules": [{"match": "model.layers.23.*", "method": "gptq", "format": "nf4", "group_size": 64},
                                   {"match": "*.self_attn.*", "format": "int8", "threshold": 6.0}]},
        "calibration": {"text": {**text, "range": [0.0, 0.6]}, "nsamples": 2, "seqlen": 64},
        "eval": {"text": {**text, "range": [0.8, 1.0]}, "seqlen": 128, "max_tokens": 256, "divergence_tokens": 128},
        "output": {"dir": str(out)},
    })


def test_streamed_and_in_memory_runs_write_the_same_bytes_and_measure_the_same(qwen_dir, tmp_path, monkeypatch):
    streamed = run(recipe(qwen_dir, tmp_path / "streamed"), console=Console(file=io.StringIO()), progress=False)
    assert streamed.streamed and streamed.check.passed
    monkeypatch.setattr(pipeline, "_stream_reader", lambda *a: None)
    whole = run(recipe(qwen_dir, tmp_path / "whole"), console=Console(file=io.StringIO()), progress=False)
    assert not whole.streamed and whole.check.passed
    files = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    for f in files:
        assert (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["models"] for d in ("streamed", "whole"))
    assert a["baseline"]["perplexity"] == pytest.approx(b["baseline"]["perplexity"], rel=1e-4)
    assert a["quantized"]["perplexity"] == pytest.approx(b["quantized"]["perplexity"], rel=1e-3)
    assert 1 < b["baseline"]["perplexity"] < 100  # a real model on real text
    cfg = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["quant_method"] == "llmquant"


def test_the_wikipedia_text_is_plain_articles():
    text = assets.fetch("enwiki", quiet=True).read_text(encoding="utf-8")
    assert text.startswith(" = Anarchism = \n\nAnarchism is a political philosophy")
    titles = re.findall(r"^ = [^=\n][^\n]* = $", text, flags=re.M)
    assert len(titles) == 106 and " = = History = = " in text  # the articles and their sections
    paragraphs = text.split("\n\n")
    markup = ("{{", "}}", "[[", "]]", "<ref", "'''", "&nbsp;", "{|", "[http")
    marked = [p for p in paragraphs if any(m in p for m in markup)]
    # (the article on ASCII quotes the printable characters, braces and brackets included, inside a template)
    assert len(paragraphs) > 3000 and len(marked) <= 1, marked


def test_a_real_model_with_sliding_window_layers_streams_as_it_runs_whole(qwen_dir, tmp_path):
    """Qwen2.5-Coder's weights with sliding-window attention (64 tokens) on its last 12 layers, full attention on the
    first 12, evaluated on windows of 128: the layer-by-layer evaluation (each layer with its own mask) measures what
    the whole model measures, and not what full attention everywhere gives."""
    import torch

    from llmquant.data import load_text
    from llmquant.evaluate import Evaluation
    from llmquant.models import load_config, load_model, load_tokenizer, resolve_source
    from llmquant.recipe import EvalSpec
    from llmquant.stream import CheckpointReader, skeleton

    folder = tmp_path / "sliding"
    folder.mkdir()
    for p in qwen_dir.iterdir():
        if p.name != "config.json":
            (folder / p.name).symlink_to(p)
    cfg = json.loads((qwen_dir / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=64, max_window_layers=12)
    cfg.pop("layer_types", None)  # recomputed from the three above
    (folder / "config.json").write_text(json.dumps(cfg))

    spec = EvalSpec.model_validate({"text": {"source": "asset:enwiki", "range": [0.8, 1.0]}, "seqlen": 128,
                                    "max_tokens": 512, "divergence": False})
    src = resolve_source(str(folder))
    evaluation = Evaluation(spec, load_tokenizer(src), False, lambda m: None, load_text(spec.text, "eval"))
    frame = skeleton(load_config(src), torch.float32)
    assert frame.config.layer_types[0] == "full_attention" and frame.config.layer_types[-1] == "sliding_attention"
    reader = CheckpointReader(folder)
    try:
        streamed = pipeline._evaluate_streamed(evaluation, frame, reader, torch.device("cpu"), "float32", {}, None, False)
    finally:
        reader.close()
    whole = evaluation.run(load_model(src, "float32", "cpu")[0], "whole", {}, reference=True)
    plain = evaluation.run(load_model(resolve_source(str(qwen_dir)), "float32", "cpu")[0], "plain", {}, reference=True)
    assert streamed.perplexity.perplexity == pytest.approx(whole.perplexity.perplexity, rel=1e-3)  # within 0.1%
    assert abs(whole.perplexity.perplexity / plain.perplexity.perplexity - 1) > 1e-3  # the windows matter here
