"""Layer-streamed quantization: the same export as the in-memory path, resumable, memory bounded by a layer."""

import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from conftest import ARCHS, TEXT
from llmquant import pipeline, walk
from llmquant.pipeline import run
from llmquant.recipe import Recipe
from llmquant.stream import ShardFiles, WorkFolder

RECIPES = {
    "rtn-mixed": ({"default": {"format": "nf4", "group_size": 32},
                   "rules": [{"match": ["*.q_proj", "*.c_attn", "*.fc1"], "format": "int8", "threshold": 0.0},
                             {"match": ["*.v_proj", "*.mlp.c_proj", "*.fc2"], "format": "fp4", "double_quant": True},
                             {"match": ["*.up_proj", "*.c_fc", "*.out_proj"], "format": "fp16"}]}, False),
    "gptq": ({"default": "nf4", "method": "gptq"}, True),
    "gptq-disk": ({"default": "nf4", "method": "gptq"}, {"activations": "disk"}),
    "awq+gptq": ({"default": "nf4", "method": "awq+gptq", "rules": [{"match": ["*.k_proj", "*.c_attn", "*.k_proj"], "format": "int8"}]}, True),
}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT * 3)
    return p


def make_recipe(model_dir, out, name, calib_file, **output):
    quant, calibrated = RECIPES[name]
    d = {"model": {"source": str(model_dir)}, "device": "cpu", "quantization": quant, "output": {"dir": str(out), **output}}
    if calibrated:
        d["calibration"] = {"text": {"source": str(calib_file)}, "nsamples": 4, "seqlen": 32, "awq": {"grid": 4, "tokens": 64},
                            **(calibrated if isinstance(calibrated, dict) else {})}
    return Recipe.from_dict(d)


def quiet(r):
    return run(r, console=Console(file=io.StringIO()), progress=False)


def whole(monkeypatch):
    monkeypatch.setattr(pipeline, "_stream_reader", lambda *a: None)


def stop_after(monkeypatch, step: str):
    """Make the run stop (KeyboardInterrupt, as if killed) once the work folder has saved ``step``; returns the real
    ``WorkFolder.save``."""
    real = WorkFolder.save

    def save(self, done, tensors, record):
        real(self, done, tensors, record)
        if done == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "save", save)
    return real


