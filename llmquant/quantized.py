"""Chosen weights in bitsandbytes' own terms: codes and scales, and their exact dequantization.

Every algorithm returns one of these; the bitsandbytes backend turns them into
modules and checkpoint tensors without re-quantizing anything, so what an
algorithm chose is exactly what bitsandbytes computes with.

Layout (bitsandbytes' contract):
  * 4-bit: a weight ``[out, in]`` is flattened row-major and cut into blocks of
    ``group_size``; block ``b`` is ``codebook[codes[b]] * scales[b]``. With
    ``double_quant`` the scales are themselves stored as 8-bit codes (blocks of
    256, plus a global offset); ``scales`` then holds their dequantized values.
  * int8: ``codes[r, c] * scb[r] / 127``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache

import torch

from .schemes import NESTED_BLOCKSIZE

# bitsandbytes dequantizes int8 rows as codes * SCB * (1/127) with this constant.
INT8_INV_127 = 7.874015718698502e-3


@lru_cache(maxsize=None)
def _codebook_cpu(quant_type: str) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device="cpu").float()


def codebook(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 values (in [-1, 1]) a 4-bit code stands for, indexed by code."""
    return _codebook_cpu(quant_type).to(device)


PACK_CHUNK = 1 << 20


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15, any shape -> bitsandbytes' packed ``[(n + 1) // 2, 1]`` uint8 (first code in the high nibble)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    if sys.byteorder == "little" and flat.is_contiguous() and flat.storage_offset() % 2 == 0:
        # two codes per 16-bit word (first in the low byte): one pass over half as many elements, a slice at a
        # time so that the 16-bit temporaries stay small next to the weight
        pairs = flat.view(torch.int16)
        out = torch.empty(pairs.numel(), dtype=torch.uint8, device=flat.device)
        for i in range(0, pairs.numel(), PACK_CHUNK):
            p = pairs[i : i + PACK_CHUNK]
            out[i : i + PACK_CHUNK] = ((p << 4) & 0xF0) | (p >> 8)
        return out.unsqueeze(1)
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    flat = packed.reshape(-1).view(torch.uint8)
    out = torch.empty(flat.numel() * 2, dtype=torch.uint8, device=flat.device)
    out[0::2] = flat >> 4
    out[1::2] = flat & 0xF
    n = 1
    for s in shape:
        n *= s
    return out[:n].reshape(shape)


@dataclass
class NestedScales:
    """Double-quantized 4-bit scales, exactly as bitsandbytes stores them."""

    codes: torch.Tensor  # uint8 [n_blocks]
    absmax: torch.Tensor  # float32 [ceil(n_blocks / 256)]
    code: torch.Tensor  # float32 [256], bitsandbytes' dynamic 8-bit map
    offset: torch.Tensor  # float32 scalar: the mean scale, subtracted before quantizing

    def dequantize(self) -> torch.Tensor:
        from bitsandbytes.functional import QuantState, dequantize_blockwise

        state2 = QuantState(absmax=self.absmax, code=self.code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        scales = dequantize_blockwise(self.codes, state2)
        scales += self.offset  # same order of operations as bitsandbytes' dequantize_4bit
        return scales.float()


def double_quantize(scales: torch.Tensor) -> NestedScales:
    """Quantize 4-bit block scales the way bitsandbytes does for ``compress_statistics``."""
    from bitsandbytes.functional import quantize_blockwise

    scales = scales.float().contiguous()
    offset = scales.mean()
    codes, state2 = quantize_blockwise(scales - offset, blocksize=NESTED_BLOCKSIZE)
    return NestedScales(codes=codes, absmax=state2.absmax, code=state2.code, offset=offset)


@dataclass
class FourBitWeight:
    codes: torch.Tensor  # uint8 [out, in], values 0..15
    scales: torch.Tensor  # float32 [out * in / group_size]: the scale each block is dequantized with
    quant_type: str  # "nf4" | "fp4"
    group_size: int
    dtype: torch.dtype  # float type bitsandbytes dequantizes to (the compute dtype)
    nested: NestedScales | None = None

    def __post_init__(self) -> None:
        out, inp = self.codes.shape
        assert self.codes.dtype == torch.uint8, self.codes.dtype
        assert inp % self.group_size == 0, (inp, self.group_size)
        assert self.scales.shape == (out * inp // self.group_size,), (self.scales.shape, self.codes.shape)
        assert self.scales.dtype == torch.float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight bitsandbytes computes with (before casting to ``dtype``)."""
        cb = codebook(self.quant_type, self.codes.device)
        vals = cb[self.codes.int()].reshape(-1, self.group_size) * self.scales.view(-1, 1)
        return vals.reshape(self.shape)


@dataclass
class Int8Weight:
    codes: torch.Tensor  # int8 [out, in]
    scb: torch.Tensor  # float32 [out]: the row's scale (absmax of the chosen row range)
    threshold: float

    def __post_init__(self) -> None:
        assert self.codes.dtype == torch.int8
        assert self.scb.shape == (self.codes.shape[0],) and self.scb.dtype == torch.float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scb.view(-1, 1) * INT8_INV_127


@dataclass
class KeptWeight:
    weight: torch.Tensor  # stored as is, in the format's float type

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


QuantizedWeight = FourBitWeight | Int8Weight | KeptWeight
