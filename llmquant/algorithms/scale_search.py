"""Scale search: each block's stored scale chosen by the output error it causes on calibration inputs.

For 4-bit formats, every block (``group_size`` consecutive inputs of one row) tries
scales ``absmax * r`` for ``r`` in ``[min_ratio, 1]`` and keeps the one minimizing
``e H_bb eᵀ``, the error of that block's contribution to the layer's output over the
calibration tokens; codes are then the nearest points of bitsandbytes' code grid for
the scale as bitsandbytes will store it (after double quantization when that is on).
For int8, each row's scale is searched the same way against the whole ``H``.
Without calibration statistics the objective falls back to the plain weight error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quantized import FourBitWeight, Int8Weight, KeptWeight, NestedScales, QuantizedWeight, codebook, double_quantize
from ..schemes import FourBit, Int8, Keep
from . import Algorithm, register
from .grid import round_4bit, round_int8, search_block_scales, search_row_scales


@dataclass
class LayerStats:
    """What calibrated algorithms know about one layer's inputs."""

    hessian: torch.Tensor | None  # H = XᵀX / tokens, [in, in] float32
    tokens: int = 0
    options: dict | None = None  # method settings from the recipe's calibration section
    # whether the caller keeps no other reference to ``hessian``: an algorithm may then drop it (set it to None) once
    # it no longer needs it, and frees its memory during the rest of its work
    owned: bool = False


def stored_scales(scales: torch.Tensor, scheme: FourBit) -> tuple[torch.Tensor, NestedScales | None]:
    """Chosen block scales -> the scales bitsandbytes will dequantize with (8-bit codes when double_quant)."""
    flat = scales.reshape(-1).float()
    if not scheme.double_quant:
        return flat, None
    nested = double_quantize(flat)
    return nested.dequantize(), nested


def fourbit_with_scales(w: torch.Tensor, scales: torch.Tensor, scheme: FourBit, dtype: torch.dtype) -> FourBitWeight:
    """Nearest codes for chosen block scales (``[out, in / group]``), as bitsandbytes will store them."""
    eff, nested = stored_scales(scales, scheme)
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // scheme.group_size, scheme.group_size)
    codes, _ = round_4bit(blocks, eff.view(out_f, -1), codebook(scheme.format, w.device))
    return FourBitWeight(codes.reshape(out_f, in_f).to(torch.uint8), eff, scheme.format, scheme.group_size, dtype, nested)


def int8_with_scales(w: torch.Tensor, scb: torch.Tensor, scheme: Int8) -> Int8Weight:
    codes, _ = round_int8(w.float(), scb.float())
    return Int8Weight(codes=codes, scb=scb.float().contiguous(), threshold=scheme.threshold)


@register("scale_search")
class ScaleSearch(Algorithm):
    calibrated = True

    def quantize(self, weight: torch.Tensor, scheme, dtype: torch.dtype, stats: LayerStats | None = None) -> QuantizedWeight:
        w = weight.detach().float()
        h = stats.hessian.to(w.device) if stats is not None and stats.hessian is not None else None
        opts = (stats.options or {}) if stats is not None else {}
        if isinstance(scheme, FourBit):
            scales = search_block_scales(w, h, scheme.group_size, scheme.format, opts.get("grid", 20), opts.get("min_ratio", 0.5))
            return fourbit_with_scales(w, scales, scheme, dtype)
        if isinstance(scheme, Int8):
            return int8_with_scales(w, search_row_scales(w, h), scheme)
        assert isinstance(scheme, Keep)
        return KeptWeight(weight.detach().to(scheme.dtype))