def same_files(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n.endswith(".safetensors") or n in ("model.safetensors.index.json", "config.json", "tokenizer.json"):
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_writer_is_byte_for_byte_safetensors(tmp_path):
    torch.manual_seed(0)
    sd = {"b.weight": torch.randn(5, 3), "a.absmax": torch.rand(7), "a.weight": torch.randint(0, 255, (9, 1), dtype=torch.uint8),
          "c.codes": torch.randint(-127, 127, (4, 4), dtype=torch.int8), "d.bf": torch.randn(3, dtype=torch.bfloat16),
          "e.half": torch.randn(2, 2, dtype=torch.float16), "fmt": torch.tensor(0, dtype=torch.uint8), "idx": torch.arange(3),
          "ü.unicode": torch.zeros(1), "empty": torch.zeros(0)}
    save_file(sd, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    files = ShardFiles({k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, max_shard_size=1 << 30)
    files.create(tmp_path)
    files.put(tmp_path, sd)
    assert files.write_index(tmp_path) == ["model.safetensors"] and files.index is None
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_shard_files_laid_out_first_and_filled_in_any_order_are_the_sequential_writers_bytes(tmp_path):
    from huggingface_hub import split_torch_state_dict_into_shards

    from llmquant.stream import FileRange, tensor_ranges

    torch.manual_seed(0)
    sd = {f"l{i}.{k}": v for i in range(6) for k, v in (("weight", torch.randint(0, 255, (300, 1), dtype=torch.uint8)),
                                                         ("absmax", torch.rand(37)), ("bias", torch.randn(5, dtype=torch.bfloat16)))}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}
    files = ShardFiles(specs, max_shard_size=1000)
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors", max_shard_size=1000)
    assert files.index == {"metadata": split.metadata, "weight_map": split.tensor_to_filename} and len(files.heads) > 2
    (tmp_path / "a").mkdir()
    files.create(tmp_path / "a")
    assert files.present(tmp_path / "a")
    save_file({"x": sd["l0.absmax"]}, str(tmp_path / "src.safetensors"))
    reversed_names = list(sd)[::-1]
    for name in reversed_names:  # last first, one from another file copied file to file
        src = tensor_ranges(tmp_path / "src.safetensors")[0]["x"] if name == "l0.absmax" else sd[name]
        assert isinstance(src, FileRange) or name != "l0.absmax"
        files.put(tmp_path / "a", {name: src})
    assert files.write_index(tmp_path / "a") == sorted(split.filename_to_tensors)
    for filename, names in split.filename_to_tensors.items():  # each shard as safetensors writes it
        save_file({n: sd[n] for n in names}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
        assert (tmp_path / "a" / filename).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), filename
    assert not ShardFiles(specs, max_shard_size=2000).present(tmp_path / "a")  # another layout is not taken for this one
    with pytest.raises(AssertionError):
        files.put(tmp_path / "a", {"l1.bias": torch.randn(5)})  # not the planned dtype


@pytest.mark.parametrize("offset", [0.0, 1 / 3, -2.2250738585072014e-308, -1.2345678901234567e-100, 123456.78901234567, float("nan")])
def test_a_double_quantized_weights_packed_json_has_its_planned_length_and_reads_as_bitsandbytes_wrote_it(offset):
    from bitsandbytes.utils import pack_dict_to_tensor, unpack_tensor_to_dict

    from llmquant.algorithms.rtn import rtn_4bit
    from llmquant.backends.bnb import checkpoint_tensors, quant_state, quant_state_json_length, read_weight
    from llmquant.quantized import NestedScales
    from llmquant.schemes import FourBit

    torch.manual_seed(0)
    qw = rtn_4bit(torch.randn(64, 256), FourBit(format="fp4", group_size=64, double_quant=True), torch.float16)
    n = qw.nested
    qw.nested = NestedScales(codes=n.codes, absmax=n.absmax, code=n.code, offset=torch.tensor(offset))
    t = checkpoint_tensors(qw, "")
    packed = t["weight.quant_state.bitsandbytes__fp4"]
    assert packed.numel() == quant_state_json_length("fp4", 64, torch.float16, (64, 256), True)
    ours = bytes(packed.numpy())
    stock = bytes(pack_dict_to_tensor({k: v for k, v in quant_state(qw).as_dict().items() if not isinstance(v, torch.Tensor)}).numpy())
    assert ours.rstrip(b" ") == stock and set(ours[len(stock):]) <= {ord(" ")}  # bitsandbytes' JSON, padded with spaces
    got = unpack_tensor_to_dict(packed)
    assert got["nested_offset"] == pytest.approx(float(torch.tensor(offset)), nan_ok=True)
    if offset == offset:
        back = read_weight(t)
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.nested.codes, qw.nested.codes)
    # without double quantization the JSON is bitsandbytes' own, unpadded
    plain = rtn_4bit(torch.randn(64, 256), FourBit(format="nf4", group_size=64), torch.bfloat16)
    packed = checkpoint_tensors(plain, "")["weight.quant_state.bitsandbytes__nf4"]
    assert packed.numel() == quant_state_json_length("nf4", 64, torch.bfloat16, (64, 256), False)
    assert bytes(packed.numpy()) == bytes(quant_state(plain).as_dict(packed=True)["quant_state.bitsandbytes__nf4"].numpy())


def test_only_tensors_still_as_read_are_copied_from_the_source_file(tmp_path):
    from torch import nn

    from llmquant.stream import CheckpointReader, FileRange, as_read, materialize

    torch.manual_seed(0)
    save_file({"a.weight": torch.randn(4, 3), "b.weight": torch.randn(4, 3), "c.weight": torch.randn(4, 3).double()},
              str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    with torch.device("meta"):
        m = nn.ModuleDict({"a": nn.Linear(3, 4, bias=False), "b": nn.Linear(3, 4, bias=False), "c": nn.Linear(3, 4, bias=False)})
    unchanged: dict = {}
    materialize(m, "", reader, "cpu", unchanged=unchanged)
    assert set(unchanged) == {"a.weight", "b.weight"}  # c was converted from float64 on reading
    with torch.no_grad():
        m["b"].weight.mul_(1.0)  # written to in place, even with the same values
    tied = m["a"].weight.detach().clone()
    out = as_read({"a.weight": m["a"].weight.detach(), "b.weight": m["b"].weight.detach(), "c.weight": m["c"].weight.detach(),
                   "t": tied}, {**unchanged, "t": unchanged["a.weight"]})
    assert isinstance(out["a.weight"], FileRange) and out["a.weight"] == reader.range("a.weight")
    assert all(isinstance(out[k], torch.Tensor) for k in ("b.weight", "c.weight", "t"))
    reader.close()


def _kernel_release() -> tuple[int, ...]:
    return tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())


# resident pages read per mapping (/proc/self/smaps), given back with MADV_PAGEOUT (Linux 5.4)
needs_pageout = pytest.mark.skipif(not Path("/proc/self/smaps").exists() or _kernel_release() < (5, 4),
                                   reason="needs Linux 5.4 (MADV_PAGEOUT, /proc/self/smaps)")


def _mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    kb, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and not line.split(" ", 1)[0].endswith(":"):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            kb += int(line.split()[1])
    return kb


@needs_pageout
def test_pages_of_a_tensor_that_maps_a_file_are_given_back_and_its_values_stay(tmp_path):
    from safetensors import safe_open

    from llmquant.memory import give_file_pages_back

    torch.manual_seed(0)
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.randn(4096, 2048, dtype=torch.bfloat16)}, str(path))  # 16 MiB
    with safe_open(str(path), "pt") as f:
        mapped = f.get_tensor("t")  # what transformers holds when the file's dtype is the model's
    total = float(mapped.float().sum())
    assert _mapped_kb(path) > 15 * 1024  # read whole: counted in this process's memory
    assert give_file_pages_back([mapped[:2048]]) >= 8 * 1024 * 1024 - 8192
    assert 7 * 1024 < _mapped_kb(path) < 9 * 1024  # the first half given back
    give_file_pages_back([mapped])
    assert _mapped_kb(path) < 1024
    assert float(mapped.float().sum()) == total  # read again from the file: the same values
    anonymous = torch.randn(1 << 20)
    copy = anonymous.clone()
    assert give_file_pages_back([anonymous, mapped[:, :7]]) == 0  # anonymous memory, a non-contiguous view: left alone
    assert torch.equal(anonymous, copy)


