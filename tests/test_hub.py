"""Model card, push (against a Hub stand-in on loopback), inspect."""

import io
import json

import pytest
import yaml
from rich.console import Console

from hubserver import FakeHub
from llmquant import card
from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.hub import push
from llmquant.pipeline import run
from llmquant.recipe import Recipe

TOKEN = "hf_testtoken_5f3c9a7e1b2d4c6e8f0a"


def export(tiny_dirs, out, quant=None, arch="llama", **extra):
    r = Recipe.from_dict({"model": {"source": str(tiny_dirs(arch))}, "device": "cpu",
                          "quantization": quant or {"default": "nf4"}, "output": {"dir": str(out)}, **extra})
    return run(r, console=Console(file=io.StringIO()), progress=False)


@pytest.fixture
def hub(monkeypatch):
    with FakeHub(TOKEN) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the stand-in is on loopback
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr("llmquant.hub.time.sleep", lambda s: None)  # no real back-off waits in tests
        yield h


def test_model_card_front_matter_and_numbers(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    export(tiny_dirs, out, {"default": "nf4", "rules": [{"match": "*.q_proj", "format": "int8"}]})
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"llmquant", "bitsandbytes", "4-bit", "8-bit", "mixed-precision"} <= set(front["tags"])
    assert "import llmquant" in text  # a mixed export needs it
    assert "| `model.layers.*.self_attn.q_proj` | 2 | int8(t=6) | rtn |" in text
    meta = json.loads((out / "llmquant.json").read_text())
    assert f"{meta['sizes']['linear_bits_per_weight']:.2f}" in text
    assert "reloaded from disk" in text


def test_card_of_the_demo_asset_names_its_base_model_and_license():
    assert card.base_model_info("asset:smollm2-135m-instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert card.base_model_info("meta-llama/Meta-Llama-3-8B") == ("meta-llama/Meta-Llama-3-8B", None)


def test_push_uploads_the_export_byte_for_byte(tiny_dirs, tmp_path, hub, capsys):
    out = tmp_path / "out"
    export(tiny_dirs, out)
    url = push(out, "alice/tiny-nf4", log=lambda m: None)
    repo = hub.repos["alice/tiny-nf4"]
    files = repo["branches"]["main"]
    local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(files) == set(local)
    for name, data in local.items():
        if name == "README.md":  # the card names the repository it is pushed to
            assert files[name].decode() == card.render(out, "alice/tiny-nf4")
            assert 'from_pretrained("alice/tiny-nf4")' in files[name].decode()
        else:
            assert files[name] == data, name
    assert len(repo["commits"]) == 1 and url.endswith(repo["commits"][0]["oid"])
    assert hub.validated[-1]["library_name"] == "transformers"  # the card's metadata passed the Hub's validation
    assert any(p.startswith("/lfs-upload/") for _, p, _ in hub.log)  # weights went through the large-file protocol
    # the token authenticated every API call, was not sent with the large-file uploads, and appears nowhere else
    api = [h for p, h in hub.headers_seen if not p.startswith("/lfs-")]
    lfs = [h for p, h in hub.headers_seen if p.startswith("/lfs-upload/")]
    assert api and all(h.get("authorization") == f"Bearer {TOKEN}" for h in api)
    assert lfs and all(TOKEN not in json.dumps(h) for h in lfs)
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for data in files.values():
        assert TOKEN.encode() not in data


def test_push_to_a_branch_and_private_repo(tiny_dirs, tmp_path, hub):
    out = tmp_path / "out"
    export(tiny_dirs, out, {"default": "int8"})
    push(out, "alice/t8", private=True, revision="v1", commit_message="first", log=lambda m: None)
    repo = hub.repos["alice/t8"]
    assert repo["private"] and "model.safetensors" in repo["branches"]["v1"]
    assert repo["commits"][0]["summary"] == "first" and repo["commits"][0]["revision"] == "v1"


def test_push_retries_transient_failures(tiny_dirs, tmp_path, hub):
    out = tmp_path / "out"
    export(tiny_dirs, out)
    hub.fail = {"commit": 1, "batch": 1}
    push(out, "alice/retry", log=lambda m: None)
    commits = [s for m, p, s in hub.log if "/commit/" in p]
    assert commits[0] == 503 and commits[-1] == 200
    assert len(hub.repos["alice/retry"]["commits"]) == 1


def test_push_gives_up_after_repeated_failures(tiny_dirs, tmp_path, hub):
    out = tmp_path / "out"
    export(tiny_dirs, out)
    hub.fail = {"commit": 10}
    with pytest.raises(UserError, match="could not upload on http://127.0.0.1:[0-9]+ after 3 attempts"):
        push(out, "alice/down", log=lambda m: None)
    assert hub.repos["alice/down"]["commits"] == []


def test_push_with_a_bad_token_says_so(tiny_dirs, tmp_path, hub, monkeypatch, capsys):
    out = tmp_path / "out"
    export(tiny_dirs, out)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_000")
    assert main(["push", str(out), "--repo", "alice/x"]) == 2
    err = capsys.readouterr().err
    assert "rejected the token (401 Unauthorized)" in err and "hf_wrong_token_000" not in err
    assert err.strip().splitlines()[-1].startswith("error:")


def test_push_refuses_a_broken_export_before_any_request(tiny_dirs, tmp_path, hub):
    out = tmp_path / "out"
    export(tiny_dirs, out)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the weights
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors differs from what llmquant wrote"):
        push(out, "alice/broken", log=lambda m: None)
    assert hub.log == []


def test_run_pushes_when_the_recipe_has_a_hub_section(tiny_dirs, tmp_path, hub):
    out = tmp_path / "out"
    export(tiny_dirs, out, hub={"repo": "alice/from-run"})
    assert "model.safetensors" in hub.repos["alice/from-run"]["branches"]["main"]
    assert "alice/from-run" in (out / "README.md").read_text()


def test_inspect_describes_an_export(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    export(tiny_dirs, out, {"default": {"format": "nf4", "group_size": 32, "double_quant": True}, "rules": [{"match": "*.v_proj", "format": "int8"}]})
    assert main(["inspect", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["quant_method"] == "llmquant" and d["loads_with"] == "transformers after `import llmquant`" and d["problems"] == []
    by = {l["name"]: l for l in d["layers"]}
    up = by["model.layers.0.mlp.up_proj"]
    assert (up["format"], up["group_size"], up["double_quant"], up["shape"]) == ("nf4", 32, True, [256, 128])
    assert by["model.layers.1.self_attn.v_proj"]["format"] == "int8"
    assert by["lm_head"]["format"] == "float32"
    meta = json.loads((out / "llmquant.json").read_text())
    planned = next(l["bytes"] for l in meta["layers"] if l["name"] == "model.layers.0.mlp.up_proj")
    assert abs(planned - up["bytes"]) <= 4  # the plan knows the bytes (but the digits of a float in a JSON header)
