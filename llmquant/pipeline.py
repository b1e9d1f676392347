"""``llmquant run``: the steps in order.

recipe -> model -> plan -> weights chosen -> layers swapped -> written -> reloaded and checked -> in place.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from . import __version__
from .export import ExportCheck, atomic_output, check_output_dir, probe_ids, safetensors_bytes, verify_export, write_checkpoint, MARKER_FILE
from .models import load_model, resolve_source
from .plan import Plan, build_plan
from .quantize import quantize_model
from .recipe import Recipe, parse_size
from .report import format_counts, human_bytes, make_console, print_plan


@dataclass
class RunResult:
    recipe: Recipe
    plan: Plan
    output: Path | None = None
    check: ExportCheck | None = None
    file_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def run(recipe: Recipe, dry_run: bool = False, console: Console | None = None, progress: bool = True) -> RunResult:
    """Run a recipe. Plans and summaries go to ``console`` (stdout), progress notes to stderr."""
    console = console or make_console()
    log = make_console(stderr=True)
    timings: dict[str, float] = {}
    out = Path(recipe.output.dir)
    if not dry_run:
        check_output_dir(out, recipe.output.overwrite)  # before any heavy work

    t = time.perf_counter()
    m = recipe.model
    src = resolve_source(m.source, m.gguf_file, m.revision)
    log.print(f"loading {src.describe()} ...")
    model, tokenizer = load_model(src, m.dtype, recipe.device, m.trust_remote_code)
    timings["load"] = time.perf_counter() - t

    plan = build_plan(model, recipe.quantization, model.dtype)
    if dry_run:
        print_plan(plan, console, per_layer=True)
        console.print(f"estimated checkpoint size: {human_bytes(plan.file_bytes_estimate())}")
        return RunResult(recipe, plan, timings=timings)

    t = time.perf_counter()
    chosen = quantize_model(model, plan, progress=progress)
    timings["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    ids = probe_ids(tokenizer, model.config.get_text_config().vocab_size)
    with atomic_output(out, recipe.output.overwrite) as tmp:
        write_checkpoint(
            tmp, model, tokenizer, plan, chosen, parse_size(recipe.output.max_shard_size),
            extra_files={"recipe.yaml": recipe.to_yaml()},
        )
        timings["write"] = time.perf_counter() - t
        log.print("reloading the export to check it ...")
        check = verify_export(tmp, model, plan, chosen, ids)
        timings["check"] = check.seconds
        file_bytes = safetensors_bytes(tmp)
        timings["total"] = sum(timings.values())
        result = RunResult(recipe, plan, out, check, file_bytes, timings)
        (tmp / MARKER_FILE).write_text(json.dumps(run_metadata(result, src.describe()), indent=2) + "\n")

    print_summary(result, console)
    return result


def run_metadata(r: RunResult, source: str) -> dict:
    """``llmquant.json``: what was made, how, and how it checked out."""
    import bitsandbytes
    import torch
    import transformers

    plan = r.plan
    qcfg = plan.quantization_config()
    return {
        "llmquant_version": __version__,
        "base_model": source,
        "checkpoint_format": "none" if qcfg is None else qcfg["quant_method"],
        "model_dtype": str(plan.model_dtype).removeprefix("torch."),
        "layers": [
            {"name": e.name, "format": e.label(), "method": e.method, "from": e.source, "bytes": e.nbytes,
             "shape": [e.out_features, e.in_features]}
            for e in plan.entries
        ],
        "sizes": {
            "float_bytes": plan.float_bytes,
            "quantized_bytes": plan.total_bytes,
            "safetensors_bytes": r.file_bytes,
            "linear_bits_per_weight": round(plan.linear_bits_per_weight(), 4),
            "model_bits_per_weight": round(plan.model_bits_per_weight(), 4),
        },
        "export_check": r.check.to_dict() if r.check else None,
        "timings_seconds": {k: round(v, 2) for k, v in r.timings.items()},
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
        },
    }


def print_summary(r: RunResult, console: Console) -> None:
    print_plan(r.plan, console, per_layer=False)
    console.print("formats: " + ", ".join(f"{k} ×{v}" for k, v in format_counts(r.plan).items()))
    if r.check:
        console.print(
            f"export: {r.output}  ({human_bytes(r.file_bytes)} of safetensors; reloaded from disk, "
            f"{r.check.tensors_checked} layers identical, max |Δlogit| {r.check.max_abs_logit_diff:.2g})"
        )
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