@needs_pageout
def test_a_head_that_maps_the_checkpoint_multiplies_a_slice_at_a_time_with_the_same_logits(tmp_path, monkeypatch):
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from llmquant import stream
    from llmquant.memory import maps_a_file

    cfg = tf.LlamaConfig(hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    os.sync()  # pages not yet written to the disk cannot be given back
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    head = model.get_output_embeddings().weight
    assert maps_a_file(head)  # transformers loads it as a view of the file: its pages are the file's
    ids = torch.randint(0, 8192, (2, 24))
    last = {}
    model.model.layers[-1].register_forward_hook(lambda m, i, o: last.update(h=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        whole = model(ids).logits.float()

    resident, given = [], walk.give_file_pages_back
    file = tmp_path / "m" / "model.safetensors"
    given([*model.parameters()])  # the pages the whole forward read

    def watched(tensors):
        resident.append(_mapped_kb(file))
        return given(tensors)

    monkeypatch.setattr(walk, "give_file_pages_back", watched)
    monkeypatch.setattr(walk, "HEAD_SLICE_BYTES", 2 << 20)  # 8 slices of the 16 MiB head
    sliced = walk.logits_after_layers(model, model.model.layers, ids, last["h"])
    assert len(resident) == 8
    # read a slice at a time, each given back before the next (kept, the 7 slices before the last would add 14 MiB;
    # the kernel may map a few MiB around each page read)
    assert max(resident) - resident[0] < 5 * 1024, resident
    assert (sliced - whole).abs().max() <= 1e-2 * whole.abs().max()  # each logit still one row's product
    assert torch.equal(walk.logits_after_layers(model, model.model.layers, ids, last["h"]), sliced)
    assert "forward" not in vars(model.get_output_embeddings())  # the head's own forward is back


@pytest.mark.compat
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(RECIPES))
def test_streamed_export_equals_the_in_memory_export(tiny_dirs, tmp_path, monkeypatch, calib_file, arch, name):
    shard = "120KB" if name == "rtn-mixed" else "5GB"
    streamed = quiet(make_recipe(tiny_dirs(arch), tmp_path / "streamed", name, calib_file, max_shard_size=shard))
    assert streamed.streamed and streamed.check.passed
    assert not list(tmp_path.glob(".streamed*")), "work folder left behind"
    whole(monkeypatch)
    loaded = quiet(make_recipe(tiny_dirs(arch), tmp_path / "whole", name, calib_file, max_shard_size=shard))
    assert not loaded.streamed
    same_files(tmp_path / "streamed", tmp_path / "whole")
    if shard == "120KB":
        assert len(list((tmp_path / "whole").glob("*.safetensors"))) > 2
    if RECIPES[name][1]:  # the same calibration, layer for layer
        a, b = streamed.calibration["layers"], loaded.calibration["layers"]
        assert [x["layer_rel_error"] for x in a] == pytest.approx([x["layer_rel_error"] for x in b], rel=1e-5)


@pytest.mark.parametrize("name", ["rtn-mixed", "gptq", "gptq-disk"])
def test_a_stopped_run_resumes_where_it_stopped(tiny_dirs, tmp_path, monkeypatch, calib_file, name):
    model_dir = tiny_dirs("mistral")
    quiet(make_recipe(model_dir, tmp_path / "reference", name, calib_file))
    real = WorkFolder.save

    def stop_after_first_layer(self, step, tensors, record):
        real(self, step, tensors, record)
        if step == "layer-00001":
            raise KeyboardInterrupt  # killed during the second of two layers' bookkeeping

    monkeypatch.setattr(WorkFolder, "save", stop_after_first_layer)
    with pytest.raises(KeyboardInterrupt):
        quiet(make_recipe(model_dir, tmp_path / "out", name, calib_file))
    assert not (tmp_path / "out").exists()
    work = list(tmp_path.glob(".out.llmquant-partial-*"))
    assert len(work) == 1 and (work[0] / "layer-00000.done.json").is_file()
    monkeypatch.undo()
    (work[0] / "layer-00001.done.json").unlink()  # as if killed before layer 1 was recorded
    res = quiet(make_recipe(model_dir, tmp_path / "out", name, calib_file))
    assert res.resumed_from == 1
    assert json.loads((tmp_path / "out" / "llmquant.json").read_text())["loading"]["resumed_from_layer"] == 1
    same_files(tmp_path / "out", tmp_path / "reference")
    assert not work[0].exists()


def test_large_states_are_saved_while_saving_takes_a_tenth_of_the_time():
    from llmquant.stream import STATE_ALWAYS_BYTES, StateWrites

    now = [0.0]
    w = StateWrites(clock=lambda: now[0])
    big = STATE_ALWAYS_BYTES + 1
    saved = []
    for t in range(0, 100, 5):  # a layer every 5 s, each save of a large state taking 2 s
        now[0] = float(t)
        if w.due(big):
            with w.timed():
                now[0] += 2.0
            saved.append(t)
        assert w.due(STATE_ALWAYS_BYTES)  # small states: every layer
    # the first at once; then as soon as one more keeps the saving within 10% of the time: 2 s in every 20 s
    assert saved == [0, 40, 60, 80]
    assert w.spent == pytest.approx(8.0)


@pytest.mark.parametrize("name", ["gptq", "gptq-disk"])
def test_a_run_stopped_layers_after_its_last_saved_state_makes_them_again(family_dirs, tmp_path, monkeypatch, calib_file, name):
    """States saved at layer 0 only (every save too slow for its share of the time): a run stopped after layer 2
    resumes from layer 1 and makes layers 1 and 2 again, with the activations on disk the saved state points to."""
    from llmquant import stream

    model_dir = family_dirs("llama")  # 4 decoder layers
    quiet(make_recipe(model_dir, tmp_path / "reference", name, calib_file))
    monkeypatch.setattr(stream, "STATE_ALWAYS_BYTES", 0)
    monkeypatch.setattr(stream, "STATE_TIME_SHARE", 0.0)  # only the first state is due
    real = stop_after(monkeypatch, "layer-00002")
    with pytest.raises(KeyboardInterrupt):
        quiet(make_recipe(model_dir, tmp_path / "out", name, calib_file))
    work = list(tmp_path.glob(".out.llmquant-partial-*"))[0]
    assert sorted(p.name for p in work.glob("state-after-*")) == ["state-after-00000.pt"]
    assert all((work / f"layer-{i:05d}.done.json").is_file() for i in range(3))
    monkeypatch.setattr(WorkFolder, "save", real)
    res = quiet(make_recipe(model_dir, tmp_path / "out", name, calib_file))
    assert res.resumed_from == 1
    same_files(tmp_path / "out", tmp_path / "reference")
    assert not work.exists()


def test_a_stopped_run_resumed_with_another_shard_size_starts_again(tiny_dirs, tmp_path, monkeypatch, calib_file):
    model_dir = tiny_dirs("llama")
    quiet(make_recipe(model_dir, tmp_path / "reference", "rtn-mixed", calib_file, max_shard_size="60KB"))
    stop_after(monkeypatch, "layer-00000")
    with pytest.raises(KeyboardInterrupt):
        quiet(make_recipe(model_dir, tmp_path / "out", "rtn-mixed", calib_file))
    monkeypatch.undo()
    res = quiet(make_recipe(model_dir, tmp_path / "out", "rtn-mixed", calib_file, max_shard_size="60KB"))
    assert res.resumed_from == 0  # the files written so far were laid out for one shard
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    same_files(tmp_path / "out", tmp_path / "reference")


@pytest.mark.parametrize("method,extra", [("gptq", {}), ("awq+gptq", {"true_sequential": True}),
                                          ("gptq+tune", {"tune": {"steps": 3}})])
def test_activations_kept_on_disk_give_the_same_export_one_generation_at_a_time(tiny_dirs, tmp_path, monkeypatch, calib_file,
                                                                                 method, extra):
    def recipe(out, activations):
        return Recipe.from_dict({"model": {"source": str(tiny_dirs("llama"))}, "device": "cpu", "output": {"dir": str(out)},
                                 "quantization": {"default": "nf4", "method": method},
                                 "calibration": {"text": {"source": str(calib_file)}, "nsamples": 4, "seqlen": 32,
                                                 "awq": {"grid": 4, "tokens": 64}, "activations": activations, **extra}})

    seen = []
    real = WorkFolder.save_state

    def look(self, layer, state):  # what the activations folder holds once a layer is done
        real(self, layer, state)
        acts = self.path / "activations"
        seen.append({p.name: len(list(p.glob("*.pt"))) for p in acts.iterdir()} if acts.is_dir() else {})

    monkeypatch.setattr(WorkFolder, "save_state", look)
    disk = quiet(recipe(tmp_path / "disk", "disk"))
    monkeypatch.undo()
    memory = quiet(recipe(tmp_path / "memory", "memory"))
    same_files(tmp_path / "disk", tmp_path / "memory")
    assert [x["layer_rel_error"] for x in disk.calibration["layers"]] == [x["layer_rel_error"] for x in memory.calibration["layers"]]
    tuned = method.endswith("tune")
    first = {"inputs", "float-inputs"} if tuned else {"inputs"}
    assert len(seen) == 2 and all(n == 4 for s in seen for n in s.values()), seen  # 4 windows in each generation
    # the inputs the layer read (kept while the saved state before it pointed to them) and its outputs; nothing else
    assert set(seen[0]) == first | {"model.layers.0.outputs"} | ({"model.layers.0.model-outputs"} if tuned else set())
    assert set(seen[1]) == {f"model.layers.{i}.{kind}" for i in (0, 1) for kind in (["outputs", "model-outputs"] if tuned else ["outputs"])}
    assert not list(tmp_path.glob(".disk.llmquant-partial-*"))


def test_activations_on_disk_without_room_for_them_are_refused_before_any_work(tiny_dirs, tmp_path, monkeypatch, calib_file):
    import shutil

    from llmquant.errors import UserError

    quiet(make_recipe(tiny_dirs("llama"), tmp_path / "ref", "gptq-disk", calib_file))
    export = sum(p.stat().st_size for p in (tmp_path / "ref").glob("*.safetensors"))
    real = shutil.disk_usage
    from llmquant import needs

    calls, real_save_state, real_check = [], WorkFolder.save_state, needs.check
    monkeypatch.setattr(WorkFolder, "save_state", lambda *a: calls.append(a))
    # 3 generations of 4 windows x 32 tokens x 128 float32 values: 197 kB, besides the export; the estimate of the
    # run's needs refuses first, before the model loads
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=export + 100_000))
    with pytest.raises(UserError, match=r"this run needs about .* KB of disk in .* \(the export: .* KB\) and .* KB are free"):
        quiet(make_recipe(tiny_dirs("llama"), tmp_path / "out", "gptq-disk", calib_file))
    # behind it, the streamed run's exact checks: the export's files are laid out before any work, and refused when
    # they cannot fit; then the activations beside them
    monkeypatch.setattr(needs, "check", lambda *a: None)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=export - 1))
    with pytest.raises(UserError, match=r"the export needs .* KB in .* and .* KB are free; free some space there"):
        quiet(make_recipe(tiny_dirs("llama"), tmp_path / "out", "gptq-disk", calib_file))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=export + 100_000))
    with pytest.raises(UserError, match=r"calibration.activations: disk needs about 196.6 KB in .* besides the export's .* KB, "
                                        r"and .* KB are free"):
        quiet(make_recipe(tiny_dirs("llama"), tmp_path / "out", "gptq-disk", calib_file))
    assert not calls and not (tmp_path / "out").exists()
    monkeypatch.setattr(needs, "check", real_check)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=export + 200_000))
    monkeypatch.setattr(WorkFolder, "save_state", real_save_state)
    assert quiet(make_recipe(tiny_dirs("llama"), tmp_path / "out", "gptq-disk", calib_file)).check.passed
    same_files(tmp_path / "out", tmp_path / "ref")


