"""Round to nearest: exactly what bitsandbytes does when it quantizes a layer itself."""

from __future__ import annotations

import torch

from ..quantized import FourBitWeight, Int8Weight, KeptWeight, NestedScales, QuantizedWeight, unpack_4bit
from ..schemes import FourBit, Int8, Keep
from . import Algorithm, register


def rtn_4bit(weight: torch.Tensor, scheme: FourBit, dtype: torch.dtype) -> FourBitWeight:
    """bitsandbytes' own ``quantize_4bit`` on the weight in the compute dtype, as stock transformers does it.

    Note the stock behaviour with ``double_quant``: codes are chosen for the exact
    block scale, then the scale is stored in 8 bits, so codes and stored scale disagree slightly.
    """
    from bitsandbytes.functional import quantize_4bit

    from ..quantized import double_quantize

    w = weight.detach().to(dtype).contiguous()
    # Blocks never cross rows (the group size divides the inputs), so quantizing a few rows at a time gives the
    # same codes and scales with a fraction of bitsandbytes' float32 temporaries (about 16 bytes per weight).
    rows = max(1, CHUNK_WEIGHTS // w.shape[1])
    codes, absmax = [], []
    for part in w.split(rows):
        packed, qs = quantize_4bit(part.contiguous(), blocksize=scheme.group_size, quant_type=scheme.format)
        codes.append(unpack_4bit(packed, tuple(part.shape)))
        absmax.append(qs.absmax.float())
    codes, scales = torch.cat(codes), torch.cat(absmax)
    nested = None
    if scheme.double_quant:  # the scales in 8 bits, as bitsandbytes' compress_statistics stores them
        nested = double_quantize(scales)
        scales = nested.dequantize()
    return FourBitWeight(codes, scales, scheme.format, scheme.group_size, dtype, nested)


CHUNK_WEIGHTS = 1 << 20


def rtn_int8(weight: torch.Tensor, scheme: Int8) -> Int8Weight:
    """bitsandbytes' ``Int8Params`` quantization: the weight in fp16, each row scaled by its absmax."""
    from bitsandbytes.functional import int8_vectorwise_quant

    codes, scb, _ = int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
    return Int8Weight(codes=codes, scb=scb.float(), threshold=scheme.threshold)


@register("rtn")
class RoundToNearest(Algorithm):
    def quantize(self, weight: torch.Tensor, scheme, dtype: torch.dtype, stats=None) -> QuantizedWeight:
        if isinstance(scheme, FourBit):
            return rtn_4bit(weight, scheme, dtype)
        if isinstance(scheme, Int8):
            return rtn_int8(weight, scheme)
        assert isinstance(scheme, Keep)
        return KeptWeight(weight.detach().to(scheme.dtype))
