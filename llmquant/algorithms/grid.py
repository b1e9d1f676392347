"""Rounding onto bitsandbytes' own grids, and choosing block scales by an output-error objective.

Pure tensor math. A 4-bit weight ``w`` in a block with scale ``s`` is stored as the
code ``c`` minimizing ``|w / s - codebook[c]|`` (values beyond the scale clip to the
ends of the codebook); an int8 weight as ``round(127 w / scb)`` clipped to ±127.

The objective for a weight error ``E = W - Ŵ`` on inputs ``X`` is the output error
``||X Eᵀ||² = Σ_rows e H eᵀ`` with ``H = XᵀX`` (per token): exact, and cheap once
``H`` is known.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..quantized import INT8_INV_127, codebook


class SortedCodebook(NamedTuple):
    """A codebook made ready for rounding (once, where a loop rounds many times): the midpoints between its sorted
    values, and the code of each sorted value."""

    values: torch.Tensor  # by code, as the codebook
    mids: torch.Tensor
    order: torch.Tensor


def sorted_codebook(cb: torch.Tensor | SortedCodebook) -> SortedCodebook:
    if isinstance(cb, SortedCodebook):
        return cb
    values, order = torch.sort(cb)
    # 32-bit indices: a weight-sized tensor of them is half the memory of int64 ones
    return SortedCodebook(cb, (values[1:] + values[:-1]) / 2, order.to(torch.int32))


def nearest_code(x: torch.Tensor, cb: torch.Tensor | SortedCodebook) -> torch.Tensor:
    """Index of the codebook value nearest to each element of ``x`` (any shape)."""
    grid = sorted_codebook(cb)
    return grid.order[torch.bucketize(x.contiguous(), grid.mids, out_int32=True)]


def round_4bit(w: torch.Tensor, scales: torch.Tensor, cb: torch.Tensor | SortedCodebook) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of ``w`` ([..., g]) with one scale per row of the last dim (``scales`` [...])."""
    s = scales.unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    grid = sorted_codebook(cb)
    codes = nearest_code(w / safe, grid)
    return codes, grid.values[codes] * s


def round_int8(w: torch.Tensor, scb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of rows ``w`` [out, ...] with row scales ``scb`` [out], and their dequantized values."""
    s = scb.view(-1, *([1] * (w.dim() - 1)))
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.clamp(torch.round(w * (127.0 / safe)), -127, 127)
    return codes.to(torch.int8), codes * s * INT8_INV_127


def quadratic_error(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``Σ_j,k e_j H_jk e_k`` along the last dimension (``h`` symmetric)."""
    return ((e @ h) * e).sum(-1)


def diagonal_blocks(h: torch.Tensor, group: int) -> torch.Tensor:
    """The ``[n_blocks, group, group]`` diagonal blocks of ``h``."""
    n = h.shape[0] // group
    idx = torch.arange(n, device=h.device) * group
    ar = torch.arange(group, device=h.device)
    rows = (idx[:, None] + ar[None, :])  # [n, g]
    return h[rows[:, :, None], rows[:, None, :]]


# rows are searched a few at a time: each search's float32 temporaries (a dozen weight-sized ones) are 4 MB each
SEARCH_CHUNK_WEIGHTS = 1 << 20


def search_block_scales(w: torch.Tensor, h: torch.Tensor | None, group: int, quant_type: str,
                        grid: int = 20, min_ratio: float = 0.5) -> torch.Tensor:
    """Per block (``group`` consecutive inputs of a row), the scale in ``absmax * [min_ratio, 1]``
    minimizing the block's output error ``e H_bb eᵀ`` (``H_bb``: the block's diagonal block of H).

    Returns scales ``[out, in / group]``. The absmax candidate is tried first and only a strictly
    better one replaces it, so the result is never worse on this objective than bitsandbytes' own scale.
    """
    out_f, in_f = w.shape
    rows = max(1, SEARCH_CHUNK_WEIGHTS // in_f)
    if out_f > rows:  # rows are independent: a few at a time, each search's temporaries a fraction of the weight's
        return torch.cat([search_block_scales(part, h, group, quant_type, grid, min_ratio) for part in w.split(rows)])
    cb = sorted_codebook(codebook(quant_type, w.device))  # once: every candidate ratio rounds with it
    blocks = w.float().reshape(out_f, in_f // group, group)
    absmax = blocks.abs().amax(-1)
    hb = diagonal_blocks(h.float(), group) if h is not None else None  # [nb, g, g]

    def error(ratio: torch.Tensor) -> torch.Tensor:  # ratio: [out, nb] (or broadcastable)
        e = blocks - round_4bit(blocks, absmax * ratio, cb)[1]  # [out, nb, g]
        if hb is None:
            return (e * e).sum(-1)
        et = e.transpose(0, 1)  # [nb, out, g]
        return (torch.bmm(et, hb) * et).sum(-1).t()

    # A coarse grid over [min_ratio, 1], then each block refines around its own best ratio:
    # fewer evaluations than a uniform grid of `grid` steps (14 instead of 20), at a finer resolution.
    coarse = max(2, grid // 2)
    step = (1.0 - min_ratio) / (coarse - 1)
    best_r = torch.ones_like(absmax)
    best_err = error(best_r)  # absmax first: only strictly better scales replace it
    for r in torch.linspace(1.0, min_ratio, coarse, device=w.device)[1:]:
        err = error(r)
        better = err < best_err
        best_err, best_r = torch.where(better, err, best_err), torch.where(better, r, best_r)
    while step > (1.0 - min_ratio) / max(grid - 1, 1):
        step /= 2
        for d in (-step, step):
            cand = (best_r + d).clamp(min_ratio, 1.0)
            err = error(cand)
            better = err < best_err
            best_err, best_r = torch.where(better, err, best_err), torch.where(better, cand, best_r)
    return absmax * best_r


def search_row_scales(w: torch.Tensor, h: torch.Tensor | None, grid: int = 20, min_ratio: float = 0.8) -> torch.Tensor:
    """Per row, the int8 scale in ``absmax * [min_ratio, 1]`` minimizing ``e H eᵀ``."""
    absmax = w.abs().amax(-1)
    best, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
    for r in torch.linspace(1.0, min_ratio, grid, device=w.device):
        s = absmax * r
        _, q = round_int8(w, s)
        e = w - q
        err = quadratic_error(e, h) if h is not None else (e * e).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best