def test_another_recipe_does_not_resume_a_foreign_work_folder(tiny_dirs, tmp_path, calib_file, monkeypatch):
    model_dir = tiny_dirs("llama")
    real = WorkFolder.save

    def stop(self, step, tensors, record):
        real(self, step, tensors, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "save", stop)
    with pytest.raises(KeyboardInterrupt):
        quiet(make_recipe(model_dir, tmp_path / "out", "rtn-mixed", calib_file))
    monkeypatch.undo()
    res = quiet(make_recipe(model_dir, tmp_path / "out", "gptq", calib_file))
    assert res.resumed_from == 0
    assert not list(tmp_path.glob(".out.llmquant-partial-*"))  # a finished export supersedes stopped runs


@pytest.mark.parametrize("upgraded", [None, "torch", "transformers", "bitsandbytes", "llmquant"])
def test_a_stopped_run_resumes_only_with_the_code_that_made_its_layers(tiny_dirs, tmp_path, calib_file, monkeypatch,
                                                                        upgraded):
    from llmquant import results

    real_save, real_versions = WorkFolder.save, results.versions
    saved = []

    def stop(self, step, tensors, record):
        real_save(self, step, tensors, record)
        saved.append(step)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "save", stop)
    with pytest.raises(KeyboardInterrupt):
        quiet(make_recipe(tiny_dirs("llama"), tmp_path / "out", "rtn-mixed", calib_file))
    monkeypatch.undo()
    if upgraded:
        monkeypatch.setattr(results, "versions", lambda: {**real_versions(), upgraded: "99.0"})
    res = quiet(make_recipe(tiny_dirs("llama"), tmp_path / "out", "rtn-mixed", calib_file))
    assert (res.resumed_from > 0) == (upgraded is None), res.resumed_from


