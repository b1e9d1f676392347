"""Round to nearest: exactly what bitsandbytes does when it quantizes a layer itself."""

from __future__ import annotations

from functools import lru_cache

import torch

from ..quantized import FourBitWeight, Int8Weight, KeptWeight, NestedScales, QuantizedWeight, unpack_4bit
from ..schemes import FourBit, Int8, Keep
from . import Algorithm, register


def rtn_4bit(weight: torch.Tensor, scheme: FourBit, dtype: torch.dtype) -> FourBitWeight:
    """bitsandbytes' own ``quantize_4bit`` on the weight in the compute dtype, as stock transformers does it.

    Note the stock behaviour with ``double_quant``: codes are chosen for the exact
    block scale, then the scale is stored in 8 bits, so codes and stored scale disagree slightly.
    """
    from ..quantized import double_quantize

    w = weight.detach().to(dtype).contiguous()
    found = None
    if w.device.type == "cpu" and matches_bitsandbytes_on_cpu(scheme.format):
        found = blockwise_codes(w, scheme.format, scheme.group_size)
    codes, scales = found if found is not None else _bitsandbytes_codes(w, scheme)
    nested = None
    if scheme.double_quant:  # the scales in 8 bits, as bitsandbytes' compress_statistics stores them
        nested = double_quantize(scales)
        scales = nested.dequantize()
    return FourBitWeight(codes, scales, scheme.format, scheme.group_size, dtype, nested)


CHUNK_WEIGHTS = 1 << 20


def _bitsandbytes_codes(w: torch.Tensor, scheme: FourBit) -> tuple[torch.Tensor, torch.Tensor]:
    from bitsandbytes.functional import quantize_4bit

    # Blocks never cross rows (the group size divides the inputs), so quantizing a few rows at a time gives the
    # same codes and scales with a fraction of bitsandbytes' float32 temporaries (about 16 bytes per weight).
    rows = max(1, CHUNK_WEIGHTS // w.shape[1])
    codes, absmax = [], []
    for part in w.split(rows):
        packed, qs = quantize_4bit(part.contiguous(), blocksize=scheme.group_size, quant_type=scheme.format)
        codes.append(unpack_4bit(packed, tuple(part.shape)))
        absmax.append(qs.absmax.float())
    return torch.cat(codes), torch.cat(absmax)


@lru_cache(maxsize=None)
def _sorted_bounds(quant_type: str) -> tuple[tuple[float, ...], torch.Tensor | None]:
    """The codebook's midpoints in increasing order, and the code each interval stands for (None: the identity)."""
    from ..quantized import codebook

    cb = codebook(quant_type)
    order = torch.argsort(cb)
    mids = ((cb[order[:-1]] + cb[order[1:]]) / 2).tolist()
    identity = torch.equal(order, torch.arange(16))
    return tuple(mids), None if identity else order.to(torch.uint8)


def blockwise_codes(w: torch.Tensor, quant_type: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The codes and block absmax bitsandbytes' CPU ``quantize_4bit`` chooses, about twice as fast, in bounded memory.

    bitsandbytes scales each block by the reciprocal of its absmax, clamps to [-1, 1] and
    looks the value up among the codebook's midpoints with ``torch.bucketize`` (a value equal
    to a midpoint goes to the lower code). Counting the midpoints a value exceeds is the same
    lookup, as a few vectorised comparisons over a cache-sized slice instead of a binary search
    per weight. Returns None for a weight with a non-finite block (left to bitsandbytes itself).
    """
    mids, remap = _sorted_bounds(quant_type)
    flat = w.reshape(-1)
    n = flat.numel()
    assert n % group_size == 0, (w.shape, group_size)
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(n // group_size, dtype=torch.float32)
    step = max(group_size, CHUNK_WEIGHTS // group_size * group_size)
    for i in range(0, n, step):
        block = flat[i : i + step].float().view(-1, group_size)
        m = absmax[i // group_size : i // group_size + block.shape[0]]
        torch.amax(block.abs(), dim=1, out=m)
        # the same operations, in the same order, as bitsandbytes' kernel: equal floats, equal codes
        scaled = torch.clamp(block * (1.0 / m.clamp(min=1e-38).view(-1, 1)), -1, 1).view(-1)
        q = codes[i : i + scaled.numel()]
        torch.gt(scaled, mids[0], out=q)
        for v in mids[1:]:
            q += scaled > v
        if remap is not None:
            q.copy_(remap[q.long()])
    if not bool(torch.isfinite(absmax).all()):
        return None
    return codes.view(w.shape), absmax


@lru_cache(maxsize=None)
def matches_bitsandbytes_on_cpu(quant_type: str) -> bool:
    """Whether :func:`blockwise_codes` reproduces the installed bitsandbytes, checked once on weights built to
    land exactly on every midpoint and next to it (another bitsandbytes may choose codes differently)."""
    from bitsandbytes.functional import quantize_4bit

    mids = torch.tensor(_sorted_bounds(quant_type)[0])
    edges = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    block = torch.cat([torch.tensor([1.0]), edges, torch.linspace(-1, 1, 63 - edges.numel())])  # absmax 1: exact hits
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(126, 64, generator=g) * torch.rand(126, 1, generator=g)
    probe = torch.cat([block, -block, noise.view(-1)]).view(-1, 128)
    for w in (probe, probe.bfloat16()):
        packed, qs = quantize_4bit(w, blocksize=64, quant_type=quant_type)
        ours = blockwise_codes(w, quant_type, 64)
        if ours is None or not (torch.equal(ours[0], unpack_4bit(packed, tuple(w.shape))) and torch.equal(ours[1], qs.absmax.float())):
            return False
    return True


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
