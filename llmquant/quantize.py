"""Applying a plan: choose each layer's weights with its algorithm, then swap in the bitsandbytes layer."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .backends.bnb import build_module
from .errors import UserError
from .plan import Plan, PlanEntry
from .quantized import KeptWeight, QuantizedWeight


def layer_weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    w = module.weight
    if w.device.type == "meta":
        raise UserError("a layer's weights are offloaded (meta device); quantize with enough CPU or GPU memory for the model")
    return w if type(module) is nn.Linear else w.t()


def install(model: nn.Module, entry: PlanEntry, qw: QuantizedWeight, dtype: torch.dtype) -> None:
    """Put the chosen weights into the model: a bitsandbytes layer, or the kept float weight in place."""
    module = model.get_submodule(entry.name)
    if isinstance(qw, KeptWeight):
        w = qw.weight if type(module) is nn.Linear else qw.weight.t()
        # computed in the model's dtype, with exactly the values the stored format holds
        module.weight.data = w.to(device=module.weight.device, dtype=dtype).contiguous()
        return
    new = build_module(qw, module.bias, dtype, module.weight.device)
    if hasattr(module, "_hf_hook"):  # accelerate's device-placement hook (device_map="auto")
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, module._hf_hook)
    model.set_submodule(entry.name, new)


def quantize_layer(module: nn.Module, entry: PlanEntry, dtype: torch.dtype, stats=None) -> QuantizedWeight:
    algo = ALGORITHMS[entry.method]
    return algo.quantize(layer_weight(module).detach(), entry.scheme, dtype, stats)


def quantize_model(model: nn.Module, plan: Plan, progress: bool = True, calibration=None) -> dict[str, QuantizedWeight]:
    """Quantize every planned layer: one by one for data-free methods, decoder layer by decoder
    layer on ``calibration`` (a :class:`llmquant.calibrate.SequentialCalibrator`) for calibrated ones."""
    if calibration is not None:
        return calibration.run()
    todo = [e for e in plan.entries if e.scheme is not None]
    done: dict[str, QuantizedWeight] = {}
    with torch.no_grad():
        for e in tqdm(todo, desc="quantizing", unit="layer", disable=not progress):
            if ALGORITHMS[e.method].calibrated:
                raise UserError(f"{e.name}: method {e.method} needs calibration data (a calibration: section)")
            qw = quantize_layer(model.get_submodule(e.name), e, plan.model_dtype)
            install(model, e, qw, plan.model_dtype)
            done[e.name] = qw
    return done
