"""Human-readable views of a plan and a run: grouped precision maps, size tables."""

from __future__ import annotations

import re
import sys
from collections import OrderedDict

from rich.console import Console
from rich.table import Table

from .plan import Plan, PlanEntry


def make_console(stderr: bool = False) -> Console:
    """Rich console; wide when not a terminal, so piped tables and paths are not cut."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200, soft_wrap=not stream.isatty())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def layer_pattern(name: str) -> str:
    """``model.layers.12.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def grouped_rows(layers: list[dict]) -> list[tuple[str, str, int, str]]:
    """(layer pattern, format, count, method) rows in model order, from ``{"name", "format", "method"}`` records."""
    rows: "OrderedDict[tuple[str, str, str], int]" = OrderedDict()
    for layer in layers:
        key = (layer_pattern(layer["name"]), layer["format"], layer.get("method") or "-")
        rows[key] = rows.get(key, 0) + 1
    return [(pat, fmt, n, method) for (pat, fmt, method), n in rows.items()]


def grouped(entries: list[PlanEntry]) -> list[tuple[str, str, int, str]]:
    return grouped_rows([{"name": e.name, "format": e.label(), "method": e.method} for e in entries])


def format_counts(plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in plan.entries:
        counts[e.label()] = counts.get(e.label(), 0) + 1
    return counts


def plan_table(plan: Plan, per_layer: bool) -> Table:
    t = Table(title="plan" if per_layer else "precision map", title_justify="left")
    if per_layer:
        for col in ("layer", "shape (out×in)", "format", "method", "from", "bytes"):
            t.add_column(col, justify="right" if col == "bytes" else "left")
        for e in plan.entries:
            t.add_row(e.name, f"{e.out_features}×{e.in_features}", e.label(), e.method or "-", e.source, human_bytes(e.nbytes))
    else:
        for col in ("layers", "count", "format", "method"):
            t.add_column(col)
        for pat, label, n, method in grouped(plan.entries):
            t.add_row(pat, str(n), label, method)
    return t


def size_lines(plan: Plan) -> list[str]:
    after = plan.total_bytes
    return [
        f"size before: {human_bytes(plan.float_bytes)} ({str(plan.model_dtype).removeprefix('torch.')})",
        f"size after:  {human_bytes(after)} ({after / max(plan.float_bytes, 1):.1%} of before)",
        f"bits per weight: {plan.linear_bits_per_weight():.2f} over the Linear layers the recipe formats, "
        f"{plan.model_bits_per_weight():.2f} over the whole model",
    ]


def print_plan(plan: Plan, console: Console, per_layer: bool = True) -> None:
    console.print(plan_table(plan, per_layer))
    for line in size_lines(plan):
        console.print(line)
