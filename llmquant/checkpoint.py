"""Reading and checking a checkpoint folder without loading the model.

``describe(folder)`` reads config.json and the safetensors headers (and the few small
tensors that describe bitsandbytes formats): each layer's format, group size, bytes and
bits per weight, and whether plain transformers can load it. ``problems`` lists what
is wrong, each as one line: a damaged or truncated file, a missing shard, a file
changed since llmquant wrote it (checksums in llmquant.json), tensors that do not match
config.json, 4-bit scales in bitsandbytes' CPU layout (the save_pretrained defect).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .assets import sha256_file
from .errors import UserError

MARKER = "llmquant.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_FOURBIT_KEYS = ("weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")


@dataclass
class Layer:
    name: str
    format: str  # "nf4", "fp4", "int8", or a float type ("float16", ...)
    shape: tuple[int, int]  # (out, in)
    bytes: int
    group_size: int | None = None
    double_quant: bool | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(math.prod(self.shape), 1)


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    files: dict[str, int]  # safetensors file -> bytes
    tensors: dict[str, tuple[str, tuple[int, ...], int]]  # name -> (dtype, shape, bytes)
    layers: list[Layer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def quant_method(self) -> str | None:
        q = self.config.get("quantization_config")
        return q.get("quant_method") if isinstance(q, dict) else None

    @property
    def loads_with(self) -> str:
        m = self.quant_method
        if m in (None, "bitsandbytes"):
            return "plain transformers" + (" + bitsandbytes" if m else "")
        if m == "llmquant":
            return "transformers after `import llmquant`"
        return f"transformers with {m} support"

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent}: no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None


def file_digests(folder: Path) -> dict[str, dict]:
    """What llmquant.json records of each weight file, to detect later changes."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(Path(folder).glob("*.safetensors"))}


