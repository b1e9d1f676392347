"""The storage formats we produce, one small validated model each.

A format says how one Linear layer's weight is stored; it does not say how the
stored values are chosen (that is an algorithm, see ``llmquant.algorithms``).

    int8        bitsandbytes LLM.int8: one int8 per weight, one fp32 scale per output row
    nf4, fp4    bitsandbytes 4-bit: two codes per byte, one scale per block of
                ``group_size`` consecutive inputs (optionally the scales themselves
                quantized to 8 bits: ``double_quant``)
    fp16, bf16, fp32
                not quantized, stored in that float type
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Block sizes bitsandbytes' 4-bit kernels accept (bitsandbytes.functional.quantize_4bit).
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# The block size stock transformers uses when it quantizes (Params4bit's default);
# only checkpoints with this block size are written in the stock format.
STOCK_BLOCKSIZE = 64
# bitsandbytes quantizes the 4-bit scales in blocks of 256 when double_quant is on.
NESTED_BLOCKSIZE = 256
# bitsandbytes' CPU 4-bit kernel (AVX512-BF16 path) tiles output rows by 32.
CPU_4BIT_ROW_TILE = 32

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}


class StrictModel(BaseModel):
    """Base of every recipe object: frozen, and an unknown key is an error naming the allowed ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                allowed = ", ".join(cls.model_fields)
                raise ValueError(f"unknown key {unknown[0]!r}; allowed keys: {allowed}")
        return data


class Int8(StrictModel):
    """bitsandbytes LLM.int8 (row-wise int8 weights, ``Linear8bitLt``)."""

    format: Literal["int8"] = "int8"
    # Activation columns with any |value| >= threshold are multiplied in fp16 instead of
    # int8 (LLM.int8's outlier decomposition); 0 quantizes every column.
    threshold: float = Field(6.0, ge=0.0)

    @property
    def bits(self) -> int:
        return 8

    @property
    def quantized(self) -> bool:
        return True

    def label(self) -> str:
        return f"int8(t={self.threshold:g})"


class FourBit(StrictModel):
    """bitsandbytes 4-bit NF4 or FP4 (``Linear4bit``)."""

    format: Literal["nf4", "fp4"]
    # Inputs per scale: the bitsandbytes block size.
    group_size: int = STOCK_BLOCKSIZE
    # Store the per-block scales as 8-bit codes too (QLoRA's double quantization).
    double_quant: bool = False

    @field_validator("group_size")
    @classmethod
    def _bnb_blocksize(cls, v: int) -> int:
        if v not in BNB_BLOCKSIZES:
            allowed = ", ".join(map(str, BNB_BLOCKSIZES))
            raise ValueError(f"{v} is not a bitsandbytes block size; allowed: {allowed}")
        return v

    @property
    def bits(self) -> int:
        return 4

    @property
    def quantized(self) -> bool:
        return True

    def label(self) -> str:
        return f"{self.format}/g{self.group_size}" + ("+dq" if self.double_quant else "")


class Keep(StrictModel):
    """Not quantized: the weight is stored in this float type."""

    format: Literal["fp16", "bf16", "fp32"]

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.format]

    @property
    def bits(self) -> int:
        return torch.finfo(self.dtype).bits

    @property
    def quantized(self) -> bool:
        return False

    def label(self) -> str:
        return self.format


Scheme = Annotated[Union[Int8, FourBit, Keep], Field(discriminator="format")]
FORMAT_NAMES = ("int8", "nf4", "fp4", "fp16", "bf16", "fp32")


def parse_scheme(value: Any) -> Any:
    """Accept ``"nf4"`` as shorthand for ``{"format": "nf4"}``."""
    if isinstance(value, str):
        return {"format": value}
    return value
