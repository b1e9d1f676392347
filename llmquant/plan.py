"""Rules -> a format for every Linear layer, checked against the model before any heavy work.

The plan also knows what the checkpoint will weigh (tensor by tensor, so the
estimate matches the written files) and which ``quantization_config`` the export
gets: the stock bitsandbytes one when stock transformers can load it, ours otherwise.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UserError
from .recipe import Quantization
from .schemes import (
    BNB_BLOCKSIZES, CPU_4BIT_ROW_TILE, DTYPE_NAMES, NESTED_BLOCKSIZE, FourBit, Int8, Keep,
)

LLMQUANT_METHOD = "llmquant"
FORMAT_VERSION = 1
# A safetensors header entry is about this long besides the tensor's name.
HEADER_BYTES_PER_TENSOR = 72


def _quant_state_json_bytes(s: FourBit, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Length of the packed QuantState JSON stored beside a 4-bit weight (see
    :func:`llmquant.backends.bnb.quant_state_json_length`): exact, so every tensor of the export is known before
    any is made."""
    from .backends.bnb import quant_state_json_length

    return quant_state_json_length(s.format, s.group_size, dtype, shape, s.double_quant)


def matches(pattern: str, name: str) -> bool:
    """``re:REGEX`` matches the whole name; anything else is a shell glob (``*`` crosses dots)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


# nn.Linear subclasses of transformers' models that compute exactly ``x Wᵀ + b`` (only written differently): llmquant
# quantizes them, and writes their checkpoints in its own format, whose loading replaces them (stock transformers
# replaces nn.Linear itself alone). Other subclasses (routers, grouped or decoupled layers) compute something else
# and are left alone.
PLAIN_LINEAR_SUBCLASSES = {"FalconLinear"}


def is_linear(module: nn.Module) -> bool:
    """A plain Linear layer: ``nn.Linear`` itself or one of :data:`PLAIN_LINEAR_SUBCLASSES`."""
    return type(module) is nn.Linear or (isinstance(module, nn.Linear) and type(module).__name__ in PLAIN_LINEAR_SUBCLASSES)


def quantizable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return is_linear(module) or isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features); GPT-2's Conv1D stores its weight transposed."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_linear(module) else (w.shape[1], w.shape[0])


@dataclass
class PlanEntry:
    name: str
    layer: str  # class name of the original layer (Linear, Conv1D)
    out_features: int
    in_features: int
    has_bias: bool
    scheme: Int8 | FourBit | Keep | None  # None: ignored, left exactly as loaded
    method: str | None
    source: str  # what decided the format: "ignore", "rule 2 (*.mlp.*)", "default"
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def quantized(self) -> bool:
        return self.scheme is not None and self.scheme.quantized

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(shape, dtype) for shape, dtype in self.tensors.values())

    def label(self) -> str:
        return "unchanged" if self.scheme is None else self.scheme.label()


@dataclass
class Plan:
    entries: list[PlanEntry]
    model_dtype: torch.dtype
    other_tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # everything outside planned layers
    float_bytes: int  # the whole model in its dtype, before quantization

    @property
    def quantized_entries(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.quantized]

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every tensor of the checkpoint, in the export's order: each planned layer's (as bitsandbytes saves them),
        then everything else."""
        specs = {}
        for e in self.entries:
            specs.update({f"{e.name}.{k}": v for k, v in e.tensors.items()})
        return specs | {k: v for k, v in self.other_tensors.items() if k not in specs}

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(s, d) for s, d in self.tensor_specs().values())

    def file_bytes_estimate(self) -> int:
        """Expected size of the safetensors files (data plus headers)."""
        specs = self.tensor_specs()
        return self.total_bytes + sum(len(n) + HEADER_BYTES_PER_TENSOR for n in specs)

    def linear_bits_per_weight(self) -> float:
        """Average stored bits per weight (scales included, biases not) over the layers given a format."""
        chosen = [e for e in self.entries if e.scheme is not None]
        n = sum(e.numel for e in chosen)
        bias = [e.out_features * _dsize(self.model_dtype) if e.has_bias else 0 for e in chosen]
        return 8 * (sum(e.nbytes for e in chosen) - sum(bias)) / max(n, 1)

    def model_bits_per_weight(self) -> float:
        n_params = sum(math.prod(s) for name, (s, _) in self.other_tensors.items()) + sum(
            e.numel + (e.out_features if e.has_bias else 0) for e in self.entries
        )
        return 8 * self.total_bytes / max(n_params, 1)

    # ---- the checkpoint's quantization_config ----------------------------------

    def stock_compatible(self, keep_in_fp32: list[str] | None = None) -> bool:
        """Can stock transformers + bitsandbytes load this checkpoint with no llmquant installed?

        One INT8 format for every quantized layer, or 4-bit layers only, in any mix of NF4/FP4, block sizes
        and double quantization: bitsandbytes reads a 4-bit layer's type, block size and double quantization
        from the ``quant_state`` stored beside each weight, not from the config."""
        schemes = {e.scheme for e in self.quantized_entries}
        if not (all(isinstance(s, FourBit) for s in schemes) or (len(schemes) == 1 and isinstance(next(iter(schemes)), Int8))):
            return False
        # Stock transformers loads a skipped layer's weight in its stored dtype (no cast to the
        # model's), so a layer kept as fp16 in an fp32 model would not run there.
        if any(isinstance(e.scheme, Keep) and e.scheme.dtype != self.model_dtype for e in self.entries):
            return False
        # Stock transformers replaces nn.Linear and Conv1D alone, not their subclasses (Falcon's FalconLinear).
        if any(e.layer in PLAIN_LINEAR_SUBCLASSES for e in self.quantized_entries):
            return False
        # Stock transformers never quantizes a model's keep-in-fp32 modules.
        from .compat import internal

        should_convert_module = internal("transformers.quantizers.quantizers_utils:should_convert_module")
        return all(should_convert_module(e.name, keep_in_fp32 or []) for e in self.quantized_entries)

    def quantization_config(self, keep_in_fp32: list[str] | None = None) -> dict | None:
        if not self.quantized_entries:
            return None
        if self.stock_compatible(keep_in_fp32):
            return self._stock_config()
        return self.llmquant_config()

    def _stock_config(self) -> dict:
        from transformers import BitsAndBytesConfig

        skip = [e.name for e in self.entries if not e.quantized]
        first = self.quantized_entries[0].scheme
        if isinstance(first, Int8):
            cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=first.threshold, llm_int8_skip_modules=skip)
        else:  # the config names the 4-bit type and double quantization most weights have
            weights: dict[tuple[str, bool], int] = {}
            for e in self.quantized_entries:
                key = (e.scheme.format, e.scheme.double_quant)
                weights[key] = weights.get(key, 0) + e.numel
            quant_type, dq = max(weights, key=weights.get)
            cfg = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=dq,
                bnb_4bit_compute_dtype=self.model_dtype, llm_int8_skip_modules=skip,
            )
        return cfg.to_dict()

    def llmquant_config(self) -> dict:
        groups: dict[str, dict] = {}
        for e in self.entries:
            if e.scheme is None:
                continue
            key = e.scheme.model_dump_json()
            groups.setdefault(key, {**e.scheme.model_dump(), "modules": []})["modules"].append(e.name)
        return {
            "quant_method": LLMQUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "compute_dtype": str(self.model_dtype).removeprefix("torch."),
            "groups": list(groups.values()),
        }


