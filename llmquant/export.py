"""Writing a checkpoint that reloads, and proving that it does.

The checkpoint is written into a hidden temporary folder beside the output, reloaded
from disk with ``AutoModelForCausalLM.from_pretrained`` in a fresh model, compared
with the in-memory quantized model (stored codes and scales, then logits on a fixed
input), and only then renamed to its final name. An interrupted or failed run leaves
no folder under the final name, and a previous export there is replaced only with
``overwrite`` and only once the new one has passed its check.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backends.bnb import checkpoint_tensors, pack_4bit
from .errors import ExportCheckError, UserError
from .plan import Plan
from .quantized import FourBitWeight, Int8Weight, KeptWeight, QuantizedWeight

MARKER_FILE = "llmquant.json"  # marks a folder llmquant wrote; only such folders are ever replaced
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 the young teacher left Tokyo for a school "
    "in the country, where the students soon tested him: 3, 5, 8, 13, 21."
)
_TMP_TAG = ".llmquant-tmp-"


# ---- the output folder ----------------------------------------------------------------


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any heavy work, an output we must not write to."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {str(out)!r} is not empty; pass --overwrite (or output.overwrite: true) to replace it")
        if not (out / MARKER_FILE).is_file():
            raise UserError(
                f"output folder {str(out)!r} is not empty and was not written by llmquant (no {MARKER_FILE}); "
                "refusing to replace it even with --overwrite"
            )
    parent = out.absolute().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {str(parent)!r} (permission denied)")


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary folders of runs that were killed (their process is gone)."""
    parent = out.absolute().parent
    if not parent.is_dir():
        return
    for p in parent.glob(f".{out.name}{_TMP_TAG}*"):
        pid = p.name.rsplit("-", 2)[-2] if p.name.count("-") >= 2 else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool):
    """Yield a temporary folder; on success it becomes ``out``, on any exit by exception it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    _remove_stale_temporaries(out)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.absolute().parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    check_output_dir(out, overwrite)  # the world may have changed while we worked
    backup = None
    if out.is_dir():
        if any(out.iterdir()):
            backup = out.absolute().parent / f".{out.name}.llmquant-old-{uuid.uuid4().hex[:8]}"
            os.rename(out, backup)
        else:
            out.rmdir()
    try:
        os.rename(tmp, out)
    except BaseException:
        if backup is not None:
            os.rename(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# ---- the tensors -------------------------------------------------------------------------


def collect_tensors(model: nn.Module, plan: Plan, chosen: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, on the CPU, from the chosen weights (never from bitsandbytes state)."""
    sd: dict[str, torch.Tensor] = {}
    for e in plan.entries:
        module = model.get_submodule(e.name)
        prefix = f"{e.name}."
        if e.scheme is None:
            if "weight" in e.tensors:
                sd[prefix + "weight"] = module.weight
        else:
            qw = chosen[e.name]
            if isinstance(qw, KeptWeight):
                sd[prefix + "weight"] = qw.weight if e.layer == "Linear" else qw.weight.t()
            else:
                sd.update(checkpoint_tensors(qw, prefix))
        if e.has_bias:
            sd[prefix + "bias"] = module.bias
    for name in plan.other_tensors:
        owner, _, leaf = name.rpartition(".")
        m = model.get_submodule(owner) if owner else model
        sd[name] = m._parameters[leaf] if leaf in m._parameters else m._buffers[leaf]

    out, seen = {}, set()
    for name, t in sd.items():
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel():  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    _check_against_plan(out, plan)
    return out


def _check_against_plan(sd: dict[str, torch.Tensor], plan: Plan) -> None:
    specs = plan.tensor_specs()
    missing, extra = set(specs) - set(sd), set(sd) - set(specs)
    assert not missing and not extra, f"checkpoint tensors differ from the plan: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"
    for name, (shape, dtype) in specs.items():
        if ".quant_state." in name:
            continue  # packed JSON, its length is only estimated
        t = sd[name]
        assert tuple(t.shape) == shape and t.dtype == dtype, f"{name}: {tuple(t.shape)} {t.dtype}, plan says {shape} {dtype}"


