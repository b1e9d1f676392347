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
import errno
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backends.bnb import pack_4bit
from .errors import ExportCheckError, UserError
from .memory import give_file_pages_back, give_memory_back
from .quantize import collect_tensors
from .plan import Plan, is_linear
from .quantized import FourBitWeight, Int8Weight, KeptWeight, QuantizedWeight
from .schemes import FourBit, Int8

MARKER_FILE = "llmquant.json"  # marks a folder llmquant wrote; only such folders are ever replaced
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 the young teacher left Tokyo for a school "
    "in the country, where the students soon tested him: 3, 5, 8, 13, 21."
)
_TMP_TAG = ".llmquant-tmp-"
_OLD_TAG = ".llmquant-old-"  # the previous export while the new one moves in (where folders cannot be exchanged)


# ---- the output folder ----------------------------------------------------------------


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any heavy work, an output we must not write to (after putting back an export a killed run had
    moved aside, and removing what killed runs left)."""
    _remove_stale_temporaries(out)
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
    _check_writable(out.absolute().parent)


def _check_writable(folder: Path) -> None:
    """Make and remove a folder where the export will go (in the nearest folder that exists), so an
    unwritable place fails now, not after hours of quantization."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write the output under {str(folder)!r}: {str(existing)!r} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".llmquant-write-test-", dir=existing)
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f"cannot write the output under {str(folder)!r}: {e.strerror or e} at {str(existing)!r}; "
                        "choose an output folder you can write to") from None


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary folders of runs that were killed (their process is gone); a previous export moved aside by a run
    killed before its new export moved in is put back."""
    parent = out.absolute().parent
    if not parent.is_dir():
        return
    for tag in (_OLD_TAG, _TMP_TAG):
        for p in parent.glob(f".{out.name}{tag}*"):
            pid = p.name.rsplit("-", 2)[-2] if p.name.count("-") >= 2 else ""
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if tag == _OLD_TAG and not os.path.lexists(out):
                os.rename(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


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
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.absolute().parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, out, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise UserError(f"writing the export beside {str(out)!r} failed: {e.strerror}; nothing was written at "
                            f"{str(out)!r}: free some space there or choose another output folder") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_lock(out: Path, take: bool = True):
    """Hold ``.OUT.llmquant-lock`` beside the output for a run: a second run into the same output (which would
    clear the first one's work folder and activations under it) is refused at once. With ``take`` False (the
    other processes of a distributed run, whose process 0 holds it) nothing is locked."""
    import fcntl

    if not take:
        yield
        return
    out = Path(out).absolute()
    path = out.parent / f".{out.name}.llmquant-lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"output folder {str(out)!r} is being written by another llmquant run (process {holder}); "
                                "wait for it to finish, or choose another output.dir") from None
            try:  # the holder before us may have removed the file between our open and our lock: lock the one there now
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write the output under {str(out.parent)!r}: {e.strerror or e}; "
                        "choose an output folder you can write to") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def keep_unchecked(tmp: Path, out: Path) -> Path:
    """Move a written export whose check failed beside ``out`` (visible, never cleaned up automatically)."""
    kept = out.absolute().parent / f"{out.name}.unchecked-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    os.rename(tmp, kept)
    return kept


def install_export(folder: Path, out: Path, overwrite: bool) -> None:
    """Put a checked export folder in place at ``out`` (same rules as a run's output)."""
    _commit(Path(folder), Path(out), overwrite)


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``out``. A previous export there is exchanged with the new one in one step, so a process killed
    at any moment leaves one whole export at ``out``; where the system cannot exchange folders, the old one is moved
    aside first, and put back by the next run if this one dies before the new one is in place."""
    check_output_dir(out, overwrite)  # the world may have changed while we worked
    backup = None
    if out.is_dir():
        if any(out.iterdir()):
            if _exchange(tmp, out):
                shutil.rmtree(tmp, ignore_errors=True)  # now the previous export (a leftover of a kill: removed later)
                return
            backup = out.absolute().parent / f".{out.name}{_OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        else:
            out.rmdir()
    try:
        if backup is not None:
            os.rename(out, backup)
        os.rename(tmp, out)
    except BaseException:  # Ctrl-C or a failure between the two: the previous export goes back
        if backup is not None and backup.exists() and not os.path.lexists(out):
            os.rename(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# ---- the tensors -------------------------------------------------------------------------


def export_files(plan: Plan, max_shard_size: int):
    """The export's safetensors files as laid out from the plan alone (:class:`~llmquant.stream.ShardFiles`): every
    tensor's dtype and shape is planned exactly, in the export's order."""
    from .stream import ShardFiles

    return ShardFiles({n: (dtype, shape) for n, (shape, dtype) in plan.tensor_specs().items()}, max_shard_size)


def save_safetensors(sd: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> list[str]:
    return write_shards({n: (t.dtype, tuple(t.shape)) for n, t in sd.items()}, sd.__getitem__, folder, max_shard_size)


def write_shards(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], get, folder: Path, max_shard_size: int) -> list[str]:
    """Split tensors (in ``specs`` order) into shards of at most ``max_shard_size`` as transformers does, and
    write each shard one tensor at a time (``get(name)``), with ``model.safetensors.index.json`` when sharded."""
    from .stream import ShardFiles

    files = ShardFiles(specs, max_shard_size)
    files.create(folder, Path(folder).absolute().parent)
    for name in specs:
        files.put(folder, {name: get(name)})
    return files.write_index(folder)


def write_checkpoint(folder: Path, model: nn.Module, tokenizer, plan: Plan, chosen: dict[str, QuantizedWeight],
                     max_shard_size: int, extra_files: dict[str, str] | None = None) -> list[str]:
    """Weights, config.json (with the quantization_config), generation config and tokenizer."""
    sd = collect_tensors(model, plan, chosen)  # checked against the plan: the streamed export's layout
    shards = save_safetensors({n: sd[n] for n in plan.tensor_specs()}, folder, max_shard_size)
    write_model_files(folder, model, tokenizer, plan, extra_files)
    return shards


def write_streamed_checkpoint(folder: Path, work, model: nn.Module, tokenizer, plan: Plan,
                              extra_files: dict[str, str] | None = None) -> list[str]:
    """:func:`write_checkpoint` from a streamed run's work folder, whose export files are laid out as the in-memory
    export's (:func:`export_files`) and hold every tensor once the run is done: linked into ``folder``, not copied."""
    shards = work.link_export(folder)
    write_model_files(folder, model, tokenizer, plan, extra_files)
    return shards


def write_model_files(folder: Path, model: nn.Module, tokenizer, plan: Plan, extra_files: dict[str, str] | None = None) -> None:
    """config.json (with the quantization_config), generation config, tokenizer and extra text files."""
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


# Logits of the reloaded model must match the in-memory model's within this fraction of the largest
# logit. The tensors are compared exactly first; the logits only have to show that the same tensors
# compute the same function (config, module types, dtypes). Such a mistake changes logits by far more
# than the run-to-run noise of a forward pass (reduction order changes with thread scheduling, more so
# on a busy CPU: 1.3e-4 of the largest logit was seen on SmolLM2 in float32); 16-bit compute rounds
# more coarsely, so its noise is larger.
LOGIT_RTOL = {torch.float32: 1e-3, torch.float64: 1e-3}
LOGIT_RTOL_16BIT = 1e-2
LOGIT_ATTEMPTS = 3


@dataclass
class ExportCheck:
    max_abs_logit_diff: float | None  # None when the check failed before comparing logits
    tolerance: float | None
    tensors_checked: int
    seconds: float
    probe: dict | None = None  # the fixed input and a summary of the logits, to re-check the folder later
    noise: float = 0.0  # largest difference between two runs of the same model, when the first comparison was retried
    attempts: int = 1
    passed: bool = True
    error: str | None = None

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def probe_summary(ids: torch.Tensor, logits: torch.Tensor, device: torch.device, cpu_repacking: bool = True) -> dict:
    """Per position: the most likely token, its logit and the log-sum-exp (enough to tell a broken reload), and
    whether 4-bit layers computed with bitsandbytes' CPU repacking (bfloat16 on AVX512-BF16 CPUs) or without."""
    lg = logits[0].float()
    return {
        "ids": ids[0].tolist(), "device": device.type, "cpu_repacking": cpu_repacking,
        "argmax": lg.argmax(-1).tolist(), "max": lg.amax(-1).tolist(), "logsumexp": torch.logsumexp(lg, -1).tolist(),
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape or not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float("inf")
    return (a - b).abs().max().item()


def compare_logits(reference, candidate, dtype: torch.dtype, attempts: int = LOGIT_ATTEMPTS) -> tuple[float, float, float, int]:
    """Compare the logits two callables compute, allowing for run-to-run numerical noise.

    A first comparison that fails is repeated (both models run again): it passes when the two
    agree within tolerance on a repeat, or when they differ by no more than twice what either
    differs from itself between runs. A model that computes something else differs the same way
    every time and still fails. Returns (difference, tolerance, noise, attempts).
    """
    ref, got = reference(), candidate()
    tol = LOGIT_RTOL.get(dtype, LOGIT_RTOL_16BIT) * max(1.0, ref.abs().max().item() if torch.isfinite(ref).all() else 1.0)
    diff, noise, n = _max_diff(ref, got), 0.0, 1
    while diff > tol and n < attempts:
        ref2, got2 = reference(), candidate()
        n += 1
        noise = max(noise, _max_diff(ref, ref2), _max_diff(got, got2))
        if noise != float("inf"):
            tol = max(tol, 2 * noise)
        diff = min(diff, _max_diff(ref2, got2))
    return diff, tol, noise, n


def check_export_folder(folder: str | Path, require_passed: bool = True) -> dict:
    """The run's check, on a folder from disk: intact files, a reload that holds exactly the files' tensors,
    and outputs that reproduce the ones recorded when it was exported (``llmquant.json``)."""
    from .checkpoint import check

    folder = Path(folder)
    ck = check(folder)
    marker = folder / MARKER_FILE
    if not marker.is_file():
        raise UserError(f"{folder} is not an llmquant export (no {MARKER_FILE}); only checked exports are pushed")
    meta = json.loads(marker.read_text())
    record = meta.get("export_check") or {}
    probe = record.get("probe")
    if not probe:
        raise UserError(f"{folder}/{MARKER_FILE} has no probe record; re-export it with this llmquant")
    if require_passed and record.get("passed") is False:
        raise UserError(f"{folder} did not pass its export check; run `llmquant check {folder}` first")
    dtype = getattr(torch, meta["model_dtype"])
    device = torch.device(probe["device"] if probe["device"] == "cpu" or torch.cuda.is_available() else "cpu")
    try:
        model = load_export(folder, device, dtype)
    except Exception as e:  # a checkpoint transformers refuses: one line, not a traceback
        raise UserError(f"{folder} does not load: {str(e).strip().splitlines()[0]}") from None
    if not probe.get("cpu_repacking", True):
        from .backends.bnb import without_cpu_repacking

        without_cpu_repacking(model)  # computed as the recorded outputs were
    try:
        tensors = _compare_with_files(model, folder, meta["layers"])
    except ExportCheckError as e:
        raise UserError(f"{folder}: {e}") from None
    ids = torch.tensor([probe["ids"]])
    now = probe_summary(ids, logits_on(model, ids), device)
    if device.type == probe["device"]:
        worst = max(max(abs(a - b) for a, b in zip(now[k], probe[k])) for k in ("max", "logsumexp"))
        tol = LOGIT_RTOL.get(dtype, LOGIT_RTOL_16BIT) * max(1.0, max(abs(v) for v in probe["max"]))
    else:  # another device computes differently: only demand the same predictions
        agree = sum(a == b for a, b in zip(now["argmax"], probe["argmax"])) / len(probe["argmax"])
        worst, tol = 1 - agree, 0.1
    if not worst <= tol:
        raise UserError(f"{folder} reloads, but not to the model that was exported (its outputs on the recorded input differ by {worst:.3g})")
    return {"checkpoint": ck, "meta": meta, "tensors_checked": tensors, "max_abs_logit_diff": worst, "tolerance": tol}


def _compare_with_files(fresh: nn.Module, folder: Path, layers: list[dict], keep=None, files=None, schemes=None) -> int:
    """Every tensor in the safetensors files (those ``keep(name)`` accepts), as the reloaded model holds it (one
    layer read at a time, the files closed after each, so a big checkpoint never sits in memory); with
    ``schemes`` (layer name -> the planned format), each layer must be stored in its planned format."""
    from types import SimpleNamespace

    from .backends.bnb import read_weight
    from .stream import CheckpointReader

    files = files or CheckpointReader(folder)
    wanted = [k for k in files.where if keep is None or keep(k)]
    n = 0
    planned: set[str] = set()
    by_layer: dict[str, list[str]] = {}
    names = {l["name"] for l in layers if l["format"] != "unchanged"}
    for k in wanted:
        owner = k.rsplit(".", 1)[0]
        while owner and owner not in names:
            owner = owner.rpartition(".")[0]
        if owner and k != owner + ".bias":  # a Linear has no children: its keys are its weight's
            by_layer.setdefault(owner, []).append(k)
    for name, keys in by_layer.items():
        planned.update(keys)
        qw = read_weight({k[len(name) + 1:]: files.get(k) for k in keys})
        if isinstance(qw, KeptWeight) and not is_linear(fresh.get_submodule(name)):
            qw = KeptWeight(qw.weight.t())  # GPT-2's Conv1D stores [in, out]
        if schemes is not None and name in schemes and not _stored_as(qw, schemes[name]):
            raise ExportCheckError(f"{name} is not stored in its planned format {schemes[name].label()}")
        n += _compare_layers(fresh, [SimpleNamespace(name=name)], {name: qw})
        files.close()
        del qw
        give_memory_back()  # the unpacked codes and their repacking, before the next layer's
    ours = dict(fresh.named_parameters(remove_duplicate=False)) | dict(fresh.named_buffers(remove_duplicate=False))
    for k in wanted:
        if k in planned:
            continue
        if k not in ours or not _same_as_file(ours[k], files, k):
            raise ExportCheckError(f"tensor {k} did not reload with the values in the files")
        files.close()
        n += 1
    return n


def _same_as_file(t: torch.Tensor, files, key: str, rows: int = 1 << 22) -> bool:
    """:func:`_same_values` of a tensor and the file's tensor ``key``, a slice of about ``rows`` bytes of the file at a
    time (each slice's mapping given back before the next), so a large tensor is never read from the file whole."""
    r = files.range(key)
    if t.dim() == 0 or r.length <= rows or tuple(t.shape) != tuple(r.shape):
        return _same_values(t, files.get(key))
    step = max(1, rows * r.shape[0] // r.length)
    for a in range(0, r.shape[0], step):
        if not _same_values(t[a:a + step], files.get_slice(key, a, a + step)):
            return False
        files.close()
        give_file_pages_back([t[a:a + step]])  # a reloaded tensor that maps the file: its pages read so far
    return True


def _stored_as(qw: QuantizedWeight, scheme) -> bool:
    if isinstance(scheme, FourBit):
        return (isinstance(qw, FourBitWeight) and qw.quant_type == scheme.format and qw.group_size == scheme.group_size
                and (qw.nested is not None) == scheme.double_quant)
    if isinstance(scheme, Int8):
        return isinstance(qw, Int8Weight)
    return isinstance(qw, KeptWeight) and qw.weight.dtype == scheme.dtype


def verify_export(folder: Path, model: nn.Module, plan: Plan, chosen: dict[str, QuantizedWeight], ids: torch.Tensor) -> ExportCheck:
    """Reload ``folder`` in a fresh model and require it to match ``model``; raise ExportCheckError if not.

    Exact where it can be: every quantized layer's codes and scales, and every other tensor of the
    reloaded model (weights kept in float, biases, norms, embeddings, buffers derived from the config
    such as rotary frequencies). Noise-aware where it cannot: logits on a fixed input (:func:`compare_logits`).
    """
    device_map = getattr(model, "hf_device_map", None)
    device_map = device_map if isinstance(device_map, dict) and len(set(device_map.values())) > 1 else None

    def exact(fresh):
        return _compare_layers(fresh, plan.entries, chosen) + _compare_float_tensors(fresh, model, {e.name for e in plan.entries if e.name in chosen})

    return _verify(folder, plan, ids, model_device(model), lambda: load_export(folder, model_device(model), plan.model_dtype, device_map),
                   exact, lambda fresh: logits_on(fresh, ids), lambda: logits_on(model, ids))


def verify_streamed_export(folder: Path, plan: Plan, ids: torch.Tensor, logits: torch.Tensor, device,
                           without_repacking: bool = False) -> ExportCheck:
    """:func:`verify_export` for a streamed run, which never holds the whole quantized model either: the
    checkpoint is reloaded one decoder layer at a time (:class:`~llmquant.stream.LayeredReload`), each layer's
    tensors compared with the files, and the logits it computes with those the quantized layers computed on
    ``ids`` while they were streamed (``without_repacking``: both without bitsandbytes' CPU repacking)."""
    from .stream import LayeredReload

    layers = [{"name": e.name, "format": e.label()} for e in plan.entries]
    schemes = {e.name: e.scheme for e in plan.entries if e.scheme is not None}
    first: list[torch.Tensor] = []

    def exact(reload):
        n = [0]
        others = tuple(f"{reload.stack}.{i}." for i in range(len(reload.layers)))

        def compare(model, prefix):
            keep = (lambda k: not k.startswith(others)) if prefix is None else (lambda k: k.startswith(prefix + "."))
            n[0] += _compare_with_files(model, folder, layers, keep, reload.reader, schemes)

        first.append(reload.run(ids, compare))
        return n[0]

    def candidate(reload):
        return first.pop() if first else reload.run(ids)

    return _verify(folder, plan, ids, torch.device(device),
                   lambda: LayeredReload(folder, plan.model_dtype, device, without_repacking), exact, candidate,
                   lambda: logits, not without_repacking)


def _verify(folder: Path, plan: Plan, ids: torch.Tensor, device, load, exact, candidate, reference,
            cpu_repacking: bool = True) -> ExportCheck:
    t0 = time.perf_counter()
    try:
        fresh = load()
        checked = exact(fresh)
    except ExportCheckError:
        raise
    except Exception as e:  # also a layer loaded later (streamed check), or tensors bitsandbytes cannot read
        raise ExportCheckError(f"the written checkpoint does not load: {type(e).__name__}: {str(e).strip()[:300]}") from None
    ref_logits: list[torch.Tensor] = []

    def remembered():
        ref_logits.append(reference())
        return ref_logits[-1]

    diff, tol, noise, attempts = compare_logits(remembered, lambda: candidate(fresh), plan.model_dtype)
    del fresh
    if not diff <= tol:
        raise ExportCheckError(
            f"the written checkpoint holds exactly the chosen tensors but does not compute like the quantized model: "
            f"max |logit difference| {diff:.3g} on a fixed input (tolerance {tol:.3g}, {attempts} attempts)"
        )
    return ExportCheck(diff, tol, checked, time.perf_counter() - t0,
                       probe_summary(ids, ref_logits[0], torch.device(device), cpu_repacking), noise, attempts)


def _compare_layers(fresh: nn.Module, entries, chosen: dict[str, QuantizedWeight]) -> int:
    """Check the reloaded layers hold exactly the chosen codes and scales (before any forward pass)."""
    import bitsandbytes as bnb

    n = 0
    for e in entries:
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
            if ok and isinstance(qw, KeptWeight):
                w = m.weight if is_linear(m) else m.weight.t()
                ok = _same_values(w, qw.weight)
            what = "a float layer" if qw is None else f"a float layer holding the kept {qw.weight.dtype} weight"
        if not ok:
            raise ExportCheckError(f"layer {e.name} did not reload as {what} with the exported values (got {type(m).__name__})")
        n += 1
    return n


def _compare_float_tensors(fresh: nn.Module, model: nn.Module, quantized: set[str]) -> int:
    """Every parameter and buffer of the reloaded model but quantized weights equals the in-memory model's."""
    ours = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    n = 0
    for name, t in [*fresh.named_parameters(remove_duplicate=False), *fresh.named_buffers(remove_duplicate=False)]:
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf == "weight":
            continue  # compared as codes and scales
        mine = ours.get(name)
        if mine is None or mine.device.type == "meta" or t.device.type == "meta":
            continue  # e.g. a buffer only the reloaded model creates
        if not _same_values(t, mine):
            raise ExportCheckError(f"tensor {name} did not reload with the exported values")
        n += 1
    return n


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values; a tensor cast to another float type on load is compared in the narrower type."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        narrow = min((a.dtype, b.dtype), key=lambda d: torch.finfo(d).bits if d.is_floating_point else 64)
        a, b = a.to(narrow), b.to(narrow)
    return torch.equal(a, b)


def _effective_scales(qs) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_blockwise

    if qs.nested:
        s = dequantize_blockwise(qs.absmax, qs.state2)
        s += qs.offset
        return s.float()
    return qs.absmax.float()
