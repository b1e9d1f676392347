"""Failure modes: bad input, interrupted and killed runs, damaged checkpoints, unsafe files."""

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from llmquant.checkpoint import describe
from llmquant.cli import main
from llmquant.pipeline import run
from llmquant.recipe import Recipe


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def export(model_dir, out, quant=None, **output):
    r = Recipe.from_dict({"model": {"source": str(model_dir)}, "device": "cpu", "quantization": quant or {"default": "nf4"},
                          "output": {"dir": str(out), **output}})
    return run(r, console=Console(file=io.StringIO()), progress=False)


# ---- bad input: one line, exit status 2, nothing on disk touched ------------------------------

M = "{model}"  # replaced by a tiny Llama folder
BAD_RECIPES = [
    ("unknown-key", "model: {source: M}\noutput: {dir: out}\nquantisation: {}\n", "unknown key 'quantisation'"),
    ("rule-unknown-key", "model: {source: M}\noutput: {dir: out}\nquantization: {rules: [{match: '*', format: nf4, groupsize: 32}]}\n", "unknown key 'groupsize' for format nf4"),
    ("bad-group-size", "model: {source: M}\noutput: {dir: out}\nquantization: {default: {format: nf4, group_size: 100}}\n", "100 is not a bitsandbytes block size"),
    ("unknown-format", "model: {source: M}\noutput: {dir: out}\nquantization: {default: nf5}\n", "unknown format 'nf5'"),
    ("negative-threshold", "model: {source: M}\noutput: {dir: out}\nquantization: {default: {format: int8, threshold: -1}}\n", "threshold: Input should be greater than or equal to 0"),
    ("duplicate-key", "model: {source: M}\noutput: {dir: out}\noutput: {dir: other}\n", "key 'output' appears twice"),
    ("yaml-syntax", "model: {source: M\noutput: {dir: out}\n", "invalid YAML"),
    ("bad-regex", "model: {source: M}\noutput: {dir: out}\nquantization: {rules: [{match: 're:(', format: int8}]}\n", "bad regular expression"),
    ("calibrated-without-data", "model: {source: M}\noutput: {dir: out}\nquantization: {method: gptq}\n", "method gptq needs calibration data"),
    ("unknown-method", "model: {source: M}\noutput: {dir: out}\nquantization: {method: magic}\n", "unknown method 'magic'; allowed: rtn, scale_search, gptq, awq, awq+gptq"),
    ("rule-matches-nothing", "model: {source: M}\noutput: {dir: out}\nquantization: {rules: [{match: '*.attention.*', format: int8}]}\n", "matches no Linear layer of this model"),
    ("rule-matches-embedding", "model: {source: M}\noutput: {dir: out}\nquantization: {rules: [{match: model.embed_tokens, format: int8}]}\n", "a Embedding, which cannot be quantized"),
    ("group-does-not-fit", "model: {source: M}\noutput: {dir: out}\nquantization: {default: {format: nf4, group_size: 256}}\n", "group_size 256 does not divide its 128 inputs"),
    ("keep-wider", "model: {source: M, dtype: bfloat16}\noutput: {dir: out}\nquantization: {default: fp32}\n", "format fp32 is wider than the model's dtype bf16"),
    ("model-missing", "model: {source: ./no/such/model}\noutput: {dir: out}\n", "does not exist as a file or folder"),
    ("model-not-gguf", "model: {source: notes.txt}\noutput: {dir: out}\n", "is a file but not a .gguf file"),
    ("output-is-file", "model: {source: M}\noutput: {dir: notes.txt}\n", "is a file, not a folder"),
    ("output-not-empty", "model: {source: M}\noutput: {dir: mine}\n", "is not empty; pass --overwrite"),
    ("overwrite-foreign", "model: {source: M}\noutput: {dir: mine, overwrite: true}\n", "was not written by llmquant"),
    ("eval-text-missing", "model: {source: M}\noutput: {dir: out}\neval: {text: {source: missing.txt}}\n", "is not a file, an asset or a dataset"),
    ("eval-unknown-task", "model: {source: M}\noutput: {dir: out}\neval: {text: {source: notes.txt}, tasks: [botchan_clozee]}\n", "unknown lm-eval task 'botchan_clozee'"),
    ("tasks-memory", "model: {source: M}\noutput: {dir: out}\neval: {text: {source: notes.txt}, tasks_max_memory: lots}\n", "'lots' is not a size"),
    ("calib-range", "model: {source: M}\noutput: {dir: out}\nquantization: {method: gptq}\ncalibration: {text: {source: notes.txt, range: [0.7, 0.2]}}\n", "not a range of fractions"),
    ("stride-without-sliding", "model: {source: M}\noutput: {dir: out}\neval: {text: {source: notes.txt}, stride: 8}\n", "stride goes with protocol: sliding"),
    ("hub-repo", "model: {source: M}\noutput: {dir: out}\nhub: {repo: no-slash}\n", "'no-slash' is not a Hub repository id"),
    ("bad-device", "model: {source: M}\ndevice: gpu\noutput: {dir: out}\n", "'gpu' is not a device"),
    ("pickle-weights", "model: {source: PICKLE}\noutput: {dir: out}\n", "has only pickle weights (.bin)"),
    ("recipe-not-utf8", b"model: {source: M}\noutput: {dir: out}\n# caf\xe9 latin-1\n", "is not UTF-8 text (byte "),
    ("output-unwritable", "model: {source: M}\noutput: {dir: /proc/llmquant-test/out}\n", "cannot write the output under '/proc/llmquant-test'"),
    ("model-truncated", "model: {source: TRUNCATED}\noutput: {dir: out}\n", "model.safetensors is damaged: Error while deserializing header"),
    ("no-tokenizer-to-calibrate", "model: {source: NOTOK}\noutput: {dir: out}\nquantization: {method: gptq}\ncalibration: {text: {source: notes.txt}}\n", "has no tokenizer files"),
    ("no-tokenizer-to-evaluate", "model: {source: NOTOK}\noutput: {dir: out}\neval: {text: {source: notes.txt}}\n", "evaluation needs one"),
]
BAD_ARGS = [
    ("run-no-config", ["run"], "the following arguments are required: config"),
    ("unknown-option", ["run", "r.yaml", "--fast"], "unrecognized arguments: --fast"),
    ("eval-seqlen", ["eval", "M", "--output", "e", "--seqlen", "2"], "seqlen: Input should be greater than or equal to 8"),
    ("push-no-repo", ["push", "out"], "the following arguments are required: --repo"),
    ("compare-nothing", ["compare", "--output", "c"], "the following arguments are required: RESULTS"),
    ("inspect-not-folder", ["inspect", "notes.txt"], "is not a folder"),
]


