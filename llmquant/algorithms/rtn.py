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

    w = weight.detach().to(dtype).contiguous()
    packed, qs = quantize_4bit(
        w, blocksize=scheme.group_size, compress_statistics=scheme.double_quant, quant_type=scheme.format
    )
    codes = unpack_4bit(packed, tuple(w.shape))
    if qs.nested:
        nested = NestedScales(codes=qs.absmax, absmax=qs.state2.absmax, code=qs.state2.code, offset=qs.offset)
        scales = nested.dequantize()
    else:
        nested, scales = None, qs.absmax.float()
    return FourBitWeight(codes, scales, scheme.format, scheme.group_size, dtype, nested)


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
