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

A norm's readers are the Linear layers its output tensor reaches in the layer's own forward
(so a parallel-residual block's norm is folded into attention and MLP together, and a
post-norm block's norms, which feed no Linear, into nothing); Linear -> Linear pairs are a
short table of names. With grouped-query attention, o_proj's input repeats each v_proj
output channel once per query head sharing it, so one scale per v_proj channel is folded
into all the o_proj columns that read it. Every pair is checked on calibration tokens
before it is folded (exactly, with power-of-two scales); a pair whose shapes do not fit,
whose norm is not a plain ``weight * x`` (Gemma's ``1 + weight``) or that changes the
float layer is not folded, and the run says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..plan import is_linear
from ..quantized import INT8_INV_127, codebook
from ..schemes import FourBit, Int8
from .grid import quadratic_error, round_4bit, round_int8

# Linear -> Linear pairs, relative to a decoder layer: the reader's input is the producer's output after an operation
# that commutes with positive per-channel scales (attention's weighted sum of values; SwiGLU's product with the gate;
# OPT's ReLU). A norm's readers are not listed: they are found from the layer's own forward (:func:`norm_readers`).
# Every pair is checked on the layer before it is folded (:func:`folding_error`), so a pair listed here that does not
# hold for a family (Phi's GELU between fc1 and fc2) is refused there, not folded.
LINEAR_PAIRS = [
    ("self_attn.v_proj", ["self_attn.o_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
    ("fc1", ["fc2"]),
    ("mlp.fc1", ["mlp.fc2"]),
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


def _norm_like(m: nn.Module) -> bool:
    """A module with a 1-D ``weight`` that is not a Linear layer (a LayerNorm or RMSNorm of some family)."""
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(m, nn.Linear)


def norm_readers(layer: nn.Module, run) -> dict[str, list[str]]:
    """For each norm of a decoder layer, the Linear layers that read its output tensor itself, found by ``run()``
    (one forward of the layer): in a parallel-residual block (Phi, GPT-NeoX, Cohere, Falcon) one norm feeds both
    attention and MLP; in a post-norm block (OLMo 2) a norm's output feeds no Linear at all. Names relative to
    ``layer``."""
    names = {m: n for n, m in layer.named_modules()}
    outputs: dict[str, torch.Tensor] = {}  # norm -> its output (held until the forward ends)
    readers: dict[str, list[str]] = {}

    def norm_hook(module, args, out):
        if isinstance(out, torch.Tensor):
            outputs[names[module]] = out

    def linear_hook(module, args):
        for norm, out in outputs.items():
            if args and args[0] is out:
                readers.setdefault(norm, []).append(names[module])

    handles = [m.register_forward_hook(norm_hook) for m in names if _norm_like(m)]
    handles += [m.register_forward_pre_hook(linear_hook) for m in names if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {n: list(dict.fromkeys(r)) for n, r in readers.items()}


def scaling_groups(layer: nn.Module, prefix: str, config=None, readers: dict[str, list[str]] | None = None
                   ) -> tuple[list[ScalingGroup], list[tuple[str, list[str], str]]]:
    """The (producer, readers) pairs of this decoder layer that may take folded scales, and those that cannot, each
    with the reason: ``(producer, readers, why)`` (names relative to the layer). ``readers``: each norm's readers
    (:func:`norm_readers`); without it, no norm is a producer. A pair returned still has to pass
    :func:`folding_error` on the layer."""
    out, skipped = [], []
    names = dict(layer.named_modules())
    pairs = [(p, t) for p, t in (readers or {}).items()] + [(p, t) for p, t in LINEAR_PAIRS if p in names]
    for prev, targets in pairs:
        if not all(t in names for t in targets):
            continue
        p, rs = names[prev], [names[t] for t in targets]
        if not all(is_linear(r) for r in rs):
            skipped.append((prev, targets, "a reader is not a plain Linear layer"))
            continue
        width = rs[0].in_features
        if any(r.in_features != width for r in rs):
            skipped.append((prev, targets, "its readers have different input widths"))
            continue
        expand = None
        if is_linear(p):
            if p.out_features != width:
                expand = _gqa_map(config, p.out_features, width) if config is not None and prev.endswith("v_proj") else None
                if expand is None:
                    skipped.append((prev, targets, f"its {p.out_features} outputs do not map onto the readers' {width} inputs"))
                    continue
        elif "Gemma" in type(p).__name__:
            skipped.append((prev, targets, f"{type(p).__name__} multiplies by (1 + weight), which a scale cannot divide exactly"))
            continue
        elif p.weight.shape[0] != width:
            skipped.append((prev, targets, "the norm's width is not its readers' input width"))
            continue
        out.append(ScalingGroup(f"{prefix}.{prev}", [f"{prefix}.{t}" for t in targets], expand))
    return out, skipped


@torch.no_grad()
def folding_error(model: nn.Module, group: ScalingGroup, run, reference: torch.Tensor, seed: int = 0) -> float:
    """How far folding scales into ``group`` changes what the float decoder layer computes: ``run()`` (the layer's
    forward on calibration tokens) is compared with ``reference`` (its output before) after folding random powers
    of two (1/4 to 4) per channel, which every floating-point type multiplies and divides exactly: a pair that
    preserves the function gives the same numbers up to the order of sums, a pair that does not (a norm that also
    feeds another block, a non-linearity that does not commute with scales) changes them by a large fraction.
    Returns max |Δ| / max |reference|; the weights are left exactly as they were."""
    prev = model.get_submodule(group.prev)
    width = prev.weight.shape[0]
    s = torch.pow(2.0, torch.randint(-2, 3, (width,), generator=torch.Generator().manual_seed(seed)).float())
    saved = [(t, t.data.clone()) for t in [prev.weight, getattr(prev, "bias", None),
                                            *(model.get_submodule(n).weight for n in group.targets)] if t is not None]
    try:
        apply_scales(model, group, s)
        y = run()
    finally:
        for t, data in saved:
            t.data = data
    return float((y.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-30))


FOLDING_TOLERANCE = 1e-3  # of the layer's largest output: float rounding stays far below, a broken fold far above


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
    if is_linear(prev):
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