def _dsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * _dsize(dtype)


def entry_tensors(e: PlanEntry, model_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensors (relative name -> shape, dtype) one planned layer is saved as."""
    s, n, out = e.scheme, e.numel, e.out_features
    t: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if isinstance(s, FourBit):  # in the order bitsandbytes' QuantState.as_dict(packed=True) gives them
        blocks = n // s.group_size
        t["weight"] = (((n + 1) // 2, 1), torch.uint8)
        t["weight.absmax"] = ((blocks,), torch.uint8 if s.double_quant else torch.float32)
        t["weight.quant_map"] = ((16,), torch.float32)
        if s.double_quant:
            t["weight.nested_absmax"] = ((math.ceil(blocks / NESTED_BLOCKSIZE),), torch.float32)
            t["weight.nested_quant_map"] = ((256,), torch.float32)
        t[f"weight.quant_state.bitsandbytes__{s.format}"] = ((_quant_state_json_bytes(s, (out, e.in_features), model_dtype),), torch.uint8)
    elif isinstance(s, Int8):
        t["weight"] = ((out, e.in_features), torch.int8)
        t["SCB"] = ((out,), torch.float32)
        t["weight_format"] = ((), torch.uint8)
    else:  # a float weight keeps its layer's own layout (GPT-2's Conv1D stores [in, out])
        dtype = s.dtype if isinstance(s, Keep) else model_dtype
        t["weight"] = ((out, e.in_features) if e.layer != "Conv1D" else (e.in_features, out), dtype)
    if e.has_bias:
        t["bias"] = ((out,), model_dtype)
    return t


def output_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def row_tile(device: torch.device) -> int | None:
    """The output-row multiple 4-bit layers need where they run: bitsandbytes' CPU kernel tiles rows by 32; its CUDA
    kernels take any width."""
    return CPU_4BIT_ROW_TILE if device.type == "cpu" else None


def build_plan(model: nn.Module, q: Quantization, model_dtype: torch.dtype, tile: int | None = CPU_4BIT_ROW_TILE) -> Plan:
    """Assign a format to every Linear layer; raise :class:`UserError` on anything that cannot work (``tile``: see
    :func:`row_tile`)."""
    layers = {n: m for n, m in model.named_modules() if quantizable(m)}
    if not layers:
        raise UserError(f"{type(model).__name__} has no Linear layers to quantize")
    _refuse_fused_experts(model)
    owners = {n: m for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None}

    head = output_head_name(model)
    ignore = q.ignore if q.ignore is not None else ([head] if head in layers else [])
    for pattern in ignore:
        if not any(matches(pattern, n) for n in layers):
            raise UserError(f"quantization.ignore: {pattern!r} {_matches_nothing(pattern, owners, layers)}")
    ignored = {n for n in layers if any(matches(p, n) for p in ignore)}

    for i, rule in enumerate(q.rules):
        hit = [n for n in layers if any(matches(p, n) for p in rule.match)]
        where = f"quantization.rules[{i}] (match {', '.join(rule.match)})"
        if not hit:
            pat = rule.match[0] if len(rule.match) == 1 else rule.match
            raise UserError(f"{where}: {_matches_nothing(str(pat), owners, layers, rule.match)}")
        if all(n in ignored for n in hit):
            raise UserError(f"{where} matches only ignored layers ({hit[0]}...); remove them from quantization.ignore or drop the rule")

    tied = _tied_layers(model, layers)
    entries = []
    for name, module in layers.items():
        out_f, in_f = linear_shape(module)
        if name in ignored:
            scheme, method, source = None, None, "ignore"
        else:
            idx = next((i for i, r in enumerate(q.rules) if any(matches(p, name) for p in r.match)), None)
            if idx is None:
                scheme, method, source = q.default, q.method, "default"
            else:
                r = q.rules[idx]
                scheme, method, source = r.scheme, r.method or q.method, f"rule {idx}"
        e = PlanEntry(name, type(module).__name__, out_f, in_f, module.bias is not None, scheme, method, source)
        _check_entry(e, model_dtype, tied, tile)
        e.tensors = entry_tensors(e, model_dtype)
        if name in tied:  # transformers saves a tied weight once, under the other module's name
            e.tensors.pop("weight")
        entries.append(e)

    planned = set(layers)
    other: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    float_bytes = 0
    for pname, p in model.named_parameters():  # tied parameters appear once
        float_bytes += p.numel() * p.element_size()
        owner = pname.rsplit(".", 1)[0]
        if owner not in planned:
            other[pname] = (tuple(p.shape), p.dtype)
    for bname, b in _persistent_buffers(model):
        other[bname] = (tuple(b.shape), b.dtype)
        float_bytes += b.numel() * b.element_size()
    return Plan(entries, model_dtype, other, float_bytes)


def _refuse_fused_experts(model: nn.Module) -> None:
    """Mixture-of-experts models in transformers 5 keep all experts of a layer in fused 3-D tensors
    (``experts.gate_up_proj [experts, 2 * inter, hidden]``). bitsandbytes' layers hold 2-D Linear weights only,
    so such experts can be neither quantized nor stored in a bitsandbytes checkpoint; leaving them in float
    would keep almost the whole model's size while calling it quantized."""
    for name, p in model.named_parameters():
        if p.dim() != 3:
            continue
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if "expert" in name:
            what = "keeps its experts as fused 3-D tensors"
            why = "so llmquant cannot quantize mixture-of-experts models yet (quantize a dense model)"
        elif isinstance(owner, nn.Conv1d):
            what = "has convolution layers (state-space or hybrid blocks, as in Mamba)"
            why = "and its layers are not one stack of identical decoder layers llmquant can walk; llmquant quantizes transformer decoders"
        else:
            what = f"has 3-D weights in {type(owner).__name__} layers"
            why = "so llmquant cannot quantize this architecture"
        raise UserError(f"{type(model).__name__} {what} ({name} {tuple(p.shape)}); bitsandbytes formats hold only 2-D "
                        f"Linear weights, {why}")


def _persistent_buffers(model: nn.Module):
    for mname, m in model.named_modules():
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set:
                yield (f"{mname}.{bname}" if mname else bname), b


def _tied_layers(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Layer name -> name of another module sharing its weight (tied embeddings)."""
    by_id: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None:
            by_id.setdefault(id(w), []).append(n)
    out = {}
    for n, m in layers.items():
        others = [o for o in by_id.get(id(m.weight), []) if o != n]
        if others:
            out[n] = others[0]
    return out


def _check_entry(e: PlanEntry, model_dtype: torch.dtype, tied: dict[str, str], tile: int | None) -> None:
    s = e.scheme
    if s is None:
        return
    if e.name in tied:
        raise UserError(
            f"{e.name} shares its weight with {tied[e.name]} (tied embeddings), so it cannot be given format "
            f"{s.format}; leave it in quantization.ignore (the default)"
        )
    if isinstance(s, FourBit):
        if e.in_features % s.group_size:
            fits = [str(b) for b in BNB_BLOCKSIZES if e.in_features % b == 0]
            allowed = ", ".join(fits) if fits else "none (use int8 or a float format for it)"
            raise UserError(
                f"{e.name} ({e.source}): group_size {s.group_size} does not divide its {e.in_features} inputs; "
                f"block sizes that fit it: {allowed}"
            )
        if tile and e.out_features % tile:
            raise UserError(
                f"{e.name} ({e.source}): {s.format} needs out_features divisible by {tile} on CPU "
                f"(bitsandbytes' CPU kernel), it has {e.out_features}; give it int8 or a float format, or run on a GPU"
            )
    if isinstance(s, Keep) and s.dtype.itemsize > model_dtype.itemsize:
        raise UserError(
            f"{e.name} ({e.source}): format {s.format} is wider than the model's dtype "
            f"{DTYPE_NAMES.get(model_dtype, model_dtype)}; a kept layer computes in the model's dtype, "
            f"so load the model in {s.dtype} (model.dtype) or keep it in a narrower format"
        )


def _matches_nothing(pattern: str, owners: dict, layers: dict, patterns: list[str] | None = None) -> str:
    pats = patterns or [pattern]
    other = [n for n in owners if n not in layers and any(matches(p, n) for p in pats)]
    example = next(iter(layers))
    if other:
        kind = type(owners[other[0]]).__name__
        return (
            f"matches no Linear layer: it matches {other[0]}, a {kind}, which cannot be quantized "
            f"(Linear and Conv1D layers can; names look like {example})"
        )
    return f"matches no Linear layer of this model (names look like {example}; patterns are globs or re:REGEX)"