def save_safetensors(sd: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors")
    for filename, names in split.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def write_checkpoint(folder: Path, model: nn.Module, tokenizer, plan: Plan, chosen: dict[str, QuantizedWeight],
                     max_shard_size: int, extra_files: dict[str, str] | None = None) -> list[str]:
    """Weights, config.json (with the quantization_config), generation config and tokenizer."""
    shards = save_safetensors(collect_tensors(model, plan, chosen), folder, max_shard_size)
    cfg = copy.deepcopy(model.config)
    qcfg = plan.quantization_config(keep_in_fp32_modules(model))
    if qcfg is None:
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
    else:
        cfg.quantization_config = qcfg
    cfg.dtype = plan.model_dtype
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        with contextlib.suppress(ValueError):
            gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")
    return shards


def keep_in_fp32_modules(model: nn.Module) -> list[str]:
    return list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(
        getattr(model, "_keep_in_fp32_modules_strict", None) or []
    )


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


# ---- proving the export -----------------------------------------------------------------------


def probe_ids(tokenizer, vocab_size: int, n: int = 48) -> torch.Tensor:
    """A fixed input for comparing two models: real text when there is a tokenizer."""
    ids = None
    if tokenizer is not None:
        with contextlib.suppress(Exception):
            ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids[:, :n]
    if ids is None or ids.shape[1] < 8:
        ids = ((torch.arange(n) * 7919 + 11) % vocab_size).unsqueeze(0)
    return ids


def model_device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def logits_on(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(model_device(model))).logits.float().cpu()


def load_export(folder: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None, device_map=None):
    from transformers import AutoModelForCausalLM

    from . import hf_integration  # noqa: F401  (registers the llmquant format)

    kw: dict = {}
    if device_map is not None:
        kw["device_map"] = device_map
    elif device is not None:
        kw["device_map"] = {"": str(device)}
    if dtype is not None:
        kw["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(str(folder), **kw).eval()


@dataclass
class ExportCheck:
    max_abs_logit_diff: float
    tolerance: float
    tensors_checked: int
    seconds: float
    probe: dict | None = None  # the fixed input and a summary of the logits, to re-check the folder later

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def probe_summary(ids: torch.Tensor, logits: torch.Tensor, device: torch.device) -> dict:
    """Per position: the most likely token, its logit and the log-sum-exp (enough to tell a broken reload)."""
    lg = logits[0].float()
    return {
        "ids": ids[0].tolist(), "device": device.type,
        "argmax": lg.argmax(-1).tolist(), "max": lg.amax(-1).tolist(), "logsumexp": torch.logsumexp(lg, -1).tolist(),
    }


def check_export_folder(folder: str | Path) -> dict:
    """The run's check, on a folder from disk: intact files, then a reload that reproduces the recorded outputs."""
    from .checkpoint import check

    folder = Path(folder)
    ck = check(folder)
    marker = folder / MARKER_FILE
    if not marker.is_file():
        raise UserError(f"{folder} is not an llmquant export (no {MARKER_FILE}); only checked exports are pushed")
    meta = json.loads(marker.read_text())
    probe = (meta.get("export_check") or {}).get("probe")
    if not probe:
        raise UserError(f"{folder}/{MARKER_FILE} has no probe record; re-export it with this llmquant")
    device = torch.device(probe["device"] if probe["device"] == "cpu" or torch.cuda.is_available() else "cpu")
    try:
        model = load_export(folder, device, getattr(torch, meta["model_dtype"]))
    except Exception as e:  # a checkpoint transformers refuses: one line, not a traceback
        raise UserError(f"{folder} does not load: {str(e).strip().splitlines()[0]}") from None
    ids = torch.tensor([probe["ids"]])
    now = probe_summary(ids, logits_on(model, ids), device)
    if device.type == probe["device"]:
        worst = max(max(abs(a - b) for a, b in zip(now[k], probe[k])) for k in ("max", "logsumexp"))
        ok = worst <= 1e-3 * max(1.0, max(abs(v) for v in probe["max"]))
    else:  # another device computes differently: only demand the same predictions
        agree = sum(a == b for a, b in zip(now["argmax"], probe["argmax"])) / len(probe["argmax"])
        worst, ok = 1 - agree, agree >= 0.9
    if not ok:
        raise UserError(f"{folder} reloads, but not to the model that was exported (its outputs on the recorded input differ by {worst:.3g})")
    return {"checkpoint": ck, "meta": meta}


def verify_export(folder: Path, model: nn.Module, plan: Plan, chosen: dict[str, QuantizedWeight], ids: torch.Tensor) -> ExportCheck:
    """Reload ``folder`` in a fresh model and require it to match ``model``; raise ExportCheckError if not."""
    t0 = time.perf_counter()
    ref = logits_on(model, ids)
    device_map = getattr(model, "hf_device_map", None)
    fresh = load_export(folder, model_device(model), plan.model_dtype, device_map if isinstance(device_map, dict) and len(set(device_map.values())) > 1 else None)
    checked = _compare_layers(fresh, plan, chosen)
    got = logits_on(fresh, ids)
    del fresh
    diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("inf")
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    if not torch.isfinite(got).all() or not diff <= tol:
        raise ExportCheckError(
            f"the checkpoint written to {folder} does not reload to the quantized model: "
            f"max |logit difference| {diff:.3g} on a fixed input (tolerance {tol:.3g})"
        )
    return ExportCheck(diff, tol, checked, time.perf_counter() - t0, probe_summary(ids, ref, model_device(model)))


def _compare_layers(fresh: nn.Module, plan: Plan, chosen: dict[str, QuantizedWeight]) -> int:
    """Check the reloaded layers hold exactly the chosen codes and scales (before any forward pass)."""
    import bitsandbytes as bnb

    n = 0
    for e in plan.entries:
        m = fresh.get_submodule(e.name)
        qw = chosen.get(e.name)
        if isinstance(qw, FourBitWeight):
            ok = isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state is not None
            if ok:
                qs = m.weight.quant_state
                ok = (
                    qs.quant_type == qw.quant_type and qs.blocksize == qw.group_size
                    and torch.equal(m.weight.data.cpu().view(torch.uint8), pack_4bit(qw.codes).cpu())
                    and torch.equal(_effective_scales(qs).cpu(), qw.scales.cpu())
                )
            what = f"{qw.quant_type} block {qw.group_size}"
        elif isinstance(qw, Int8Weight):
            ok = isinstance(m, bnb.nn.Linear8bitLt)
            if ok:
                scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
                ok = torch.equal(m.weight.data.cpu(), qw.codes.cpu()) and torch.equal(scb.float().cpu(), qw.scb.cpu())
            what = "int8"
        else:
            ok = not isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
            what = "a float layer"
        if not ok:
            raise ExportCheckError(f"layer {e.name} did not reload as {what} with the exported codes and scales (got {type(m).__name__})")
        n += 1
    return n


def _effective_scales(qs) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_blockwise

    if qs.nested:
        s = dequantize_blockwise(qs.absmax, qs.state2)
        s += qs.offset
        return s.float()
    return qs.absmax.float()
