"""What a run will need, from the recipe and the model's shapes alone: host memory, device memory and disk.

Computed on the skeleton (no weight read), printed by ``llmquant run --dry-run``, and checked by ``llmquant run``
before any weight is loaded: a recipe that needs more memory or disk than the machine has is refused in one line
naming the setting to change. The figures are estimates of the largest items, each said in the output:

* weights: the whole float model when it is loaded whole, else the largest decoder layer (the model outside its
  decoder layers, embeddings and head, stays resident beside it);
* calibration activations: windows x seqlen x hidden size in the model's dtype, per generation; two generations
  (a layer's inputs and its outputs), three when tuning toward the float model carries its activations too;
  kept in memory, or with ``calibration.activations: disk`` three (five) generations on disk;
* Hessians: for every Linear layer of the largest decoder layer, its inputs' XᵀX sums (float64 upper triangle,
  then float32): 4 x in_features² bytes each, an upper bound (layers reading one tensor share one);
* tuning (``tune``, ``gptq+tune``): :data:`TUNE_LAYER_BYTES` per tuned weight of one decoder layer at a time, or with
  ``tune.scope: group`` per weight of its largest group and :data:`TUNE_WAITING_BYTES` per other tuned weight (a
  recipe whose layer state cannot fit is refused naming that setting); with ``tune.model_steps``
  :data:`TUNE_MODEL_BYTES` per weight of every quantized layer of the decoder layers at once (refused naming it);
* the export's files, and a streamed run's resume state beside the output (activations kept in memory are saved after
  each layer, the new state written before the old one goes: two generations for a moment).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import memory
from .errors import UserError
from .report import human_bytes


@dataclass
class Needs:
    host: dict[str, int] = field(default_factory=dict)  # item -> bytes in host memory
    device: dict[str, int] = field(default_factory=dict)  # item -> bytes on the GPU (a CUDA run)
    disk: dict[str, int] = field(default_factory=dict)  # item -> bytes beside the output
    settings: dict[str, object] = field(default_factory=dict)  # what the activations' figure was computed from

    def lines(self) -> list[str]:
        out = []
        for where, items in (("host memory", self.host), ("GPU memory", self.device), ("disk beside the output", self.disk)):
            if items:
                parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in items.items() if v)
                out.append(f"{where}: about {human_bytes(sum(items.values()))} ({parts})")
        return out


# Tuning's memory per tuned weight. A decoder layer's stage (tune, gptq+tune) holds, for each weight, float32 copies
# (the weight it rounds from, the offset being tuned with its gradient and bounds, the best offset so far) and the
# forward's temporaries autograd keeps for the backward: 42 bytes measured (peak resident memory of a streamed run with
# a 16.8M-weight decoder layer, gptq+tune against gptq: +700 MB). The whole-model stage (tune.model_steps) tunes
# scales only: each weight's float32 dequantized value, and the scales' factors.
TUNE_LAYER_BYTES = 42
TUNE_MODEL_BYTES = 5
# With tune.scope: group, what each tuned weight outside the group being tuned holds meanwhile: its float copy, its
# dequantized choice, and what the allocator keeps of the groups before. Measured on a 15.1M-weight decoder layer
# (hidden 1024, intermediate 4096; groups q/k/v, o, gate/up, down), streamed, peak RSS over gptq: +686 MB tuning the
# layer at once, +483 MB by groups, that is 42 bytes per weight of gate/up and 20 for the other 6.7M.
TUNE_WAITING_BYTES = 20


def layer_bytes(layer: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in layer.parameters()) * dtype.itemsize


def hessian_bytes(layer: nn.Module) -> int:
    """Upper bound of the calibration statistics one decoder layer holds at once."""
    from .plan import linear_shape, quantizable

    return sum(4 * linear_shape(m)[1] ** 2 for m in layer.modules() if quantizable(m))


def tuning_state(entries, scope: str) -> int:
    """What tuning one decoder layer's Linear layers ``entries`` holds at its peak: every weight's state at once
    (scope ``layer``), or its largest group's and what the others keep meanwhile (``group``). A group is taken as the
    Linear layers of one module reading inputs of one width, which holds each group of layers reading the same inputs
    (q/k/v with o where the widths agree: an upper bound)."""
    total = sum(e.out_features * e.in_features for e in entries)
    if scope == "layer" or not entries:
        return TUNE_LAYER_BYTES * total
    groups: dict[tuple[str, int], int] = {}
    for e in entries:
        key = (e.name.rsplit(".", 1)[0], e.in_features)
        groups[key] = groups.get(key, 0) + e.out_features * e.in_features
    largest = max(groups.values())
    return TUNE_LAYER_BYTES * largest + TUNE_WAITING_BYTES * (total - largest)


def estimate(recipe, plan, frame: nn.Module, dtype: torch.dtype, streamed: bool, device: torch.device,
             calibrated: bool, tracks_float: bool) -> Needs:
    """``frame``: the model's skeleton (meta tensors will do)."""
    from .algorithms import ALGORITHMS
    from .schemes import FourBit, Int8
    from .walk import decoder_layers

    stack, layers = decoder_layers(frame)
    largest = max(layers, key=lambda l: layer_bytes(l, dtype))
    n = Needs()
    whole = plan.float_bytes
    on_gpu = device.type == "cuda"
    weights = n.device if on_gpu else n.host
    if streamed:
        outside = whole - sum(layer_bytes(l, dtype) for l in layers)
        weights["the model outside its decoder layers"] = max(outside, 0)
        weights["the largest decoder layer"] = layer_bytes(largest, dtype)
    else:
        weights["the float model"] = whole
    c = recipe.calibration
    if calibrated and c is not None:
        hidden = frame.config.get_text_config().hidden_size
        generation = c.nsamples * c.seqlen * hidden * dtype.itemsize
        n.settings = {"nsamples": c.nsamples, "seqlen": c.seqlen, "hidden": hidden, "bytes": dtype.itemsize,
                      "streamed": streamed}
        gens = 3 if tracks_float else 2
        if streamed and c.activations == "disk":
            n.disk["calibration activations"] = generation * (5 if tracks_float else 3)
        else:
            n.host[f"calibration activations ({gens} x {human_bytes(generation)})"] = generation * gens
        (n.device if on_gpu else n.host)["Hessians of the largest layer (at most)"] = hessian_bytes(largest)
        # tuning, one decoder layer at a time, and with tune.model_steps every quantized layer of the decoder layers
        prefixes = [f"{stack}.{i}." for i in range(len(layers))]
        quantized = [e for e in plan.entries if isinstance(e.scheme, (FourBit, Int8)) and e.name.startswith(tuple(prefixes))]

        def weights_of(entries) -> int:
            return sum(e.out_features * e.in_features for e in entries)

        tuned = [e for e in quantized if ALGORITHMS[e.method].tunes]
        if tuned:
            n.settings["tune_scope"] = c.tune.scope
            (n.device if on_gpu else n.host)[f"tuning state of the largest {c.tune.scope}"] = max(
                tuning_state([e for e in tuned if e.name.startswith(p)], c.tune.scope) for p in prefixes)
        if c.tune.model_steps and quantized:
            (n.device if on_gpu else n.host)["tuning the whole model at once (tune.model_steps)"] = (
                TUNE_MODEL_BYTES * weights_of(quantized))
        if streamed and c.activations != "disk":
            # the state after a layer is written before the one before it goes: two copies at once for a moment
            # (with activations on disk the state only points to the generations counted above)
            n.disk["resume state"] = 2 * generation * (2 if tracks_float else 1)
    n.disk["the export"] = plan.file_bytes_estimate()
    return n


