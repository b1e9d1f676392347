"""Activation-aware scaling (AWQ, Lin et al. 2023): per-input-channel scales folded into the model.

For Linear layers that read the same activation ``x`` (for example q/k/v after the
attention norm), multiplying their weights' input columns by ``s`` and dividing the
activation by ``s`` (folded into the norm or Linear that produces it) leaves the float
model unchanged, but moves quantization error away from the channels that carry the
most signal. ``s = mean|x|^α`` with ``α`` searched on calibration data.

The search objective is the layers' output error under the real format:

* 4-bit: ``tr(E H Eᵀ)`` with ``E`` the weight error in the original space (exact for
  the calibration tokens, through the input Hessian ``H``);
* int8: the output of a simulation of bitsandbytes' LLM.int8 matmul (activations cast
  to fp16, outlier columns above the threshold kept in fp16, the rest quantized per
  token to int8) on a sample of calibration tokens: for LLM.int8 the scaling mostly
  matters because it flattens the activations that get quantized.

Which norm or Linear precedes which layers is a table of name patterns (Llama, Qwen2,
Mistral and other Llama-style decoders; OPT). With grouped-query attention, o_proj's input
repeats each v_proj output channel once per query head sharing it, so one scale per v_proj
channel is folded into all the o_proj columns that read it. A pair whose shapes still do
not fit, or whose norm is not a plain ``weight * x`` (Gemma's ``1 + weight``), is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quantized import INT8_INV_127, codebook
from ..schemes import FourBit, Int8
from .grid import quadratic_error, round_4bit, round_int8

# (the module producing the activation, the Linear layers reading it), relative to a decoder layer.
SCALING_PAIRS = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("self_attn.v_proj", ["self_attn.o_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
    ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),  # OPT
    ("final_layer_norm", ["fc1"]),
    ("fc1", ["fc2"]),  # OPT's ReLU commutes with positive scales
]


@dataclass
class ScalingGroup:
    prev: str  # full name of the module producing the shared input
    targets: list[str]  # full names of the Linear layers reading it
    # Grouped-query attention: target input channel -> producer output channel (o_proj's
    # inputs repeat each v_proj output once per query head sharing its key/value head).
    expand: torch.Tensor | None = None


def _gqa_map(config, v_out: int, o_in: int) -> torch.Tensor | None:
    """o_proj input channel -> v_proj output channel, when attention repeats key/value heads."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if not heads or not kv or heads % kv:
        return None
    head_dim = getattr(cfg, "head_dim", None) or o_in // heads
    if heads * head_dim != o_in or kv * head_dim != v_out:
        return None
    j = torch.arange(o_in)
    return (j // head_dim) // (heads // kv) * head_dim + j % head_dim


def _plain_norm(m: nn.Module, width: int) -> bool:
    w = getattr(m, "weight", None)
    return (
        isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == width
        and "Gemma" not in type(m).__name__ and "norm" in type(m).__name__.lower()
    )


def scaling_groups(layer: nn.Module, prefix: str, config=None) -> list[ScalingGroup]:
    """The (producer, readers) pairs of this decoder layer that can take folded scales."""
    out = []
    names = dict(layer.named_modules())
    for prev, targets in SCALING_PAIRS:
        if prev not in names or not all(t in names for t in targets):
            continue
        readers = [names[t] for t in targets]
        if not all(type(r) is nn.Linear for r in readers):
            continue
        width = readers[0].in_features
        if any(r.in_features != width for r in readers):
            continue
        p = names[prev]
        expand = None
        if type(p) is nn.Linear and p.out_features != width and prev.endswith("v_proj") and config is not None:
            expand = _gqa_map(config, p.out_features, width)
            ok = expand is not None
        else:
            ok = (type(p) is nn.Linear and p.out_features == width) or _plain_norm(p, width)
        if ok:
            out.append(ScalingGroup(f"{prefix}.{prev}", [f"{prefix}.{t}" for t in targets], expand))
    return out


# Integer matrix products of int8 codes: exact, and on CPUs with AVX-512 about twice as fast as float32 (as
# bitsandbytes' own CPU kernel uses them there; elsewhere torch's integer product is a slow scalar loop).
_INT_MM_CPU = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _int8_matmul(qa: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``qa @ codesᵀ`` for integer-valued ``qa`` [tokens, in] and int8 ``codes`` [out, in], in float32."""
    if qa.device.type == "cpu" and _INT_MM_CPU:
        return torch._int_mm(qa.to(torch.int8), codes.t()).float()
    return qa @ codes.float().t()


def llm_int8_inputs(x: torch.Tensor, threshold: float) -> tuple:
    """``x`` [tokens, in] as bitsandbytes' LLM.int8 product splits it (its default-backend steps): the float16
    values, each token's int8 codes (by its absolute maximum, outlier columns zeroed), those maxima and the
    outlier columns (where some token reaches ``threshold``; ``None`` when off). Layers that read the same input
    share it (:func:`llm_int8_product`)."""
    a = x.to(torch.float16).float()
    quant = a.clone()
    cols = None
    if threshold > 0:
        outliers = a.abs() >= threshold
        cols = outliers.any(0)
        quant[outliers] = 0
    rowmax = quant.abs().amax(1).clamp_min(1e-8)
    qa = torch.round(quant * (127.0 / rowmax.unsqueeze(1)))
    if cols is not None and len(a) > 1:
        qa[:, cols] = 0
    return a, qa, rowmax, cols


def llm_int8_product(inputs: tuple, codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """The LLM.int8 product of split inputs (:func:`llm_int8_inputs`) with int8 weights ``codes``/``scb``."""
    a, qa, rowmax, cols = inputs
    y = _int8_matmul(qa, codes) * (rowmax.unsqueeze(1) * scb.unsqueeze(0)) * (1.0 / (127 * 127))
    if cols is not None and cols.any():
        w_cols = (codes[:, cols].float() * scb.unsqueeze(1) * INT8_INV_127).to(torch.float16).float()
        y = y + a[:, cols] @ w_cols.t()
    return y


def llm_int8_output(x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, threshold: float) -> torch.Tensor:
    """bitsandbytes' LLM.int8 product ``x @ Wᵀ`` for int8 weights, simulated in float32 (its default-backend steps)."""
    return llm_int8_product(llm_int8_inputs(x, threshold), codes, scb)


def llm_int8_activations(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The activations as bitsandbytes' LLM.int8 product uses them (float32, ``x``'s shape): in float16, each token
    rounded to int8 by its absolute maximum, except in the columns where some token reaches ``threshold``, which
    stay in float16. ``F.linear`` of these with the int8 weight's dequantized values is :func:`llm_int8_output`
    up to float rounding (the token dimensions are taken together, as one matrix product takes them)."""
    a, qa, rowmax, cols = llm_int8_inputs(x.reshape(-1, x.shape[-1]), threshold)
    out = qa * (rowmax.unsqueeze(1) / 127.0)
    if cols is not None:
        out = torch.where(cols, a, out)
    return out.reshape(x.shape)


def _group_loss(weights: list[torch.Tensor], schemes: list, s: torch.Tensor, h: torch.Tensor,
                x_sample: torch.Tensor | None, refs: list[torch.Tensor | None]) -> float:
    """Summed mean squared output error per token of the layers reading one input, with input scales ``s``
    (RTN on each layer's grid); ``refs`` holds the int8 layers' float outputs on ``x_sample``."""
    total = torch.zeros((), device=s.device)
    int8_inputs: dict[float, tuple] = {}  # the scaled sample as LLM.int8 splits it, once per threshold
    for w, scheme, ref in zip(weights, schemes, refs):
        ws = w * s.unsqueeze(0)
        if isinstance(scheme, FourBit):
            out_f, in_f = w.shape
            g = scheme.group_size
            blocks = ws.reshape(out_f, in_f // g, g)
            _, q = round_4bit(blocks, blocks.abs().amax(-1), codebook(scheme.format, w.device))
            e = w - q.reshape(out_f, in_f) / s.unsqueeze(0)
            total = total + quadratic_error(e, h).sum()
        elif isinstance(scheme, Int8):
            assert x_sample is not None and ref is not None
            if scheme.threshold not in int8_inputs:
                int8_inputs[scheme.threshold] = llm_int8_inputs(x_sample / s.unsqueeze(0), scheme.threshold)
            scb = ws.abs().amax(-1)
            codes, _ = round_int8(ws, scb)
            y = llm_int8_product(int8_inputs[scheme.threshold], codes, scb)
            total = total + ((y - ref) ** 2).sum() / len(x_sample)
        # kept in float: not affected by the scaling
    return total.item()


def reader_scales(s: torch.Tensor, expand: torch.Tensor | None) -> torch.Tensor:
    """Scales of the producer's output channels -> scales of the readers' input columns."""
    return s if expand is None else s[expand.to(s.device)]


def _reduce(stat: torch.Tensor, expand: torch.Tensor | None, op: str) -> torch.Tensor:
    """Per-channel statistics of the readers' inputs, folded onto the producer's output channels."""
    if expand is None:
        return stat
    n = int(expand.max()) + 1
    if op == "max":
        return torch.zeros(n, device=stat.device).scatter_reduce(0, expand.to(stat.device), stat, "amax", include_self=False)
    return torch.zeros(n, device=stat.device).index_add(0, expand.to(stat.device), stat) / torch.bincount(expand, minlength=n).to(stat.device)


def search_scales(weights: list[torch.Tensor], schemes: list, h: torch.Tensor, x_abs_mean: torch.Tensor,
                  x_sample: torch.Tensor | None, grid: int = 20, x_abs_max: torch.Tensor | None = None,
                  expand: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """The best input scales for layers reading one activation; returns (scales of the producer's
    output channels, α, loss ratio to no scaling).

    Candidates: AWQ's ``s = mean|x|^α``, and, when ``x_abs_max`` is given, SmoothQuant's
    ``s = max|x|^α / max|w|^(1-α)`` (per-token int8 activations are set by their maxima);
    α = 0 (no scaling) is always among them.
    """
    families = [("mean", _reduce(x_abs_mean.float(), expand, "mean").clamp_min(1e-5), None)]
    if x_abs_max is not None:
        w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        families.append(("max", _reduce(x_abs_max.float(), expand, "max").clamp_min(1e-5), _reduce(w_max, expand, "max").clamp_min(1e-5)))
    refs = [x_sample @ w.t() if isinstance(sc, Int8) else None for w, sc in zip(weights, schemes)]
    ones = torch.ones_like(families[0][1])
    first = _group_loss(weights, schemes, reader_scales(ones, expand), h, x_sample, refs)
    best_s, best_alpha, best_loss = ones, 0.0, first
    for _, xs, ws in families:
        for alpha in torch.linspace(0, 1, grid + 1)[1:].tolist():
            s = xs.pow(alpha) if ws is None else xs.pow(alpha) / ws.pow(1 - alpha)
            s = s / (s.max() * s.min()).sqrt()
            loss = _group_loss(weights, schemes, reader_scales(s, expand), h, x_sample, refs)
            if loss < best_loss:
                best_s, best_alpha, best_loss = s, alpha, loss
    return best_s, best_alpha, (best_loss / first if first else 1.0)


@torch.no_grad()
def apply_scales(model: nn.Module, group: ScalingGroup, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the readers' matching input columns by it
    (the float model is unchanged)."""
    prev = model.get_submodule(group.prev)
    dt = prev.weight.dtype
    s = s.to(prev.weight.device, torch.float32)
    reader_s = reader_scales(s, group.expand)
    if type(prev) is nn.Linear:
        prev.weight.data = (prev.weight.float() / s.unsqueeze(1)).to(dt)
    else:
        prev.weight.data = (prev.weight.float() / s).to(dt)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)
    for name in group.targets:
        t = model.get_submodule(name)
        t.weight.data = (t.weight.float() * reader_s.to(t.weight.device).unsqueeze(0)).to(t.weight.dtype)


# ---- the methods: scaling first, then each layer's own quantizer --------------------------

from . import register  # noqa: E402
from .gptq import GPTQ  # noqa: E402
from .scale_search import ScaleSearch  # noqa: E402


@register("awq")
class AWQ(ScaleSearch):
    """Activation-aware input scaling, then scale search on the scaled weights."""

    scales_inputs = True


@register("awq+gptq")
class AWQGPTQ(GPTQ):
    """Activation-aware input scaling, then GPTQ on the scaled weights."""

    scales_inputs = True