def peak_rss_of(cmd: list[str], **kw) -> tuple[int, subprocess.CompletedProcess]:
    """Run a command under /usr/bin/time -v; its peak resident memory in bytes."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, **kw)
    kb = next(int(l.split(":")[1]) for l in proc.stderr.splitlines() if "Maximum resident set size" in l)
    return kb * 1024, proc


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs /usr/bin/time")
def test_a_checkpoint_larger_than_the_memory_used_still_quantizes(tmp_path):
    """A 1.3 GB float32 checkpoint in 3 shards is quantized by a process whose peak memory stays well below its size
    (measured: 0.38 of it, most of that Python and the libraries; 0.46 before bitsandbytes was imported without
    Inductor and dropped layers were freed at once, 0.75 before the embeddings and the head were copied file to
    file and compared after the forward; loading the model whole takes more than 1.0)."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(tmp_path / "big", max_shard_size="500MB")
    del model
    ckpt = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert ckpt > 1.2e9 and len(list((tmp_path / "big").glob("*.safetensors"))) >= 3
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: {tmp_path / 'big'}}}\ndevice: cpu\noutput: {{dir: {tmp_path / 'out'}}}\n")
    rss, proc = peak_rss_of([sys.executable, "-m", "llmquant", "run", str(recipe), "--quiet"],
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "llmquant.json").read_text())
    assert meta["loading"]["streamed"] and meta["export_check"]["passed"]
    assert rss < 0.5 * ckpt, (rss, ckpt)  # the whole model in memory would take more than the checkpoint alone