@pytest.fixture
def workdir(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("some notes that are not a model " * 50)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    truncated = tmp_path / "truncated"  # a download that stopped half-way
    shutil.copytree(tiny_dirs("llama"), truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    notok = tmp_path / "notok"  # weights and config, no tokenizer files
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dirs("llama") / f, notok / f)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_dirs("llama") / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return tmp_path


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD_RECIPES], ids=[i for i, _, _ in BAD_RECIPES])
def test_bad_recipes(workdir, tiny_dirs, capsys, text, expected):
    recipe = workdir / "r.yaml"
    if isinstance(text, bytes):
        recipe.write_bytes(text.replace(b"source: M", f"source: {tiny_dirs('llama')}".encode()))
    else:
        names = {"PICKLE": "pickled", "TRUNCATED": "truncated", "NOTOK": "notok"}
        for k, v in names.items():
            text = text.replace(k, str(workdir / v))
        recipe.write_text(text.replace("source: M", f"source: {tiny_dirs('llama')}"))
    before = snapshot(workdir)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, err
    assert snapshot(workdir) == before


@pytest.mark.parametrize("argv,expected", [(a, e) for _, a, e in BAD_ARGS], ids=[i for i, _, _ in BAD_ARGS])
def test_bad_command_lines(workdir, tiny_dirs, capsys, argv, expected):
    argv = [str(tiny_dirs("llama")) if a == "M" else a for a in argv]
    before = snapshot(workdir)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert snapshot(workdir) == before