def describe(folder: str | Path, checksums: bool = True) -> Checkpoint:
    """Everything about a checkpoint that its files tell, without loading it (raises UserError if unreadable)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{str(folder)!r} is not a folder")
    config = _read_json(folder / "config.json", "a transformers checkpoint has one")
    problems: list[str] = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "the shard index").get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            problems.append(f"shard {missing[0]} listed in model.safetensors.index.json is missing ({len(missing)} of {len(shards)} missing)")
        shards = [s for s in shards if s not in missing]
    else:
        shards = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
        if not shards:
            if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
                raise UserError(f"{folder}: weights are pickle files (.bin); only safetensors are read")
            raise UserError(f"{folder}: no model.safetensors (nor a shard index)")

    tensors: dict[str, tuple[str, tuple[int, ...], int]] = {}
    small: dict[str, object] = {}
    files: dict[str, int] = {}
    for s in shards:
        path = folder / s
        files[s] = path.stat().st_size
        try:
            with safe_open(str(path), "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    shape = tuple(sl.get_shape())
                    dtype = sl.get_dtype()
                    tensors[k] = (dtype, shape, math.prod(shape) * _DTYPE_BYTES.get(dtype, 1))
                    if k.endswith(_FOURBIT_KEYS) or k.endswith(".weight.absmax"):
                        small[k] = f.get_tensor(k)
        except SafetensorError as e:
            problems.append(f"{s} is damaged: {str(e).splitlines()[0]}")
    if index.is_file():
        unlisted = [k for k, v in weight_map.items() if v in files and k not in tensors]
        if unlisted:
            problems.append(f"model.safetensors.index.json lists {unlisted[0]} but its shard does not hold it")

    ck = Checkpoint(folder, config, files, tensors, problems=problems)
    ck.layers = _layers(ck, small)
    marker = folder / MARKER
    if checksums and marker.is_file():
        recorded = _read_json(marker, "llmquant's record").get("files") or {}
        for name, rec in recorded.items():
            p = folder / name
            if not p.is_file():
                continue  # reported as a missing shard above
            if p.stat().st_size != rec.get("bytes") or sha256_file(p) != rec.get("sha256"):  # the clearest cause: first
                problems.insert(0, f"{name} differs from what llmquant wrote (sha256 in {MARKER}); it was changed or corrupted")
    if not ck.problems:
        ck.problems += _structure_problems(ck)
    return ck


def _layers(ck: Checkpoint, small: dict) -> list[Layer]:
    from bitsandbytes.utils import unpack_tensor_to_dict

    layers, scrambled = [], []
    for name, (dtype, shape, nbytes) in ck.tensors.items():
        if not name.endswith(".weight") or len(shape) != 2:  # (packed 4-bit weights are [n/2, 1])
            continue
        prefix = name[: -len(".weight")]
        mine = {k: v for k, v in ck.tensors.items() if k == name or k.startswith(name + ".") or k == f"{prefix}.SCB" or k == f"{prefix}.weight_format"}
        size = sum(v[2] for v in mine.values())
        qs_key = next((name + k[6:] for k in _FOURBIT_KEYS if name + k[6:] in ck.tensors), None)
        if qs_key is not None and qs_key in small:
            try:
                meta = unpack_tensor_to_dict(small[qs_key])
            except (ValueError, UnicodeDecodeError):  # (json errors are ValueErrors)
                ck.problems.append(f"{prefix}: the description of its 4-bit format is unreadable (damaged)")
                continue
            out_in = tuple(meta["shape"])
            absmax = small.get(name + ".absmax")
            nested = "nested_absmax" in {k.rsplit(".", 1)[-1] for k in mine}
            if absmax is not None:
                blocks = math.prod(out_in) // meta["blocksize"]
                want = "uint8" if nested else "float32"
                if absmax.dim() != 1 or absmax.numel() != blocks or str(absmax.dtype).removeprefix("torch.") != want:
                    scrambled.append(f"{prefix} has shape {tuple(absmax.shape)} {str(absmax.dtype).removeprefix('torch.')}, expected ({blocks},) {want}")
            layers.append(Layer(prefix, meta["quant_type"], out_in, size, meta["blocksize"], nested))
        elif f"{prefix}.SCB" in ck.tensors:
            layers.append(Layer(prefix, "int8", shape, size))
        elif len(shape) == 2 and dtype in ("F32", "F16", "BF16"):
            fmt = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
            layers.append(Layer(prefix, fmt, shape, size))
    if scrambled:
        ck.problems.append(
            f"the 4-bit scales of {len(scrambled)} layers are scrambled (saved from a model bitsandbytes had repacked "
            f"for its CPU kernel): {scrambled[0]}"
        )
    return layers


def _structure_problems(ck: Checkpoint) -> list[str]:
    """Compare the tensors with what config.json describes (a model built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(ck.config)
    cfg.pop("quantization_config", None)
    try:
        config = AutoConfig.for_model(**cfg) if "model_type" in cfg else None
    except (ValueError, KeyError, TypeError) as e:
        return [f"config.json cannot be read by transformers: {str(e).splitlines()[0]}"]
    if config is None or cfg.get("auto_map"):
        return []  # custom code: the structure check would need to run it
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an architecture this transformers does not know
        return [f"config.json describes a model transformers cannot build: {str(e).splitlines()[0]}"]
    layers = {l.name: l for l in ck.layers}
    expected: dict[str, tuple] = {}
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
        tied |= set(model.all_tied_weights_keys)
    for pname, p in model.named_parameters(remove_duplicate=False):
        expected[pname] = tuple(p.shape)
    for mname, m in model.named_modules():
        for bname, b in m.named_buffers(recurse=False):
            if bname not in m._non_persistent_buffers_set:
                expected[f"{mname}.{bname}" if mname else bname] = tuple(b.shape)
    renamed = model_names(model, list(ck.tensors), set(expected))
    tensors = {renamed.get(k, k): v for k, v in ck.tensors.items()}
    problems = []
    missing = []
    for name, shape in expected.items():
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if name in tensors:
            if prefix in layers and layers[prefix].format in ("nf4", "fp4"):
                want = layers[prefix].shape
                if math.prod(want) != math.prod(shape):
                    problems.append(f"{prefix}: the weights hold a {want[0]}x{want[1]} layer, config.json describes {shape}")
            elif tensors[name][1] != shape:
                problems.append(f"{name}: shape {tensors[name][1]} in the weights, {shape} by config.json (they do not match)")
        elif name not in tied:
            missing.append(name)
    if missing:
        problems.append(f"config.json describes tensors the weights do not have: {missing[0]} ({len(missing)} missing)")
    known = set(expected)
    extra = [k for k in tensors if k not in known and not _is_quant_state(k, known)]
    if extra:
        problems.append(f"the weights hold tensors config.json does not describe: {extra[0]} ({len(extra)} in all)")
    return problems[:5]


def model_names(model, keys, wanted: set[str]) -> dict[str, str]:
    """The checkpoint's tensor names (``keys``) that transformers renames when it loads ``model``, each to the model's
    name for it (GPT-NeoX's ``embed_out.weight`` is the model's ``lm_head.weight``): transformers' own plain renamings
    for the model, kept where the new name is one of ``wanted`` (the model's) and the old one is not."""
    from .compat import internal

    try:
        get_model_conversion_mapping = internal("transformers.conversion_mapping:get_model_conversion_mapping")
        WeightRenaming = internal("transformers.core_model_loading:WeightRenaming")
    except UserError:  # a transformers without renamings: names as stored
        return {}
    renamings = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    out = {}
    for key in keys:
        new = key
        for t in renamings:
            new = t.rename_source_key(new)[0]
        if new != key and new in wanted and key not in wanted:
            out[key] = new
    return out


def _is_quant_state(name: str, known: set[str]) -> bool:
    if ".weight." in name:
        return name.split(".weight.")[0] + ".weight" in known
    base, _, leaf = name.rpartition(".")
    return leaf in ("SCB", "weight_format") and f"{base}.weight" in known


def check(folder: str | Path, checksums: bool = True) -> Checkpoint:
    """:func:`describe`, raising a one-line UserError on the first problem."""
    ck = describe(folder, checksums)
    if ck.problems:
        more = f" (and {len(ck.problems) - 1} more problems)" if len(ck.problems) > 1 else ""
        raise UserError(f"{ck.folder}: {ck.problems[0]}{more}")
    return ck
