"""Chosen weights <-> bitsandbytes modules and checkpoint tensors.

Modules are built through the same bitsandbytes calls transformers uses when it
loads a pre-quantized checkpoint (``Params4bit.from_prequantized``, ``Int8Params``),
so the in-memory quantized model and a model reloaded from our export are made
the same way. Checkpoint tensors come from our canonical codes and scales, never
from a module's ``state_dict()`` (see :func:`cpu_packed`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantized import FourBitWeight, Int8Weight, KeptWeight, NestedScales, QuantizedWeight, pack_4bit, unpack_4bit
from ..schemes import NESTED_BLOCKSIZE

# Tensor names beside a 4-bit weight (bitsandbytes' QuantState.as_dict(packed=True)).
FOURBIT_SUFFIXES = (
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
)
INT8_SUFFIXES = ("SCB", "weight_format")


def quant_state(qw: FourBitWeight):
    """bitsandbytes' QuantState for a chosen 4-bit weight (no re-quantization)."""
    from bitsandbytes.functional import QuantState

    from ..quantized import codebook

    if qw.nested is None:
        return QuantState(
            absmax=qw.scales.contiguous(),
            shape=torch.Size(qw.shape),
            code=codebook(qw.quant_type, qw.scales.device),
            blocksize=qw.group_size,
            quant_type=qw.quant_type,
            dtype=qw.dtype,
        )
    n = qw.nested
    state2 = QuantState(absmax=n.absmax, code=n.code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return QuantState(
        absmax=n.codes,
        shape=torch.Size(qw.shape),
        code=codebook(qw.quant_type, qw.scales.device),
        blocksize=qw.group_size,
        quant_type=qw.quant_type,
        dtype=qw.dtype,
        offset=n.offset,
        state2=state2,
    )


# the longest repr of a float (a double), which the double-quantization offset in the packed JSON is written as
_LONGEST_FLOAT = -2.2250738585072014e-308


def quant_state_json_length(quant_type: str, blocksize: int, dtype: torch.dtype, shape, double_quant: bool) -> int:
    """Bytes of the packed QuantState JSON (``quant_state.bitsandbytes__nf4``) a 4-bit weight is saved with.

    bitsandbytes writes ``json.dumps`` of the QuantState's non-tensor fields. Without double quantization they are all
    known from the format; with it, the offset's digits depend on its value, so :func:`checkpoint_tensors` pads the JSON
    with spaces (which JSON allows and bitsandbytes' ``json.loads`` reads past) to the length of the longest offset: every
    tensor of an export then has a size known before any weight is quantized."""
    import json

    d = {"quant_type": quant_type, "blocksize": blocksize, "dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
    if double_quant:
        d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=_LONGEST_FLOAT)
    return len(json.dumps(d).encode())


def checkpoint_tensors(qw: QuantizedWeight, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors one quantized layer's weight is saved as, under bitsandbytes' key names (a double-quantized
    weight's packed JSON padded to its planned length: :func:`quant_state_json_length`)."""
    if isinstance(qw, FourBitWeight):
        out = {f"{prefix}weight": pack_4bit(qw.codes)}
        for k, v in quant_state(qw).as_dict(packed=True).items():
            if k.startswith("quant_state.") and qw.nested is not None:
                n = quant_state_json_length(qw.quant_type, qw.group_size, qw.dtype, qw.shape, True) - v.numel()
                v = torch.cat([v, torch.full((n,), ord(" "), dtype=torch.uint8, device=v.device)]) if n > 0 else v
            out[f"{prefix}weight.{k}"] = v
        return out
    if isinstance(qw, Int8Weight):
        return {
            f"{prefix}weight": qw.codes,
            f"{prefix}SCB": qw.scb,
            # bitsandbytes' marker for the row-major layout (the only one it still writes)
            f"{prefix}weight_format": torch.tensor(0, dtype=torch.uint8),
        }
    return {f"{prefix}weight": qw.weight}


def read_weight(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Inverse of :func:`checkpoint_tensors` (keys without the module prefix)."""
    from bitsandbytes.functional import QuantState

    if "SCB" in tensors:
        return Int8Weight(codes=tensors["weight"], scb=tensors["SCB"].float(), threshold=0.0)
    stats = {k: v for k, v in tensors.items() if k.startswith("weight.")}
    if not stats:
        return KeptWeight(tensors["weight"])
    qs = QuantState.from_dict({k: v for k, v in stats.items()}, device=torch.device("cpu"))
    check_absmax(qs, "checkpoint")
    shape = tuple(qs.shape)
    codes = unpack_4bit(tensors["weight"], shape)
    if qs.nested:
        nested = NestedScales(codes=qs.absmax, absmax=qs.state2.absmax, code=qs.state2.code, offset=qs.offset)
        scales = nested.dequantize()
    else:
        nested, scales = None, qs.absmax.float()
    return FourBitWeight(
        codes=codes, scales=scales, quant_type=qs.quant_type, group_size=qs.blocksize, dtype=dtype or qs.dtype, nested=nested
    )


def check_absmax(qs, where: str) -> None:
    """Refuse 4-bit scales in the layout bitsandbytes' CPU kernel uses internally.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` rewrites its QuantState in place
    (``absmax`` becomes a transposed ``[blocks_per_row, rows]`` bfloat16 tensor) and
    ``Linear4bit._save_to_state_dict`` restores the weight bytes but not ``absmax``.
    A checkpoint saved that way dequantizes every block with another block's scale.
    """
    n_blocks = qs.shape.numel() // qs.blocksize
    expected_dtype = torch.uint8 if qs.nested else torch.float32
    if qs.absmax.dim() != 1 or qs.absmax.numel() != n_blocks or qs.absmax.dtype != expected_dtype:
        raise ValueError(
            f"{where}: 4-bit scales have shape {tuple(qs.absmax.shape)} and dtype {qs.absmax.dtype}, expected "
            f"({n_blocks},) {expected_dtype}; this checkpoint was saved from a bitsandbytes model whose weights "
            "had been repacked for the CPU kernel, and its scales are scrambled"
        )


def build_module(qw: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype, device) -> nn.Module:
    """A bitsandbytes layer holding exactly ``qw`` (kept weights stay in their own module)."""
    import bitsandbytes as bnb

    out_f, in_f = qw.shape
    device = torch.device(device)
    if isinstance(qw, FourBitWeight):
        with torch.device("meta"):
            m = bnb.nn.Linear4bit(
                in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                compress_statistics=qw.nested is not None, quant_type=qw.quant_type, quant_storage=torch.uint8,
            )
        tensors = checkpoint_tensors(qw, "")
        data = tensors.pop("weight")
        stats = {k.removeprefix("weight."): v.to(device) for k, v in tensors.items()}
        m.weight = bnb.nn.Params4bit.from_prequantized(
            data=data.to(device), quantized_stats=stats, requires_grad=False, device=device, module=m
        )
        remember_scales(m)
    elif isinstance(qw, Int8Weight):
        with torch.device("meta"):
            m = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=qw.threshold)
        w = bnb.nn.Int8Params(qw.codes.to(device), requires_grad=False, has_fp16_weights=False)
        w.CB, w.SCB = w.data, qw.scb.to(device)
        m.weight = w
    else:
        raise TypeError(f"not a quantized weight: {type(qw).__name__}")
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False)
    m.requires_grad_(False)
    return m.eval()


def unlink(model: nn.Module) -> None:
    """Break the reference cycles bitsandbytes' 4-bit layers are made with (a ``Params4bit`` keeps its layer in
    ``.module``, the layer keeps it as ``.weight``), so that a layer dropped from a model is freed at once rather than
    when Python's cycle collector next runs (a decoder layer of a 1B model: 27 MB each, two or three layers at once)."""
    for m in model.modules():
        w = m._parameters.get("weight")
        if getattr(w, "module", None) is not None:
            w.module = None


def cpu_packed(module: nn.Module) -> bool:
    """Whether bitsandbytes has repacked this 4-bit layer for its CPU kernel (its state_dict() is then lossy)."""
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


def without_cpu_repacking(model: nn.Module) -> nn.Module:
    """Have the 4-bit layers compute from their stored layout on the CPU (no AVX512-BF16 repacked copy).

    The repacked copy is a second copy of every 4-bit weight in memory; a check that only needs a few
    tokens computed the same way on both sides does without it.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


# ---- keeping 4-bit layers exact across bitsandbytes' CPU repacking ------------------------


def remember_scales(module: nn.Module) -> None:
    """Keep a reference to a 4-bit layer's exact scales before the CPU kernel replaces them.

    On AVX512-BF16 CPUs the first forward rewrites ``quant_state.absmax`` as a
    transposed bfloat16 copy (and drops the double-quantization state); the
    references kept here let :func:`safe_state_dict` write the exact originals.
    """
    qs = module.weight.quant_state
    module._llmquant_scales = (qs.absmax, qs.dtype, qs.nested, qs.offset, getattr(qs, "state2", None))


def _restore_scales(module: nn.Module) -> None:
    qs = module.weight.quant_state
    qs.absmax, qs.dtype, qs.nested, qs.offset, state2 = module._llmquant_scales
    qs.state2 = state2
    qs.packing_format_for_cpu = False


def safe_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with exact 4-bit scales even after bitsandbytes' CPU repacking.

    bitsandbytes' ``Linear4bit._save_to_state_dict`` unpacks the weight bytes exactly but
    leaves ``absmax`` in the CPU kernel's layout; we put back the scales remembered at
    load time, in the module and in the returned dict.
    """
    import bitsandbytes as bnb

    sd = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "_llmquant_scales"):
            _restore_scales(m)
            prefix = f"{name}.weight." if name else "weight."
            for k in [k for k in sd if k.startswith(prefix)]:
                del sd[k]
            for k, v in m.weight.quant_state.as_dict(packed=True).items():
                sd[prefix + k] = v
    return sd