def test_disk_full_while_writing(workdir, tiny_dirs, capsys, monkeypatch):
    import errno

    from llmquant.stream import WorkFolder

    real = WorkFolder.link_export

    def full(*args):
        real(*args)  # some files land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(WorkFolder, "link_export", full)
    recipe = workdir / "r.yaml"
    recipe.write_text(f"model: {{source: {tiny_dirs('llama')}}}\ndevice: cpu\noutput: {{dir: out}}\n")
    before = snapshot(workdir)
    assert main(["run", str(recipe), "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: writing the export beside 'out' failed: No space left on device; nothing was written"), last
    after = snapshot(workdir)
    work = {k for k in after if k.startswith(".out.llmquant-partial-")}  # what a rerun resumes from, once there is space
    assert {k: v for k, v in after.items() if k not in work} == before  # the partial export is gone
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    assert main(["run", str(recipe), "--quiet"]) == 0
    assert json.loads((workdir / "out" / "llmquant.json").read_text())["loading"]["resumed_from_layer"] == 2
    assert not [p for p in workdir.iterdir() if p.name.startswith(".out.")]


# ---- interrupted and killed runs ----------------------------------------------------------


# Runs `llmquant run` and stops itself with a real signal at a chosen point of putting its export in place.
_STOPPED_AT = """
import os, signal, sys
import llmquant.export as ex
point, sig = sys.argv[1], getattr(signal, sys.argv[2])
die = lambda: os.kill(os.getpid(), sig)
real_commit, real_exchange, real_rename = ex._commit, ex._exchange, os.rename
if point == "commit":  # the new export written and checked beside the old one
    def _commit(*a, **k):
        die()
        return real_commit(*a, **k)
    ex._commit = _commit
elif point == "exchanged":  # the two folders just swapped
    def _exchange(a, b):
        assert real_exchange(a, b)
        die()
        return True
    ex._exchange = _exchange
elif point == "aside":  # a system without folder exchange: the old export just moved aside
    ex._exchange = lambda a, b: False
    def rename(src, dst):
        real_rename(src, dst)
        if ex._OLD_TAG in os.fspath(dst):
            die()
    os.rename = rename
from llmquant.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_killed_or_interrupted_runs_never_leave_a_partial_export(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    export(tiny_dirs("llama"), out, {"default": "int8"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: {tiny_dirs('llama')}}}\ndevice: cpu\nquantization: {{default: nf4}}\noutput: {{dir: {out}}}\n")
    run = ["run", str(recipe), "--quiet"]

    def stopped(point, sig, *extra):
        return subprocess.run([sys.executable, "-c", _STOPPED_AT, point, sig, *run, *extra], capture_output=True, text=True)

    def export_is(fmt):
        assert describe(out).problems == []  # whole and unchanged
        qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qcfg[{"int8": "load_in_8bit", "nf4": "load_in_4bit"}[fmt]], qcfg

    def visible():
        return sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))

    p = stopped("commit", "SIGKILL", "--overwrite")
    assert p.returncode == -signal.SIGKILL and visible() == ["out", "r.yaml"]
    export_is("int8")  # the old one; the new one, written and checked, is a hidden leftover
    assert [q for q in tmp_path.iterdir() if ".llmquant-tmp-" in q.name]
    p = stopped("commit", "SIGINT", "--overwrite")
    assert p.returncode == 130 and "interrupted: nothing was written" in p.stderr, p.stderr
    export_is("int8")
    p = stopped("aside", "SIGINT", "--overwrite")  # Ctrl-C between the two moves: the old one goes back at once
    assert p.returncode == 130 and visible() == ["out", "r.yaml"]
    export_is("int8")
    p = stopped("aside", "SIGKILL", "--overwrite")  # killed between them: nothing at out until the next command ...
    assert p.returncode == -signal.SIGKILL and visible() == ["r.yaml"]
    p = subprocess.run([sys.executable, "-m", "llmquant", *run], capture_output=True, text=True)
    assert p.returncode == 2 and "is not empty; pass --overwrite" in p.stderr  # ... which puts the old one back first
    export_is("int8")
    p = stopped("exchanged", "SIGKILL", "--overwrite")  # killed right after the swap: the new export, whole
    assert p.returncode == -signal.SIGKILL and visible() == ["out", "r.yaml"]
    export_is("nf4")
    # a run that completes replaces the export and removes everything killed runs left
    export(tiny_dirs("llama"), out, {"default": "int8"}, overwrite=True)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out", "r.yaml"]
    export_is("int8")


def test_a_second_run_into_an_output_being_written_is_refused(tiny_dirs, tmp_path):
    from llmquant.errors import UserError
    from llmquant.export import output_lock

    out = tmp_path / "out"
    with output_lock(out):  # as a running llmquant holds it (a lock of its own open file, as another process's)
        with pytest.raises(UserError, match=rf"'{out}' is being written by another llmquant run \(process {os.getpid()}\); wait"):
            export(tiny_dirs("llama"), out)
        assert [p.name for p in tmp_path.iterdir()] == [".out.llmquant-lock"]  # nothing of the refused run
    assert not list(tmp_path.iterdir())  # given back, the file removed
    (tmp_path / ".out.llmquant-lock").write_text("4242")  # left by a killed run: nobody holds it
    export(tiny_dirs("llama"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- damaged checkpoints ------------------------------------------------------------------


def _damage(folder: Path, how: str) -> None:
    w = folder / "model.safetensors"
    if how == "flipped-byte":
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0x55
        w.write_bytes(bytes(data))
    elif how == "truncated":
        w.write_bytes(w.read_bytes()[:-1000])
    elif how == "header-lies":
        data = w.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        header["model.norm.weight"]["shape"] = [256]
        h = json.dumps(header).encode()
        w.write_bytes(struct.pack("<Q", len(h)) + h + data[8 + n :])
    elif how in ("config-layers", "config-width"):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update({"num_hidden_layers": 3} if how == "config-layers" else {"intermediate_size": 512})
        (folder / "config.json").write_text(json.dumps(cfg))
    elif how == "missing-shard":
        sorted(folder.glob("model-*.safetensors"))[1].unlink()
    elif how == "no-config":
        (folder / "config.json").unlink()


DAMAGE = [
    ("flipped-byte", "model.safetensors differs from what llmquant wrote"),
    ("truncated", "model.safetensors is damaged: Error while deserializing header"),
    ("header-lies", "model.safetensors is damaged: Error while deserializing header"),
    ("config-layers", "config.json describes tensors the weights do not have: model.layers.2."),
    ("config-width", "config.json describes"),
    ("missing-shard", "listed in model.safetensors.index.json is missing"),
    ("no-config", "no config.json"),
]


@pytest.mark.parametrize("how,expected", DAMAGE, ids=[d for d, _ in DAMAGE])
def test_damaged_checkpoints_are_reported_in_one_line(tiny_dirs, tmp_path, capsys, how, expected):
    out = tmp_path / "out"
    export(tiny_dirs("llama"), out, max_shard_size="300KB" if how == "missing-shard" else "5GB")
    _damage(out, how)
    code = main(["inspect", str(out)])
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert code in (1, 2) and expected in text and "Traceback" not in text, text
    # loading it for evaluation stops with the same kind of one-line message
    code = main(["eval", str(out), "--text", str(Path(__file__)), "--seqlen", "16", "--output", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and not (tmp_path / "e").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_is_refused_before_any_weight_is_read(tmp_path, capsys, monkeypatch, family):
    """transformers 5 fuses each layer's experts into 3-D tensors that no bitsandbytes layer holds: one line, exit 2."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from conftest import tiny_tokenizer

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    cfg = (tf.MixtralConfig(intermediate_size=128, num_local_experts=4, **common) if family == "mixtral" else
           tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, **common))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "moe")
    tiny_tokenizer().save_pretrained(tmp_path / "moe")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("model: {source: moe}\ndevice: cpu\noutput: {dir: out}\n")
    before = snapshot(tmp_path)
    for argv in (["run", "r.yaml"], ["run", "--dry-run", "r.yaml"]):
        assert main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "keeps its experts as fused 3-D tensors (model.layers.0.mlp.experts." in last, last
        assert "cannot quantize mixture-of-experts models yet" in last
    assert snapshot(tmp_path) == before
