"""Calibration shared out over two processes (torch.distributed, gloo on the CPU) equals one process."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TEXT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(model_dir, out, calib, method):
    return {"model": {"source": str(model_dir)}, "device": "cpu",
            "quantization": {"default": {"format": "nf4", "group_size": 32}, "method": method,
                             "rules": [{"match": "*.k_proj", "format": "int8"}]},
            "calibration": {"text": {"source": str(calib)}, "nsamples": 5, "seqlen": 32, "awq": {"grid": 4, "tokens": 128}},
            "output": {"dir": str(out)}}


def _torchrun(recipe_file, nproc=2, script=None):
    """``llmquant run`` of ``recipe_file`` over ``nproc`` processes (``script``: a Python file run in its place, with
    the same arguments)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *([str(script)] if script else ["-m", "llmquant"]), "run", str(recipe_file),
           "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)


@pytest.mark.parametrize("method,activations,arch", [("gptq", "disk", "llama"), ("awq+gptq", "memory", "qwen2")])
def test_two_processes_choose_the_weights_one_process_chooses(tiny_dirs, tmp_path, method, activations, arch):
    """Byte for byte, with one thread per process in both runs: matrix products round differently with another
    number of threads, in one process as in several (the processes' activations in memory or each in its own files;
    the one process's in memory). The tiny Qwen2's head is tied to its embeddings: written once."""
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 3)
    model = tiny_dirs(arch)
    for name in ("one", "two"):
        r = _recipe(model, tmp_path / name, calib, method)
        if name == "two":
            r["calibration"]["activations"] = activations
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    single = subprocess.run([sys.executable, "-m", "llmquant", "run", str(tmp_path / "one.yaml"), "--quiet"],
                            capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    proc = _torchrun(tmp_path / "two.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (tmp_path / "one" / "model.safetensors").read_bytes(), (tmp_path / "two" / "model.safetensors").read_bytes()
    assert a == b
    tensors = load_file(str(tmp_path / "two" / "model.safetensors"))
    tied = json.loads((model / "config.json").read_text()).get("tie_word_embeddings", False)
    assert tied == (arch == "qwen2") and ("lm_head.weight" in tensors) == (not tied)
    rec = [json.loads((tmp_path / d / "llmquant.json").read_text())["calibration"] for d in ("one", "two")]
    assert [r["layer_rel_error"] for r in rec[0]["layers"]] == [r["layer_rel_error"] for r in rec[1]["layers"]]
    assert rec[1]["windows"] == [5, 32]
    assert not list(tmp_path.glob(".two.llmquant-partial-*"))  # the work folder, all processes' shares included


def test_a_run_over_several_processes_needs_something_to_share(tiny_dirs, tmp_path):
    rf = tmp_path / "rtn.yaml"
    rf.write_text(yaml.safe_dump({"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu",
                                  "quantization": {"default": "nf4"}, "output": {"dir": str(tmp_path / "out")}}))
    proc = _torchrun(rf)
    assert proc.returncode != 0
    assert "this recipe calibrates nothing; run it as one process" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_run_over_several_processes_into_an_output_another_run_writes_is_refused(tiny_dirs, tmp_path):
    from llmquant.export import output_lock

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 4)
    rf = tmp_path / "two.yaml"
    rf.write_text(yaml.safe_dump(_recipe(tiny_dirs("llama"), tmp_path / "out", calib, "gptq")))
    with output_lock(tmp_path / "out"):  # as a running llmquant holds it
        proc = _torchrun(rf)
    assert proc.returncode != 0
    assert f"is being written by another llmquant run (process {os.getpid()})" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "two.yaml"]  # nothing started, the lock given back


SLOW_BASELINE = """
import sys, time
from datetime import timedelta

from llmquant import cli, distributed
from llmquant.evaluate import Evaluation

distributed.TIMEOUT = timedelta(seconds=4)  # the processes' patience, cut from hours to seconds
real = Evaluation.run


def slow(self, *args, reference=False, **kw):
    if reference:
        time.sleep(10)  # a baseline evaluation that takes longer than the others will wait in a collective
    return real(self, *args, reference=reference, **kw)


Evaluation.run = slow
raise SystemExit(cli.main(sys.argv[1:]))
"""


def test_the_baseline_is_evaluated_after_the_others_are_done(tiny_dirs, tmp_path):
    """Process 0 alone evaluates; with the baseline evaluated first, the other process waited for it in its first
    collective and timed out there."""
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 3)
    r = _recipe(tiny_dirs("llama"), tmp_path / "out", calib, "gptq")
    r["eval"] = {"text": {"source": str(calib)}, "seqlen": 32, "max_tokens": 256}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(r))
    (tmp_path / "slow.py").write_text(SLOW_BASELINE)
    proc = _torchrun(tmp_path / "two.yaml", script=tmp_path / "slow.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "out" / "results.json").read_text())
    assert two["timings_seconds"]["eval_baseline"] >= 10
    # the baseline read into a skeleton of its own after the quantization is the one a single process measures first
    r["output"]["dir"] = str(tmp_path / "one")
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(r))
    single = subprocess.run([sys.executable, "-m", "llmquant", "run", str(tmp_path / "one.yaml"), "--quiet"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    for model in ("baseline", "quantized"):
        assert two["models"][model]["perplexity"] == pytest.approx(one["models"][model]["perplexity"], rel=1e-6)
    assert two["models"]["quantized"]["kl_divergence"] == pytest.approx(one["models"]["quantized"]["kl_divergence"], rel=1e-4)


LATE_PROCESS = """
import os, sys, time
from datetime import timedelta

from llmquant import cli, distributed

distributed.TIMEOUT = timedelta(seconds=4)
real = distributed.share


def late(n):
    if os.environ.get("RANK") == "1":
        time.sleep(12)  # process 1 comes to the first collective long after process 0's patience ran out
    return real(n)


distributed.share = late
raise SystemExit(cli.main(sys.argv[1:]))
"""


def test_a_process_the_others_wait_for_too_long_ends_the_run_with_one_line_each(tiny_dirs, tmp_path):
    """The process that waited past the timeout says so, naming the timeout; the late one finds the others gone; nothing
    is written under the output folder."""
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 3)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(_recipe(tiny_dirs("llama"), tmp_path / "out", calib, "gptq")))
    (tmp_path / "late.py").write_text(LATE_PROCESS)
    proc = _torchrun(tmp_path / "two.yaml", script=tmp_path / "late.py")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert any(line.startswith("error: process 0 of 2 waited for the others in a collective and it failed (") and
               line.endswith("another process stopped (its own output says why) or was still working after the "
                             "process group's timeout (0:00:04)") for line in errors), proc.stderr[-3000:]
    assert not any("unexpected" in line for line in errors), errors
    assert not (tmp_path / "out").exists()
