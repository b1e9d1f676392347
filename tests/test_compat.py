"""transformers versions: the tested range is the one pyproject allows, and a transformers whose internals moved
breaks only the llmquant checkpoint format, in one line naming the tested range."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmquant import compat
from llmquant.cli import main

pytestmark = pytest.mark.compat

ROOT = Path(__file__).resolve().parents[1]
MIXED = {"default": {"format": "nf4", "group_size": 32}, "rules": [{"match": "*.self_attn.*", "format": "int8"}]}


@pytest.mark.parametrize("version, inside", [("5.17.0", True), ("5.25.3", True), ("5.21.0.dev0", True),
                                             ("5.16.1", False), ("5.26.0", False), ("6.0.0", False), ("4.57.1", False)])
def test_the_tested_range(version, inside):
    assert compat.tested(version) is inside
    assert (compat.version_note() is None) is compat.tested()  # the installed one: noted only when outside


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="runs from the source tree")
def test_pyproject_allows_exactly_the_tested_range():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"(transformers[^"]*)"', text).group(1) == compat.REQUIREMENT == "transformers>=5.17,<5.26"


def _export(tiny_dirs, tmp_path, quantization) -> Path:
    out = tmp_path / "mixed"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu",
                                  "quantization": quantization, "output": {"dir": str(out)}}))
    assert main(["run", str(recipe), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "llmquant"
    return out


def test_a_moved_internal_breaks_only_the_llmquant_format_in_one_line(tiny_dirs, tmp_path, capsys, monkeypatch):
    import transformers.integrations.bitsandbytes as tbnb

    mixed = _export(tiny_dirs, tmp_path, MIXED)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["--text", str(text), "--seqlen", "16", "--max-tokens", "64", "--quiet"]
    monkeypatch.delattr(tbnb, "Bnb4bitDeserialize")  # as if a release renamed it
    capsys.readouterr()
    assert main(["eval", str(tiny_dirs("llama")), "--output", str(tmp_path / "e1"), *args]) == 0  # a float model
    assert main(["inspect", str(mixed)]) == 0  # described without loading
    capsys.readouterr()
    assert main(["eval", str(mixed), "--output", str(tmp_path / "e2"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    drift = compat.drift_message("transformers.integrations.bitsandbytes.Bnb4bitDeserialize")
    assert err[-1] == f"error: could not load model {mixed}: {drift}", err
    assert f"tested with transformers {compat.OLDEST} to {compat.NEWEST}" in err[-1]


def test_import_llmquant_survives_a_moved_registration_api():
    code = ("import transformers.quantizers.auto as auto\n"
            "del auto.register_quantizer\n"
            "import llmquant\n"
            "print(llmquant.REGISTRATION_ERROR)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == compat.drift_message("transformers.quantizers.auto.register_quantizer")
