"""How weights are chosen for a format. Each algorithm is registered under the name a recipe uses.

An algorithm gets one layer's float weight ``[out, in]`` (and, when it is
calibrated, statistics of that layer's inputs) and returns codes and scales in
the layer's bitsandbytes format (:mod:`llmquant.quantized`). It never builds
modules: :mod:`llmquant.backends.bnb` does that, for every algorithm alike.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..quantized import QuantizedWeight

ALGORITHMS: dict[str, "Algorithm"] = {}


class Algorithm:
    name: str = ""
    # Whether it needs calibration activations (statistics of each layer's inputs).
    calibrated: bool = False
    # Whether it first folds activation-aware scales into the model (AWQ).
    scales_inputs: bool = False
    # Whether the calibrator then tunes each decoder layer's codes and scales by gradient (``tune``).
    tunes: bool = False

    def quantize(self, weight: torch.Tensor, scheme, dtype: torch.dtype, stats=None) -> QuantizedWeight:
        raise NotImplementedError

    def quantize_many(self, weights: list[torch.Tensor], scheme, dtype: torch.dtype, stats=None) -> list[QuantizedWeight]:
        """Several layers in one format reading the same inputs (one ``stats``); an algorithm
        that can share work between them overrides this, with the same result as one by one."""
        return [self.quantize(w, scheme, dtype, stats) for w in weights]


def register(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is registered twice")
        cls.name = name
        ALGORITHMS[name] = cls()
        return cls

    return deco


from . import rtn, scale_search, gptq, awq, tune  # noqa: E402,F401,I001  (registers, in the order errors list them)
