from importlib import resources

import pytest
import yaml

from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.recipes import RECIPES
from llmquant.recipe import Recipe
from llmquant.schemes import FourBit, Int8, Keep

GOOD = """
model: {source: org/model, dtype: bfloat16}
quantization:
  default: nf4
  rules:
    - {match: "*.self_attn.*", format: int8, threshold: 0}
    - {match: ["re:.*down_proj", "*.up_proj"], format: fp4, group_size: 128, double_quant: true, method: rtn}
    - {match: "*.gate_proj", format: fp16}
  ignore: [lm_head]
output: {dir: out/x, max_shard_size: 2GB}
"""


def test_good_recipe_parses_to_typed_objects():
    r = Recipe.from_yaml(GOOD)
    q = r.quantization
    assert q.default == FourBit(format="nf4", group_size=64, double_quant=False)
    assert q.rules[0].scheme == Int8(threshold=0.0)
    assert q.rules[1].match == ["re:.*down_proj", "*.up_proj"] and q.rules[1].scheme.double_quant
    assert q.rules[2].scheme == Keep(format="fp16")
    assert r.model.trust_remote_code is False  # off unless asked


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_example_recipe_init_writes_is_valid_and_round_trips(name, tmp_path, capsys):
    assert main(["init", name]) == 0
    r = Recipe.from_yaml(capsys.readouterr().out, f"{name}.yaml")
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r
    assert yaml.safe_load(again.to_yaml()) == yaml.safe_load(r.to_yaml())


