import pytest
import torch

from conftest import ARCHS, build_tiny
from llmquant.errors import UserError
from llmquant.plan import build_plan, matches
from llmquant.recipe import Quantization


def q(**kw) -> Quantization:
    return Quantization.model_validate(kw)


@pytest.mark.parametrize(
    "pattern,name,hit",
    [
        ("*.mlp.*", "model.layers.0.mlp.up_proj", True),
        ("*.mlp.*", "model.layers.0.self_attn.q_proj", False),
        ("lm_head", "lm_head", True),
        ("re:.*layers\\.1\\..*", "model.layers.1.mlp.up_proj", True),
        ("re:.*layers\\.1\\..*", "model.layers.11.mlp.up_proj", False),
        ("re:mlp", "model.layers.0.mlp.up_proj", False),  # regexes match the whole name
    ],
)
def test_patterns(pattern, name, hit):
    assert matches(pattern, name) is hit


def test_first_matching_rule_wins_and_head_is_ignored_by_default():
    model = build_tiny("llama")
    plan = build_plan(model, q(default="nf4", rules=[
        {"match": "*.layers.0.*", "format": "fp16"},
        {"match": "*.self_attn.*", "format": "int8"},
    ]), torch.float32)
    by = {e.name: e for e in plan.entries}
    assert by["model.layers.0.self_attn.q_proj"].label() == "fp16"
    assert by["model.layers.1.self_attn.q_proj"].label() == "int8(t=6)"
    assert by["model.layers.1.mlp.up_proj"].label() == "nf4/g64" and by["model.layers.1.mlp.up_proj"].source == "default"
    assert by["lm_head"].scheme is None and by["lm_head"].source == "ignore"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_plans(arch):
    model = build_tiny(arch)
    plan = build_plan(model, q(default="nf4"), torch.float32)
    assert plan.quantized_entries, arch
    quantized = [e for e in plan.entries if e.scheme is not None]
    assert all(e.quantized for e in quantized)
    # 4 bits per weight + one fp32 scale per 64 weights (+ a codebook and a small header per layer)
    assert 4.5 <= plan.linear_bits_per_weight() < 4.8
    if arch == "gpt2":
        assert {e.layer for e in quantized} == {"Conv1D"}


def test_checkpoint_format_choice():
    model = build_tiny("llama")
    f32 = torch.float32
    cfg = lambda **kw: build_plan(model, q(**kw), f32).quantization_config()  # noqa: E731
    assert cfg(default="int8")["quant_method"] == "bitsandbytes"
    c = cfg(default={"format": "nf4", "double_quant": True})
    assert (c["quant_method"], c["bnb_4bit_use_double_quant"], c["llm_int8_skip_modules"]) == ("bitsandbytes", True, ["lm_head"])
    c = cfg(default="nf4", rules=[{"match": "*.q_proj", "format": "fp32"}])  # kept layers are stock skip modules
    assert c["quant_method"] == "bitsandbytes" and "model.layers.0.self_attn.q_proj" in c["llm_int8_skip_modules"]
    # ...but stock transformers would load an fp16 layer as fp16 inside an fp32 model
    assert cfg(default="nf4", rules=[{"match": "*.q_proj", "format": "fp16"}])["quant_method"] == "llmquant"
    # any 4-bit mix is stock: bitsandbytes reads type, block size and double quant from each tensor's quant_state
    assert cfg(default={"format": "nf4", "group_size": 32})["quant_method"] == "bitsandbytes"
    c = cfg(default={"format": "fp4", "double_quant": True}, rules=[{"match": "*.q_proj", "format": "nf4", "group_size": 128}])
    assert (c["quant_method"], c["bnb_4bit_quant_type"], c["bnb_4bit_use_double_quant"]) == ("bitsandbytes", "fp4", True)  # most weights
    assert cfg(default="int8", rules=[{"match": "*.q_proj", "format": "int8", "threshold": 0.0}])["quant_method"] == "llmquant"
    assert cfg(default="nf4", rules=[{"match": "*.q_proj", "format": "int8"}])["quant_method"] == "llmquant"
    assert cfg(default="fp16") is None  # nothing quantized


