"""Applying a plan: choose each layer's weights with its algorithm, then swap in the bitsandbytes layer."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import ALGORITHMS
from .backends.bnb import build_module, checkpoint_tensors
from .errors import UserError
from .plan import Plan, PlanEntry, is_linear
from .quantized import KeptWeight, QuantizedWeight


def layer_weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
    w = module.weight
    if w.device.type == "meta":
        raise UserError("a layer's weights are offloaded (meta device); quantize with enough CPU or GPU memory for the model")
    return w if is_linear(module) else w.t()


def install(model: nn.Module, entry: PlanEntry, qw: QuantizedWeight, dtype: torch.dtype) -> None:
    """Put the chosen weights into the model: a bitsandbytes layer, or the kept float weight in place."""
    module = model.get_submodule(entry.name)
    if isinstance(qw, KeptWeight):
        w = qw.weight if is_linear(module) else qw.weight.t()
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


def collect_tensors(model: nn.Module, plan: Plan, chosen: dict[str, QuantizedWeight], under: str | None = None,
                    outside: list[str] | None = None, stored: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, on the CPU, from the chosen weights (never from bitsandbytes state).

    ``under`` keeps only the tensors of one module (a decoder layer), ``outside`` only those outside
    the modules named (what is left once the decoder layers are written). ``stored``: for layers whose chosen
    weights were already turned into their checkpoint tensors (:func:`~llmquant.backends.bnb.checkpoint_tensors`
    with no prefix), those tensors, in place of ``chosen``.
    """
    def wanted(name: str) -> bool:
        if under is not None:
            return name.startswith(under + ".")
        return outside is None or not any(name.startswith(p + ".") for p in outside)

    sd: dict[str, torch.Tensor] = {}
    for e in plan.entries:
        if not wanted(e.name):
            continue
        module = model.get_submodule(e.name)
        prefix = f"{e.name}."
        if e.scheme is None:
            if "weight" in e.tensors:
                sd[prefix + "weight"] = module.weight
        elif stored is not None and e.name in stored:
            sd.update({prefix + k: v for k, v in stored[e.name].items()})
        else:
            qw = chosen[e.name]
            if isinstance(qw, KeptWeight):
                sd[prefix + "weight"] = qw.weight if e.layer != "Conv1D" else qw.weight.t()
            else:
                sd.update(checkpoint_tensors(qw, prefix))
        if e.has_bias:
            sd[prefix + "bias"] = module.bias
    for name in plan.other_tensors:
        if not wanted(name):
            continue
        owner, _, leaf = name.rpartition(".")
        m = model.get_submodule(owner) if owner else model
        sd[name] = m._parameters[leaf] if leaf in m._parameters else m._buffers[leaf]

    out, seen = {}, set()
    for name, t in sd.items():
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel():  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    if under is None and outside is None:
        _check_against_plan(out, plan)
    return out


def _check_against_plan(sd: dict[str, torch.Tensor], plan: Plan) -> None:
    specs = plan.tensor_specs()
    missing, extra = set(specs) - set(sd), set(sd) - set(specs)
    assert not missing and not extra, f"checkpoint tensors differ from the plan: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"
    for name, (shape, dtype) in specs.items():
        t = sd[name]
        assert tuple(t.shape) == shape and t.dtype == dtype, f"{name}: {tuple(t.shape)} {t.dtype}, plan says {shape} {dtype}"
