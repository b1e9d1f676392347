"""GPTQ onto bitsandbytes' grids (Frantar et al., 2022).

Columns (inputs) are quantized one at a time; each column's rounding error is spread
over the columns not yet quantized through the inverse Hessian of the layer's
calibration inputs, so later columns compensate for earlier ones. Every value is
rounded onto the layer's own bitsandbytes grid (NF4/FP4 codebook times the block
scale, or int8 rows) and the codes and scales are returned directly: bitsandbytes
never re-quantizes them, so the stored weights are exactly the ones GPTQ chose.

Block scales are fixed when GPTQ enters a block, from the block's weights as updated
by the compensation so far (searched like ``scale_search``). With ``act_order``
(columns in decreasing order of their input energy) or double quantization, blocks
are no longer entered in one piece, or share a global scale offset: the scales are
then searched up front on the original weights (GPTQ's "static groups").
"""

from __future__ import annotations

import torch

from ..quantized import FourBitWeight, Int8Weight, KeptWeight, QuantizedWeight, codebook
from ..schemes import FourBit, Keep
from . import Algorithm, register
from .grid import nearest_code, quadratic_error, search_block_scales, search_row_scales
from .scale_search import LayerStats, stored_scales


def gptq(w: torch.Tensor, h: torch.Tensor, scheme, dtype: torch.dtype, damp: float = 0.01, act_order: bool = True,
         grid: int = 20, min_ratio: float = 0.5, scales: torch.Tensor | None = None, latent: bool = False) -> QuantizedWeight:
    """GPTQ of one weight ``[out, in]`` on inputs with Hessian ``h``.

    ``scales`` (4-bit only): the block scales to use, as stored (``[out, in / group]``), chosen
    beforehand; by default they are searched (static) or chosen on entering each block (dynamic).
    ``latent``: also keep, as ``.latent`` of the result, the values GPTQ rounded (each column as
    updated by the compensation so far; the codes are their nearest grid points), float32 ``[out, in]``.
    """
    w = w.detach().float().clone()
    h = h.float()
    out_f, n = w.shape
    dead = torch.diag(h) == 0
    if dead.any():  # inputs that were always zero: a copy of h with them made harmless
        h = h.clone()
        h[dead, dead] = 1.0
    w[:, dead] = 0.0

    fourbit = isinstance(scheme, FourBit)
    g = scheme.group_size if fourbit else n
    static = act_order or (fourbit and scheme.double_quant) or not fourbit or scales is not None
    nested = None
    if fourbit:
        cb = codebook(scheme.format, w.device)
        if scales is not None:
            scales = scales.float().to(w.device)
        elif static:
            eff, nested = stored_scales(search_block_scales(w, h, g, scheme.format, grid, min_ratio), scheme)
            scales = eff.view(out_f, -1)
        else:
            scales = torch.zeros(out_f, n // g, device=w.device)
    else:
        scales = search_row_scales(w, h).unsqueeze(1)  # one scale per row

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n, device=w.device)
    w, hp = w[:, perm], h[perm.unsqueeze(1), perm.unsqueeze(0)]
    if static:
        h = None  # only dynamic block scales read it again; n x n floats each copy, so hold as few as can be
    hp.diagonal().add_(damp * torch.mean(torch.diag(hp)))
    hinv = torch.linalg.cholesky(hp)
    del hp
    hinv = torch.cholesky_inverse(hinv)
    hinv = torch.linalg.cholesky(hinv, upper=True)

    codes = torch.zeros(out_f, n, dtype=torch.uint8 if fourbit else torch.int8, device=w.device)
    rounded = torch.empty(out_f, n, device=w.device) if latent else None
    block = 128 if static else max(g, 128 // g * g)  # dynamic scales need whole groups inside a block
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if fourbit and not static and col % g == 0:  # entering a block: fix its scale now
                gi = col // g
                blk = w1[:, i : i + g]
                scales[:, gi] = _block_scale(blk, h[col : col + g, col : col + g], cb, grid, min_ratio)
            s = scales[:, col // g]
            x = w1[:, i]
            if fourbit:
                c = nearest_code(x / torch.where(s > 0, s, torch.ones_like(s)), cb)
                q = cb[c] * s
            else:
                c = torch.clamp(torch.round(x * (127.0 / torch.where(s > 0, s, torch.ones_like(s)))), -127, 127)
                q = c * s * (1 / 127)
            codes[:, col] = c.to(codes.dtype)
            if rounded is not None:
                rounded[:, col] = x
            e = (x - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if fourbit:
        out = FourBitWeight(codes.to(torch.uint8), scales.reshape(-1).contiguous(), scheme.format, g, dtype, nested)
    else:
        out = Int8Weight(codes=codes.to(torch.int8), scb=scales.squeeze(1).contiguous(), threshold=scheme.threshold)
    if rounded is not None:
        out.latent = rounded
    return out


def _block_scale(blk: torch.Tensor, hb: torch.Tensor, cb: torch.Tensor, grid: int, min_ratio: float) -> torch.Tensor:
    absmax = blk.abs().amax(-1)
    best, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
    for r in torch.linspace(1.0, min_ratio, grid, device=blk.device):
        s = absmax * r
        c = nearest_code(blk / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1), cb)
        err = quadratic_error(blk - cb[c] * s.unsqueeze(1), hb)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def gptq_layers(weights: list[torch.Tensor], h: torch.Tensor, scheme, dtype: torch.dtype, **opts) -> list[QuantizedWeight]:
    """GPTQ of several layers reading the same input (same ``h``), in one pass over their stacked rows.

    GPTQ treats rows independently given ``h``, so this equals quantizing each layer alone; with
    double quantization each layer's scales are still chosen and stored per layer.
    """
    if len(weights) == 1:
        return [gptq(weights[0], h, scheme, dtype, **opts)]
    rows = [w.shape[0] for w in weights]
    stacked = torch.cat([w.detach().float() for w in weights])
    if isinstance(scheme, FourBit) and scheme.double_quant:
        per = [stored_scales(search_block_scales(w.detach().float(), h, scheme.group_size, scheme.format,
                                                 opts.get("grid", 20), opts.get("min_ratio", 0.5)), scheme) for w in weights]
        scales = torch.cat([eff.view(r, -1) for (eff, _), r in zip(per, rows)])
        q = gptq(stacked, h, scheme, dtype, scales=scales, **opts)
        codes = q.codes.split(rows)
        out = [FourBitWeight(c, eff, scheme.format, scheme.group_size, dtype, nested) for c, (eff, nested) in zip(codes, per)]
    else:
        q = gptq(stacked, h, scheme, dtype, **opts)
        if isinstance(q, FourBitWeight):
            nb = q.codes.shape[1] // q.group_size
            out = [FourBitWeight(c, s.reshape(-1).contiguous(), q.quant_type, q.group_size, dtype)
                   for c, s in zip(q.codes.split(rows), q.scales.view(-1, nb).split(rows))]
        else:
            out = [Int8Weight(c, s.contiguous(), q.threshold) for c, s in zip(q.codes.split(rows), q.scb.split(rows))]
    if hasattr(q, "latent"):
        for o, part in zip(out, q.latent.split(rows)):
            o.latent = part
    return out


@register("gptq")
class GPTQ(Algorithm):
    calibrated = True
    keep_latent = False  # whether results carry the values GPTQ rounded (a start for tuning)

    def quantize(self, weight: torch.Tensor, scheme, dtype: torch.dtype, stats: LayerStats | None = None) -> QuantizedWeight:
        if isinstance(scheme, Keep):
            return KeptWeight(weight.detach().to(scheme.dtype))
        return gptq(weight, _hessian(stats, weight), scheme, dtype, latent=self.keep_latent, **_options(stats))

    def quantize_many(self, weights: list[torch.Tensor], scheme, dtype: torch.dtype,
                      stats: LayerStats | None = None) -> list[QuantizedWeight]:
        if isinstance(scheme, Keep):
            return super().quantize_many(weights, scheme, dtype, stats)
        return gptq_layers(weights, _hessian(stats, weights[0]), scheme, dtype, latent=self.keep_latent, **_options(stats))


def _hessian(stats: LayerStats | None, weight: torch.Tensor) -> torch.Tensor:
    assert stats is not None and stats.hessian is not None, "gptq needs calibration statistics"
    return stats.hessian.to(weight.device)


def _options(stats: LayerStats) -> dict:
    """gptq()'s settings from the recipe's calibration section."""
    o = stats.options or {}
    return {"damp": o.get("damp", 0.01), "act_order": o.get("act_order", True),
            "grid": o.get("grid", 20), "min_ratio": o.get("min_ratio", 0.5)}