def estimate_auto(recipe, frame: nn.Module, dtype: torch.dtype, streamed: bool, problem) -> Needs:
    """What the search of ``quantization.auto`` needs beside the model's weights, before any format is chosen: streamed,
    the sensitivity pass keeps every decoder layer's inputs on disk for its backward pass (layers x windows x seqlen x
    hidden in the model's dtype) and one layer's hidden states and gradients (float32) in memory; a ``kl`` target's
    measurements keep two generations of hidden states, with a calibrated method every layer's Hessians, and the
    weights the candidate formats get in each layer (``problem``: :func:`llmquant.auto.prepare`'s) on disk. Freed before
    the quantization starts."""
    from .algorithms import ALGORITHMS
    from .walk import decoder_layers

    n = Needs()
    auto, c = recipe.quantization.auto, recipe.calibration
    if auto is None or c is None:
        return n
    _, layers = decoder_layers(frame)
    hidden = frame.config.get_text_config().hidden_size
    states = min(auto.windows, c.nsamples) * c.seqlen * hidden
    n.host["quantization.auto: one layer's hidden states and gradients"] = states * (dtype.itemsize + 4)
    if streamed:
        n.disk["quantization.auto: every decoder layer's inputs"] = len(layers) * states * dtype.itemsize
        if auto.kl is not None:
            n.disk["quantization.auto: two generations of hidden states"] = 2 * states * dtype.itemsize
            if ALGORITHMS[recipe.quantization.method].calibrated:
                n.disk["quantization.auto: every layer's Hessians (at most)"] = sum(hessian_bytes(l) for l in layers)
            n.disk["quantization.auto: the candidates' weights (at most)"] = candidate_bytes(problem, dtype)
    return n


