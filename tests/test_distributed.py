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
from test_stream import quiet
from llmquant.recipe import Recipe


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


def _torchrun(recipe_file, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "llmquant", "run", str(recipe_file), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_two_processes_choose_the_weights_one_process_chooses(tiny_dirs, tmp_path, method):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 3)
    model = tiny_dirs("llama")
    one = quiet(Recipe.from_dict(_recipe(model, tmp_path / "one", calib, method)))
    rf = tmp_path / "two.yaml"
    rf.write_text(yaml.safe_dump(_recipe(model, tmp_path / "two", calib, method)))
    proc = _torchrun(rf)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert one.check.passed
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    codes = differing = 0
    for k in a:
        if a[k].dtype == torch.uint8 and k.endswith("proj.weight"):  # packed 4-bit codes, two per byte
            lo, hi = a[k] & 15, a[k] >> 4
            codes += 2 * a[k].numel()
            differing += int(((b[k] & 15) != lo).sum() + ((b[k] >> 4) != hi).sum())
        elif a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
        else:
            assert int((a[k] != b[k]).sum()) <= max(1, a[k].numel() // 1000), k  # int8 codes, packed quant_state
    assert codes > 10_000 and differing <= codes // 1000, (differing, codes)  # float summation order only
    rec = [json.loads((tmp_path / d / "llmquant.json").read_text())["calibration"]["layers"] for d in ("one", "two")]
    assert [r["layer"] for r in rec[0]] == [r["layer"] for r in rec[1]]
    for r1, r2 in zip(*rec):
        assert r2["layer_rel_error"] == pytest.approx(r1["layer_rel_error"], rel=1e-3)
    assert json.loads((tmp_path / "two" / "llmquant.json").read_text())["calibration"]["windows"] == [5, 32]
    assert not list(tmp_path.glob(".two.llmquant-partial-*"))  # the work folder, all processes' shares included


def test_a_run_over_several_processes_needs_something_to_share(tiny_dirs, tmp_path):
    rf = tmp_path / "rtn.yaml"
    rf.write_text(yaml.safe_dump({"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu",
                                  "quantization": {"default": "nf4"}, "output": {"dir": str(tmp_path / "out")}}))
    proc = _torchrun(rf)
    assert proc.returncode != 0
    assert "this recipe calibrates nothing; run it as one process" in proc.stderr
    assert not (tmp_path / "out").exists()