BAD_PLANS = [
    ("rule-matches-nothing", dict(rules=[{"match": "*.attention.*", "format": "int8"}]),
     "quantization.rules[0] (match *.attention.*): matches no Linear layer of this model (names look like model.layers.0.self_attn.q_proj"),
    ("rule-matches-embedding", dict(rules=[{"match": "model.embed_tokens", "format": "int8"}]),
     "matches no Linear layer: it matches model.embed_tokens, a Embedding, which cannot be quantized"),
    ("rule-matches-norm", dict(rules=[{"match": "*norm*", "format": "nf4"}]), "a LlamaRMSNorm, which cannot be quantized"),
    ("ignore-matches-nothing", dict(ignore=["decoder"]), "quantization.ignore: 'decoder' matches no Linear layer"),
    ("rule-only-ignored", dict(ignore=["*.q_proj"], rules=[{"match": "*.q_proj", "format": "int8"}]), "matches only ignored layers"),
    ("group-does-not-fit", dict(default={"format": "nf4", "group_size": 256}, ignore=[]),
     "model.layers.0.self_attn.q_proj (default): group_size 256 does not divide its 128 inputs; block sizes that fit it: 32, 64, 128"),
    ("keep-wider-than-model", dict(default={"format": "fp32"}), "format fp32 is wider than the model's dtype bf16"),
]


@pytest.mark.parametrize("kw,expected", [(k, e) for _, k, e in BAD_PLANS], ids=[i for i, _, _ in BAD_PLANS])
def test_plan_errors(kw, expected):
    dtype = torch.bfloat16 if "wider" in expected else torch.float32
    model = build_tiny("llama", dtype)
    with pytest.raises(UserError) as err:
        build_plan(model, q(**kw), dtype)
    assert "\n" not in str(err.value)
    assert expected in str(err.value), str(err.value)


def test_tied_head_cannot_be_quantized():
    model = build_tiny("qwen2")  # tie_word_embeddings=True
    with pytest.raises(UserError, match="lm_head shares its weight with model.embed_tokens"):
        build_plan(model, q(ignore=[]), torch.float32)


def test_odd_output_width_is_refused_for_4bit_on_cpu_only(tiny_dirs, tmp_path, monkeypatch, capsys):
    from torch import nn

    from llmquant import pipeline
    from llmquant.cli import main
    from llmquant.plan import row_tile

    model = build_tiny("llama")
    model.model.layers[0].mlp.down_proj = nn.Linear(256, 120, bias=False)  # 120 rows: not a multiple of 32
    with pytest.raises(UserError, match="needs out_features divisible by 32 on CPU"):
        build_plan(model, q(default="nf4"), torch.float32, row_tile(torch.device("cpu")))
    build_plan(model, q(default="nf4", rules=[{"match": "*.down_proj", "format": "int8"}]), torch.float32)
    build_plan(model, q(default="nf4"), torch.float32, row_tile(torch.device("cuda")))  # bitsandbytes' CUDA kernels
    # the same through a run (an MLP 120 wide): refused on CPU, planned for a GPU
    from conftest import tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 120
    build_tiny("llama", config=config).save_pretrained(tmp_path / "odd")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: {tmp_path / 'odd'}}}\ndevice: DEVICE\noutput: {{dir: {tmp_path / 'out'}}}\n"
                      "quantization: {default: {format: nf4, group_size: 32}, rules: [{match: '*.down_proj', format: int8}]}\n")
    text = recipe.read_text()
    recipe.write_text(text.replace("DEVICE", "cpu"))
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "needs out_features divisible by 32 on CPU" in capsys.readouterr().err
    recipe.write_text(text.replace("DEVICE", "cuda"))
    monkeypatch.setattr(pipeline, "pick_device", lambda name: torch.device("cuda"))
    assert main(["run", str(recipe), "--dry-run"]) == 0
    assert "model.layers.0.mlp.gate_proj" in capsys.readouterr().out