def candidate_bytes(problem, dtype: torch.dtype) -> int:
    """What a kl target's measurements keep of the weights they choose: each mix measured gives each layer one format,
    whose weights are kept for the mixes after (a format the layer already has, none): at most the largest
    ``KL_ROUNDS + 1`` (the mixes measured) of each layer's candidates."""
    from .auto import KL_ROUNDS
    from .schemes import Keep

    total = 0
    for e, costs in zip(problem.free, problem.costs):
        saved = [c for c, k in zip(costs, problem.menus[e.name]) if not (isinstance(k, Keep) and k.dtype == dtype)]
        total += sum(sorted(saved, reverse=True)[: KL_ROUNDS + 1])
    return total


def _hint(needs: Needs, biggest: str, where: str) -> str:
    """The setting to change when ``biggest`` is the largest item of what does not fit in ``where``."""
    on_disk = "disk" in where
    if "tune.model_steps" in biggest:
        return "set calibration.tune.model_steps: 0 (it tunes the whole model at once, loaded whole; the layer-by-layer tuning of the method stays)"
    if biggest.startswith("tuning state") and needs.settings.get("tune_scope") == "layer":
        return "set calibration.tune.scope: group (one group of Linear layers' tuning state at a time)"
    if biggest.startswith("quantization.auto: the candidates"):
        return "give fewer quantization.auto.candidates, or free some space"
    if biggest.startswith("quantization.auto"):
        return "lower quantization.auto.windows or calibration.seqlen" + (", or free some space" if on_disk else "")
    if "activations" in biggest or "resume state" in biggest:
        return "lower calibration.nsamples or calibration.seqlen" + (
            ", or set calibration.activations: disk" if "activations" in biggest and not on_disk and needs.settings.get("streamed") else "")
    if "model" in biggest or "layer" in biggest or "group" in biggest:
        return "use a machine with more memory, or a smaller model"
    return "free some space or choose another output folder"


def check(needs: Needs, out: Path, device: torch.device) -> None:
    """Refuse, in one line, a run whose needs exceed the free host memory, GPU memory or disk."""
    def refuse(where: str, items: dict, free: int) -> None:
        total = sum(items.values())
        biggest = max(items, key=items.get)
        whole = next((k for k in items if "tune.model_steps" in k), None)
        raise UserError(f"this run needs about {human_bytes(total)} of {where} ({biggest}: {human_bytes(items[biggest])}) "
                        f"and {human_bytes(free)} are free: {_hint(needs, whole or biggest, where)}")

    if needs.host:
        free = memory.free_bytes(torch.device("cpu"))
        if sum(needs.host.values()) > free:
            refuse("host memory", needs.host, free)
    if needs.device and device.type == "cuda":
        free = memory.free_bytes(device)
        if sum(needs.device.values()) > free:
            refuse(f"memory on {device}", needs.device, free)
    if needs.disk:
        folder = Path(out).absolute().parent
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if sum(needs.disk.values()) > free:
            refuse(f"disk in {folder}", needs.disk, free)