def test_init_lists_every_shipped_recipe_and_never_overwrites(tmp_path, capsys):
    shipped = {p.stem for p in resources.files("llmquant.recipes").iterdir() if p.name.endswith(".yaml")}
    assert shipped == set(RECIPES)
    target = tmp_path / "r.yaml"
    assert main(["init", "nf4", "-o", str(target)]) == 0
    assert Recipe.load(target).quantization.default.double_quant
    target.write_text("mine")
    assert main(["init", "demo", "-o", str(target)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {target} already exists; give another --output or remove it"
    assert target.read_text() == "mine"
    assert main(["init", "nope"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown example recipe 'nope'; choose one of: demo, auto, nf4, mixed, gptq"


def test_round_trip_keeps_rules_flat_and_readable():
    r = Recipe.from_yaml(GOOD)
    dumped = yaml.safe_load(r.to_yaml())
    assert dumped["quantization"]["rules"][0] == {"match": "*.self_attn.*", "format": "int8", "threshold": 0.0}
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_overrides_revalidate():
    r = Recipe.from_yaml(GOOD).with_overrides({"output.dir": "elsewhere", "model.source": "a/b", "output.overwrite": True})
    assert (r.output.dir, r.model.source, r.output.overwrite) == ("elsewhere", "a/b", True)
    with pytest.raises(UserError, match="device"):
        Recipe.from_yaml(GOOD).with_overrides({"device": "tpu"})


BASE = {"model": {"source": "org/model"}, "output": {"dir": "out/x"}}
BAD = [
    ("unknown-top-key", {**BASE, "quantisation": {}}, "unknown key 'quantisation'; allowed keys: version, model, device, quantization, calibration, eval, output, hub"),
    ("unknown-model-key", {**BASE, "model": {"source": "a/b", "revison": "main"}}, "model: unknown key 'revison'"),
    ("missing-model", {"output": {"dir": "x"}}, "model: missing required key"),
    ("missing-output", {"model": {"source": "a/b"}}, "output: missing required key"),
    ("empty-source", {**BASE, "model": {"source": " "}}, "model.source: must name a Hub id"),
    ("bad-dtype", {**BASE, "model": {"source": "a/b", "dtype": "fp8"}}, "model.dtype: Input should be 'auto', 'float32', 'float16' or 'bfloat16'"),
    ("bad-device", {**BASE, "device": "gpu0"}, "device: 'gpu0' is not a device; allowed: auto, cpu, cuda, cuda:N"),
    ("bad-group-size", {**BASE, "quantization": {"default": {"format": "nf4", "group_size": 100}}},
     "quantization.default.group_size: 100 is not a bitsandbytes block size; allowed: 32, 64, 128, 256, 512, 1024, 2048, 4096"),
    ("unknown-format", {**BASE, "quantization": {"default": "nf5"}}, "unknown format 'nf5'; allowed: int8, nf4, fp4, fp16, bf16, fp32"),
    ("default-missing-format", {**BASE, "quantization": {"default": {"group_size": 64}}}, "missing key 'format'"),
    ("negative-threshold", {**BASE, "quantization": {"default": {"format": "int8", "threshold": -1}}},
     "quantization.default.threshold: Input should be greater than or equal to 0"),
    ("int8-with-group-size", {**BASE, "quantization": {"default": {"format": "int8", "group_size": 64}}},
     "quantization.default: unknown key 'group_size'; allowed keys: format, threshold"),
    ("rule-unknown-key", {**BASE, "quantization": {"rules": [{"match": "*", "format": "nf4", "groupsize": 32}]}},
     "quantization.rules[0]: unknown key 'groupsize' for format nf4; allowed keys: match, method, format, group_size, double_quant"),
    ("rule-no-match", {**BASE, "quantization": {"rules": [{"format": "nf4"}]}}, "quantization.rules[0]: missing key 'match'"),
    ("rule-no-format", {**BASE, "quantization": {"rules": [{"match": "*"}]}}, "quantization.rules[0]: missing key 'format'"),
    ("rule-bad-regex", {**BASE, "quantization": {"rules": [{"match": "re:([", "format": "int8"}]}}, "quantization.rules[0].match: bad regular expression 're:(['"),
    ("rule-empty-match", {**BASE, "quantization": {"rules": [{"match": [], "format": "int8"}]}}, "quantization.rules[0].match: needs at least one pattern"),
    ("rule-not-mapping", {**BASE, "quantization": {"rules": ["nf4"]}}, "quantization.rules[0]: a rule is a mapping"),
    ("unknown-method", {**BASE, "quantization": {"method": "magic"}}, "quantization.method: unknown method 'magic'; allowed: rtn"),
    ("rule-unknown-method", {**BASE, "quantization": {"rules": [{"match": "*", "format": "nf4", "method": "gptqq"}]}}, "unknown method 'gptqq'"),
    ("bad-shard-size", {**BASE, "output": {"dir": "x", "max_shard_size": "lots"}}, "output.max_shard_size: 'lots' is not a size"),
    ("bad-overwrite", {**BASE, "output": {"dir": "x", "overwrite": "sometimes"}}, "output.overwrite: Input should be a valid boolean"),
    ("wrong-version", {**BASE, "version": 2}, "version: Input should be 1"),
    ("quantization-not-mapping", {**BASE, "quantization": ["nf4"]}, "quantization: expected a mapping, got list"),
]


@pytest.mark.parametrize("data,expected", [(d, e) for _, d, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_recipe_gives_one_line_error(data, expected):
    with pytest.raises(UserError) as err:
        Recipe.from_dict(data, "r.yaml")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("r.yaml: ")
    assert expected in msg, msg


@pytest.mark.parametrize(
    "text,expected",
    [
        ("model: {source: a/b}\nmodel: {source: c/d}\noutput: {dir: x}\n", "line 2, column 1: invalid YAML: key 'model' appears twice"),
        ("model: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "a recipe is a YAML mapping"),
        ("model: !!python/object/apply:os.system [echo hi]\n", "invalid YAML"),  # safe loading only
    ],
    ids=["duplicate-key", "syntax", "not-a-mapping", "unsafe-tag"],
)
def test_bad_yaml(text, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        Recipe.from_yaml(text, "r.yaml")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Recipe.load(tmp_path / "nope.yaml")