def streamed_and_in_memory_results(recipe, tmp_path, monkeypatch, after_streamed=lambda: None) -> tuple[dict, dict]:
    """``recipe(out)`` run streamed into ``streamed/``, then with the model loaded whole into ``whole/``: the models
    of each run's results.json."""
    assert quiet(recipe(tmp_path / "streamed")).streamed
    after_streamed()
    with monkeypatch.context() as m:
        whole(m)
        assert not quiet(recipe(tmp_path / "whole")).streamed
    return tuple(json.loads((tmp_path / d / "results.json").read_text())["models"] for d in ("streamed", "whole"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_streamed_evaluation_measures_what_the_whole_model_measures(tiny_dirs, tmp_path, monkeypatch, calib_file, arch):
    """Perplexity and divergence of a streamed run (baseline from the checkpoint, quantized model from the checked
    export, one decoder layer at a time over all windows) equal the in-memory run's."""
    ev = {"text": {"source": str(calib_file)}, "seqlen": 32, "max_tokens": 200, "batch_size": 2, "divergence_tokens": 100}

    def recipe(out):
        r = make_recipe(tiny_dirs(arch), out, "rtn-mixed", calib_file).to_dict()
        return Recipe.from_dict({**r, "eval": ev})

    a, b = streamed_and_in_memory_results(recipe, tmp_path, monkeypatch)
    for name in ("baseline", "quantized"):
        pa, pb = a[name], b[name]
        assert pa["perplexity"] == pytest.approx(pb["perplexity"], rel=1e-4), name
        assert pa["size"]["linear_bits_per_weight"] == pytest.approx(pb["size"]["linear_bits_per_weight"], rel=1e-6), name
        assert pa["size"]["linear_weights"] == pb["size"]["linear_weights"]
    assert a["quantized"]["kl_divergence"]["mean"] == pytest.approx(b["quantized"]["kl_divergence"]["mean"], rel=1e-2, abs=1e-6)
    assert a["quantized"]["top1_agreement"] == pytest.approx(b["quantized"]["top1_agreement"], abs=0.02)
    assert a["quantized"]["perplexity"] != a["baseline"]["perplexity"]


def test_tasks_of_a_streamed_run_load_each_model_whole_and_offload_a_baseline_that_does_not_fit(tiny_dirs, tmp_path, monkeypatch, calib_file,
                                                                                                capsys):
    """lm-eval tasks do not stop a run from streaming: each model is loaded whole for its tasks, the float baseline
    offloaded to disk by accelerate when it does not fit in eval.tasks_max_memory, and the scores are the in-memory
    run's."""
    ev = {"text": {"source": str(calib_file)}, "seqlen": 32, "max_tokens": 100,
          "tasks": ["botchan_cloze"], "task_limit": 4, "task_batch_size": 2, "tasks_max_memory": "10KB"}

    def recipe(out):
        return Recipe.from_dict({**make_recipe(tiny_dirs("llama"), out, "rtn-mixed", calib_file).to_dict(), "eval": ev})

    def after_streamed():
        log = " ".join(capsys.readouterr().err.split())  # progress notes go to stderr, wrapped to the terminal
        assert "lm-eval tasks: the baseline" in log and "does not fit in the 10.0 KB it may use on cpu" in log
        assert "the quantized model" not in log  # loaded whole: offloading would not keep its layers as exported
        assert not list(tmp_path.glob(".streamed.llmquant-offload-*"))  # the offload folder is removed

    capsys.readouterr()
    a, b = streamed_and_in_memory_results(recipe, tmp_path, monkeypatch, after_streamed)
    for name in ("baseline", "quantized"):
        assert set(a[name]["tasks"]) == {"botchan_cloze"}
        for task, scores in a[name]["tasks"].items():
            assert scores["acc"] == b[name]["tasks"][task]["acc"] and scores["samples"] == 4, (name, task)


def test_a_calibrated_run_fixes_the_heaps_mmap_threshold_before_building_the_skeleton(tiny_dirs, tmp_path, monkeypatch, calib_file):
    """Building the skeleton allocates every weight once (untouched, then moved to the meta device); with glibc's
    dynamic threshold those blocks can come from the heap and leave it large and free for later temporaries to fill
    (0.1 GB more at GPTQ's peak on a 1B model). A calibrated run fixes the threshold first; a plain RTN run does not."""
    calls = []
    real_skeleton = pipeline.skeleton
    monkeypatch.setattr(pipeline, "steady_heap", lambda: calls.append("steady_heap"))
    monkeypatch.setattr(pipeline, "skeleton", lambda *a, **k: (calls.append("skeleton"), real_skeleton(*a, **k))[1])
    quiet(make_recipe(tiny_dirs("llama"), tmp_path / "gptq", "gptq", calib_file))
    assert calls[:2] == ["steady_heap", "skeleton"]
    calls.clear()
    quiet(make_recipe(tiny_dirs("llama"), tmp_path / "rtn", "rtn-mixed", calib_file))
    assert calls == ["skeleton"]


def test_several_gpus_stream_one_layer_at_a_time_like_one(tiny_dirs, monkeypatch):
    """Streaming (one decoder layer on one GPU per process) is the default whatever the GPU count, so a torchrun launch
    on a machine with several GPUs shares calibration out instead of being refused for a device-map path."""
    from llmquant.models import load_config, resolve_source
    from llmquant.stream import skeleton

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(pipeline, "pick_device", lambda name: torch.device("cuda"))
    src = resolve_source(str(tiny_dirs("llama")))
    frame = skeleton(load_config(src), torch.float32)
    recipe = make_recipe(tiny_dirs("llama"), Path("out"), "gptq", Path("calib.txt")).with_overrides({"device": "auto"})
    notes = []
    reader = pipeline._stream_reader(recipe, src, frame, type("Log", (), {"print": staticmethod(notes.append)}))
    assert reader is not None and notes == []
    reader.close()
