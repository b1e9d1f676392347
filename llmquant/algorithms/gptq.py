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

from .. import memory
from ..memory import give_memory_back
from ..quantized import FourBitWeight, Int8Weight, KeptWeight, NestedScales, QuantizedWeight, codebook
from ..schemes import FourBit, Keep
from . import Algorithm, register
from .grid import (SEARCH_CHUNK_WEIGHTS, SortedCodebook, nearest_code, quadratic_error, search_block_scales, search_row_scales,
                   sorted_codebook)
from .scale_search import LayerStats, stored_scales


# Rows are solved a chunk at a time on CPU: GPTQ treats rows independently given the Hessian, so the weight-sized
# temporaries (the float copy being compensated and the permuted weight it is made from) are those of a chunk of
# about this many weights (64 MB in float32), whatever the layer's size. A multiple of the scale
# search's chunk, so that its row chunks are the ones it would take over the whole weight. On a GPU, where the
# column loop's cost is its kernel launches (per column, whatever the rows), all rows at once when they fit.
GPTQ_CHUNK_WEIGHTS = 16 * SEARCH_CHUNK_WEIGHTS
# The temporaries of solving rows at once, in float32 copies of those rows (compensated, permuted, rounded, error)
SOLVE_COPIES = 4


def row_chunk(weights: list[torch.Tensor], n: int) -> int:
    """How many rows of each layer to solve at a time: on a GPU with room for all of them (:data:`SOLVE_COPIES`
    float32 copies of the widest layer in half its free memory), all; else chunks of :data:`GPTQ_CHUNK_WEIGHTS`."""
    most = max(w.shape[0] for w in weights)
    device = weights[0].device
    if device.type == "cuda" and SOLVE_COPIES * 4 * most * n <= memory.free_bytes(device) // 2:
        return most
    return max(1, GPTQ_CHUNK_WEIGHTS // n)


def gptq(w: torch.Tensor, h: torch.Tensor, scheme, dtype: torch.dtype, damp: float = 0.01, act_order: bool = True,
         grid: int = 20, min_ratio: float = 0.5, scales: torch.Tensor | None = None, latent: bool = False) -> QuantizedWeight:
    """GPTQ of one weight ``[out, in]`` on inputs with Hessian ``h``.

    ``scales`` (4-bit only): the block scales to use, as stored (``[out, in / group]``), chosen
    beforehand; by default they are searched (static) or chosen on entering each block (dynamic).
    ``latent``: also keep, as ``.latent`` of the result, the values GPTQ rounded (each column as
    updated by the compensation so far; the codes are their nearest grid points), float32 ``[out, in]``.
    """
    return gptq_layers([w], h, scheme, dtype, damp=damp, act_order=act_order, grid=grid, min_ratio=min_ratio,
                       scales=None if scales is None else [scales], latent=latent)[0]


def gptq_layers(weights: list[torch.Tensor], h: torch.Tensor, scheme, dtype: torch.dtype, damp: float = 0.01,
                act_order: bool = True, grid: int = 20, min_ratio: float = 0.5, scales: list[torch.Tensor] | None = None,
                latent: bool = False, owned: bool = False) -> list[QuantizedWeight]:
    """GPTQ of several layers reading the same input (same ``h``): the inverse Hessian is factored once and
    every layer's rows are solved with it, a chunk of rows at a time. GPTQ treats rows independently given
    ``h``, so this equals quantizing each layer alone; each layer's scales are chosen and stored per layer.

    Each result's ``output_error`` is ``tr(E H Eᵀ)`` for its error ``E = W - Q``, taken from the solve itself (the
    rounding errors it compensates sum to that quantity for the damped ``H``; the damping's share is taken off), so
    that ``h`` is not needed once factored: with static scales the caller may hand it over (``owned``: no other
    reference kept, its values no longer needed), and it is then permuted and factored in its own memory, so that
    one ``n x n`` matrix (and a few blocks) is all the factoring holds."""
    given = h
    h = h.float()
    n = h.shape[0]
    dead = torch.diag(h) == 0
    if dead.any():  # inputs that were always zero: a copy of h with them made harmless
        h = h.clone()
        h[dead, dead] = 1.0
    fourbit = isinstance(scheme, FourBit)
    g = scheme.group_size if fourbit else n
    static = act_order or (fourbit and scheme.double_quant) or not fourbit or scales is not None
    rows = row_chunk(weights, n)
    cb = sorted_codebook(codebook(scheme.format, h.device)) if fourbit else None  # once, for every column

    # each layer's scales as bitsandbytes will dequantize with ([out, in / group]; int8: [out, 1])
    chosen = []
    for k, w in enumerate(weights):
        nested = None
        parts = (_rows(w, r, rows, dead) for r in range(0, w.shape[0], rows))  # made one at a time as searched
        if not fourbit:
            sc = torch.cat([search_row_scales(p, h) for p in parts]).unsqueeze(1)  # one scale per row
        elif scales is not None:
            sc = scales[k].float().to(w.device).view(w.shape[0], -1)
        elif static:
            eff, nested = stored_scales(torch.cat([search_block_scales(p, h, g, scheme.format, grid, min_ratio) for p in parts]), scheme)
            sc = eff.view(w.shape[0], -1)
        else:
            sc = torch.zeros(w.shape[0], n // g, device=w.device)
        chosen.append((sc, nested))

    # The scale search's temporaries (under glibc's mmap threshold: freed to the heap, and still counted in the
    # process's memory until trimmed) go back before the n x n matrices of the factoring are made.
    give_memory_back()
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n, device=h.device)
    order = perm.tolist()  # the column loop's indices on the host, read once (not a device sync per column)
    mine = static and (owned or h is not given)  # nobody reads h again: permuted and factored in its own memory
    if not act_order:
        hp = h if mine else h.clone()
    else:
        hp = _permute_in_place(h, perm) if mine else h[perm.unsqueeze(1), perm.unsqueeze(0)]
    if static:
        h = None  # only dynamic block scales read it again; n x n floats each copy, so hold as few as can be
    mean_diag = torch.mean(torch.diag(hp))
    lam = damp * mean_diag
    hp.diagonal().add_(lam)
    added: list[float] = []
    hinv = inverse_cholesky_upper(hp, step=float(lam), added=added)  # in hp's memory: one n x n matrix, not two
    del hp

    out = []
    for w, (sc, nested) in zip(weights, chosen):
        codes = torch.zeros(w.shape, dtype=torch.uint8 if fourbit else torch.int8, device=w.device)
        rounded = torch.empty(w.shape, device=w.device) if latent else None
        compensated = torch.zeros((), dtype=torch.float64, device=w.device)  # Σ e², e: each rounding error / hinv[i, i]
        squared = torch.zeros((), dtype=torch.float64, device=w.device)  # ‖W - Q‖²
        for r in range(0, w.shape[0], rows):
            _solve_rows(_rows(w, r, rows, dead, perm), sc[r : r + rows], codes[r : r + rows],
                        None if rounded is None else rounded[r : r + rows], hinv, order, h, cb, g, static, grid, min_ratio,
                        compensated)
            squared += _squared_error(w, codes, sc, r, min(r + rows, w.shape[0]), dead, scheme, g, dtype)
        q = _stored(codes, sc, scheme, g, dtype, nested)
        if rounded is not None:
            q.latent = rounded
        q.output_error = max(float(compensated - lam * squared), 0.0)
        if added:  # the Hessian was not positive definite with the damping asked for
            q.damping = damp + max(added) / float(mean_diag)
        out.append(q)
    return out


# ---- the factoring, in place -------------------------------------------------------------

# Blocks of the in-place factoring: its temporaries are a few n x FACTOR_BLOCK panels.
FACTOR_BLOCK = 512


class FactoringError(ValueError):
    """The Hessian could not be factored even with much more damping (non-finite statistics)."""


DAMPING_TRIES = 30  # each doubles the extra damping, from the damping asked for: up to 2^30 times it


def inverse_cholesky_upper(a: torch.Tensor, block: int | None = None, step: float = 0.0, added: list | None = None) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``a⁻¹`` (``a⁻¹ = Uᵀ U``, what GPTQ's column updates read), computed in
    ``a``'s own memory (``a`` symmetric positive definite, float, consumed; returned).

    With ``J`` the reversal of rows and columns and ``L`` the lower Cholesky factor of ``J a J``,
    ``a⁻¹ = J L⁻ᵀ L⁻¹ J = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular with a positive diagonal:
    it is ``U``. ``L`` and then ``L⁻¹`` are computed a block of columns at a time over ``a`` itself, so the
    factoring holds one ``n x n`` matrix where factoring, inverting and factoring again (torch's
    ``cholesky``, ``cholesky_inverse``, ``cholesky``) hold two; equal to that up to float32 rounding (a test checks).

    A diagonal block that is not positive definite (a Hessian of nearly dependent inputs, in float32) gets more
    damping on its diagonal, ``step`` and then twice as much each try (a modified Cholesky factoring: the columns
    before it keep theirs), and the amount each such block got is appended to ``added``; :class:`FactoringError` when
    :data:`DAMPING_TRIES` tries do not do.
    """
    n, block = a.shape[0], block or FACTOR_BLOCK
    _reverse(a)
    for k in range(0, n, block):  # the lower factor, right-looking: factor a diagonal block, solve its panel, update
        e = min(k + block, n)
        d, info = torch.linalg.cholesky_ex(a[k:e, k:e])
        extra = max(step, 1e-8 * float(a[k:e, k:e].diagonal().abs().mean()), 1e-12)
        total = 0.0
        for _ in range(DAMPING_TRIES):
            if not info.item():
                break
            a[k:e, k:e].diagonal().add_(extra)
            total += extra
            d, info = torch.linalg.cholesky_ex(a[k:e, k:e])
            extra *= 2
        if total and added is not None:
            added.append(total)
        if info.item():
            raise FactoringError("the inputs' Hessian could not be factored, even with much more damping (non-finite "
                                 "calibration activations?)")
        a[k:e, k:e] = d
        a[k:e, e:] = 0.0
        if e < n:
            a[e:, k:e] = torch.linalg.solve_triangular(d.t(), a[e:, k:e], upper=True, left=False)
            for j in range(e, n, block):  # only the trailing matrix's lower block columns are read again
                a[j:, j : j + block].addmm_(a[j:, k:e], a[j : j + block, k:e].t(), alpha=-1)
    for k in reversed(range(0, n, block)):  # its inverse, from the bottom-right block up
        e = min(k + block, n)
        dinv = torch.linalg.solve_triangular(a[k:e, k:e], torch.eye(e - k, dtype=a.dtype, device=a.device), upper=False)
        a[k:e, k:e] = dinv
        if e < n:  # the panel below: -(the trailing inverse) @ panel @ dinv
            a[e:, k:e] = (a[e:, e:] @ a[e:, k:e]) @ dinv.neg_()
    _reverse(a)
    return a


def _reverse(a: torch.Tensor) -> None:
    """``a <- J a J`` in place: rows and columns in reverse order, a row's copy at a time."""
    n = a.shape[0]
    for i in range(n // 2):
        top = a[i].flip(0)
        a[i] = a[n - 1 - i].flip(0)
        a[n - 1 - i] = top
    if n % 2:
        a[n // 2] = a[n // 2].flip(0)


def _permute_in_place(a: torch.Tensor, perm: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``a[perm][:, perm]`` in ``a``'s own memory: rows moved along the permutation's cycles (one row set aside per
    cycle), then each slice of ``rows`` rows has its columns permuted through a slice-sized copy."""
    p = perm.tolist()
    done = [False] * len(p)
    for start in range(len(p)):
        if done[start]:
            continue
        done[start] = True
        if p[start] == start:
            continue
        first, i = a[start].clone(), start
        while p[i] != start:  # new row i is old row p[i]
            a[i] = a[p[i]]
            i = p[i]
            done[i] = True
        a[i] = first
    for r in range(0, a.shape[0], rows):
        a[r : r + rows] = a[r : r + rows][:, perm]
    return a


def _rows(w: torch.Tensor, start: int, count: int, dead: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``start : start + count`` of ``w`` as a float32 copy, inputs that were always zero zeroed; with ``perm``,
    its columns in that order (permuted before the copy widens them: one float32 copy at a time)."""
    part = w[start : start + count].detach()
    if perm is not None:
        part, dead = part[:, perm], dead[perm]
    part = part.to(torch.float32, copy=True)
    part[:, dead] = 0.0
    return part


def _stored(codes: torch.Tensor, scales: torch.Tensor, scheme, g: int, dtype: torch.dtype,
            nested: NestedScales | None = None) -> QuantizedWeight:
    """The weight as stored from its codes and scales (``[out, in / group]``; int8: ``[out, 1]``)."""
    if isinstance(scheme, FourBit):
        return FourBitWeight(codes, scales.reshape(-1).contiguous(), scheme.format, g, dtype, nested)
    return Int8Weight(codes=codes, scb=scales.squeeze(1).contiguous(), threshold=scheme.threshold)


def _squared_error(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, start: int, stop: int, dead: torch.Tensor,
                   scheme, g: int, dtype: torch.dtype) -> torch.Tensor:
    """``‖W - Q‖²`` over rows ``start : stop``, in float64, a few rows at a time (small temporaries)."""
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    step = max(1, (1 << 20) // w.shape[1])
    for r in range(start, stop, step):
        q = _stored(codes[r : min(r + step, stop)], scales[r : min(r + step, stop)], scheme, g, dtype).dequantize()
        total += (_rows(w, r, len(q), dead) - q).square().sum(dtype=torch.float64)
    return total


def _solve_rows(w: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, rounded: torch.Tensor | None,
                hinv: torch.Tensor, order: list[int], h: torch.Tensor | None, cb: SortedCodebook | None, g: int,
                static: bool, grid: int, min_ratio: float, compensated: torch.Tensor) -> None:
    """GPTQ of rows ``w`` (float32, columns in the order ``order``) with the upper Cholesky factor ``hinv`` of the
    permuted inverse Hessian; writes ``codes`` (and ``rounded``) in the original column order, and ``scales``
    (views of the layer's) as dynamic block scales are fixed; adds the squared scaled rounding errors to
    ``compensated``."""
    fourbit = cb is not None
    n = w.shape[1]
    block = 128 if static else max(g, 128 // g * g)  # dynamic scales need whole groups inside a block
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            if fourbit and not static and col % g == 0:  # entering a block: fix its scale now
                scales[:, col // g] = _block_scale(w1[:, i : i + g], h[col : col + g, col : col + g], cb, grid, min_ratio)
            s = scales[:, col // g]
            x = w1[:, i]
            if fourbit:
                c = nearest_code(x / torch.where(s > 0, s, torch.ones_like(s)), cb)
                q = cb.values[c] * s
            else:
                c = torch.clamp(torch.round(x * (127.0 / torch.where(s > 0, s, torch.ones_like(s)))), -127, 127)
                q = c * s * (1 / 127)
            codes[:, col] = c.to(codes.dtype)
            if rounded is not None:
                rounded[:, col] = x
            e = (x - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        compensated += err1.square().sum(dtype=torch.float64)
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)  # in place: no weight-sized product


def _block_scale(blk: torch.Tensor, hb: torch.Tensor, cb: SortedCodebook, grid: int, min_ratio: float) -> torch.Tensor:
    absmax = blk.abs().amax(-1)
    best, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
    for r in torch.linspace(1.0, min_ratio, grid, device=blk.device):
        s = absmax * r
        c = nearest_code(blk / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1), cb)
        err = quadratic_error(blk - cb.values[c] * s.unsqueeze(1), hb)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


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
        owned = stats is not None and stats.owned
        return gptq_layers(weights, _hessian(stats, weights[0], take=True), scheme, dtype, latent=self.keep_latent,
                           owned=owned, **_options(stats))


def _hessian(stats: LayerStats | None, weight: torch.Tensor, take: bool = False) -> torch.Tensor:
    """``stats``' Hessian on the weight's device; with ``take``, when the caller handed it over (``stats.owned``),
    ``stats`` lets go of it, so that the solve can free it once factored."""
    assert stats is not None and stats.hessian is not None, "gptq needs calibration statistics"
    h = stats.hessian.to(weight.device)
    if take and stats.owned:
        stats.hessian = None
    return h


def _options(stats: LayerStats) -> dict:
    """gptq()'s settings from the recipe's calibration section."""
    o = stats.options or {}
    return {"damp": o.get("damp", 0.01), "act_order": o.get("act_order", True),
            "grid": o.get("grid", 20), "min_ratio": o.get("min_ratio", 0.5)}
