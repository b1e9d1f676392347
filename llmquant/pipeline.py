"""``llmquant run``: the steps in order.

recipe -> model -> plan -> weights chosen -> layers swapped -> written -> reloaded and checked -> in place.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from . import __version__
from . import card
from . import results as results_mod
from .checkpoint import file_digests
from .data import load_text
from .evaluate import Evaluation, ModelResult, check_tasks, linear_size
from .errors import UserError
from .export import MARKER_FILE, ExportCheck, atomic_output, check_output_dir, model_device, probe_ids, safetensors_bytes, verify_export, write_checkpoint
from .models import fingerprint, load_model, resolve_source
from .plan import Plan, build_plan
from .calibrate import SequentialCalibrator, calibration_windows, needs_calibration
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
    results: dict | None = None  # results.json, when the recipe evaluates
    calibration: dict | None = None  # per-layer reconstruction errors, when a method was calibrated


def run(recipe: Recipe, dry_run: bool = False, console: Console | None = None, progress: bool = True) -> RunResult:
    """Run a recipe. Plans and summaries go to ``console`` (stdout), progress notes to stderr."""
    console = console or make_console()
    log = make_console(stderr=True)
    timings: dict[str, float] = {}
    out = Path(recipe.output.dir)
    if not dry_run:
        check_output_dir(out, recipe.output.overwrite)  # before any heavy work

    t_start = t = time.perf_counter()
    m = recipe.model
    src = resolve_source(m.source, m.gguf_file, m.revision)
    eval_text = calib_text = None
    if recipe.eval and not dry_run:  # bad evaluation settings fail before the model loads
        eval_text = load_text(recipe.eval.text, "eval")
        check_tasks(recipe.eval.tasks)
    if recipe.calibration and not dry_run:
        calib_text = load_text(recipe.calibration.text, "calib")
        if recipe.eval and texts_overlap(recipe.calibration.text, recipe.eval.text):
            log.print("[yellow]warning:[/] the calibration text overlaps the evaluation text; quality numbers will be optimistic")
    log.print(f"loading {src.describe()} ...")
    model, tokenizer = load_model(src, m.dtype, recipe.device, m.trust_remote_code, allow_pickle=m.allow_pickle)
    timings["load"] = time.perf_counter() - t

    plan = build_plan(model, recipe.quantization, model.dtype)
    if dry_run:
        print_plan(plan, console, per_layer=True)
        console.print(f"estimated checkpoint size: {human_bytes(plan.file_bytes_estimate())}")
        return RunResult(recipe, plan, timings=timings)

    evaluation = Evaluation(recipe.eval, tokenizer, progress, log.print, eval_text) if recipe.eval else None
    try:
        evaluated: dict[str, ModelResult] = {}
        if evaluation and recipe.eval.baseline:
            t = time.perf_counter()
            key = evaluation.cache_key(fingerprint(src, model.config), model.dtype, model_device(model))
            size = {**linear_size(model), "bytes": plan.float_bytes, "measured_from": "tensor data"}
            evaluated["baseline"] = evaluation.run(model, _dtype_name(model.dtype), size, reference=True, cache_key=key)
            timings["eval_baseline"] = time.perf_counter() - t

        t = time.perf_counter()
        calibrator = None
        if needs_calibration(plan):
            c = recipe.calibration
            windows = calibration_windows(tokenizer, calib_text.text, c.nsamples, c.seqlen, c.seed)
            calibrator = SequentialCalibrator(model, plan, windows, c, model_device(model), progress, log.print)
        chosen = quantize_model(model, plan, progress=progress, calibration=calibrator)
        timings["quantize"] = time.perf_counter() - t
        calibration_report = _calibration_summary(calibrator, calib_text) if calibrator else None
        if calibration_report:
            log.print(calibration_report["summary"])

        if evaluation:
            t = time.perf_counter()
            size = {**linear_size(model), "bytes": plan.total_bytes, "measured_from": "tensor data"}
            evaluated["quantized"] = evaluation.run(model, describe(plan), size)
            timings["eval_quantized"] = time.perf_counter() - t

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
            timings["total"] = time.perf_counter() - t_start
            result = RunResult(recipe, plan, out, check, file_bytes, timings, calibration=calibration_report)
            if evaluation:
                info = {"source": src.describe(), "fingerprint": fingerprint(src, model.config),
                        "dtype": _dtype_name(model.dtype), "device": str(model_device(model))}
                result.results = results_mod.build(
                    {k: v.to_dict() for k, v in evaluated.items()}, evaluation.protocol(), info, recipe.to_dict(), timings
                )
                results_mod.write(tmp, result.results, f"{Path(recipe.output.dir).name}: perplexity vs size")
            meta = run_metadata(result, src.describe())
            meta["files"] = file_digests(tmp)
            (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / "README.md").write_text(card.render(tmp, recipe.hub.repo if recipe.hub else Path(recipe.output.dir).name))
    finally:
        if evaluation:
            evaluation.close()

    print_summary(result, console)
    if recipe.hub:
        from .hub import push

        h = recipe.hub
        url = push(out, h.repo, h.private, h.revision, h.commit_message, log=log.print)
        console.print(f"pushed to {h.repo}: {url}")
    return result


def texts_overlap(a, b) -> bool:
    """Could two text specs share text? (the same local source with intersecting ranges)."""
    if a.is_dataset or b.is_dataset:
        return False  # named datasets: calibration and evaluation use different splits
    return a.source == b.source and a.range[0] < b.range[1] and b.range[0] < a.range[1]


def _calibration_summary(cal, text) -> dict:
    errs = [r["layer_rel_error"] for r in cal.report]
    worst = max(range(len(errs)), key=errs.__getitem__)
    ordered = sorted(errs)
    return {
        "summary": (f"calibration: {len(errs)} decoder layers in {cal.seconds:.0f}s on {len(cal.windows)} windows of "
                    f"{cal.windows.shape[1]} tokens; layer output error median {ordered[len(ordered) // 2]:.2%}, "
                    f"max {errs[worst]:.2%} ({cal.report[worst]['layer']})"),
        "seconds": round(cal.seconds, 1),
        "text": text.meta,
        "windows": list(cal.windows.shape),
        "layers": cal.report,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(plan: Plan) -> str:
    """A short label for a quantized model: its formats and how many layers have each."""
    return ", ".join(f"{k} ×{v}" for k, v in format_counts(plan).items() if k != "unchanged")


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
        "calibration": r.calibration,
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
    if r.results:
        console.print(results_mod.rich_table(r.results))
        console.print(f"results: {r.output}/results.json, results.md, results.png")
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))


# ---- `llmquant eval`: any checkpoints, the same protocol -------------------------------------


def evaluate_only(model: str, spec, output: Path, overwrite: bool = False, baseline: str | None = None,
                  dtype: str = "auto", device: str = "auto", load_in: str | None = None,
                  trust_remote_code: bool = False, console: Console | None = None, progress: bool = True) -> dict:
    """Evaluate ``model`` (and ``baseline`` first, to measure divergence from it); write results to ``output``."""
    import gc

    console = console or make_console()
    log = make_console(stderr=True)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"output {str(output)!r} is a file, not a folder")
    if (output / "results.json").exists() and not overwrite:
        raise UserError(f"{output}/results.json exists; pass --overwrite to replace it")
    src = resolve_source(model)
    bsrc = resolve_source(baseline) if baseline else None
    from .checkpoint import check

    for s_ in (src, bsrc):  # damaged local checkpoints: one clear line before any loading
        if s_ is not None and s_.kind == "folder":
            check(s_.location)
    if bsrc is None and spec.divergence:
        spec = spec.model_copy(update={"divergence": False})
    text = load_text(spec.text, "eval")
    check_tasks(spec.tasks)
    qcfg = _load_in_config(load_in, dtype)

    t0 = time.perf_counter()
    evaluated: dict[str, ModelResult] = {}
    evaluation = None
    try:
        if bsrc is not None:
            log.print(f"loading baseline {bsrc.describe()} ...")
            bmodel, btok = load_model(bsrc, dtype, device, trust_remote_code, allow_quantized=True)
            evaluation = Evaluation(spec, btok, progress, log.print, text)
            key = evaluation.cache_key(fingerprint(bsrc, bmodel.config), bmodel.dtype, model_device(bmodel))
            evaluated["baseline"] = evaluation.run(bmodel, bsrc.short_name(), _size(bmodel, bsrc, None), reference=True, cache_key=key)
            del bmodel
            gc.collect()
        log.print(f"loading {src.describe()} ...")
        m, tok = load_model(src, dtype, device, trust_remote_code, quantization_config=qcfg, allow_quantized=True)
        if evaluation is None:
            evaluation = Evaluation(spec, tok, progress, log.print, text)
        elif spec.divergence:
            from .evaluate.perplexity import tokenize

            ids, _ = tokenize(tok, text.text, len(evaluation.ids))
            if not torch.equal(ids, evaluation.ids):
                raise UserError(f"{src.describe()} and {bsrc.describe()} tokenize the evaluation text differently; divergence needs one tokenizer")
        quantized = getattr(m, "hf_quantizer", None) is not None
        label = src.short_name() + (f" ({load_in} on load)" if load_in else "")
        evaluated["quantized" if quantized else "model"] = evaluation.run(m, label, _size(m, src, qcfg))
        info = {"source": src.describe(), "fingerprint": fingerprint(src, m.config), "dtype": _dtype_name(m.dtype),
                "device": str(model_device(m)), "load_in": load_in, "baseline": bsrc.describe() if bsrc else None}
        res = results_mod.build({k: v.to_dict() for k, v in evaluated.items()}, evaluation.protocol(), info,
                                timings={"total": time.perf_counter() - t0})
    finally:
        if evaluation is not None:
            evaluation.close()
    results_mod.write(output, res, f"{src.short_name()}: perplexity vs size")
    console.print(results_mod.rich_table(res))
    console.print(f"results: {output}/results.json, results.md, results.png")
    return res


def _load_in_config(load_in: str | None, dtype: str):
    if load_in is None:
        return None
    from transformers import BitsAndBytesConfig

    from .models import TORCH_DTYPES

    compute = TORCH_DTYPES.get(dtype, torch.float32)
    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=load_in.removeprefix("4bit-"), bnb_4bit_compute_dtype=compute)


def _size(model, src, qcfg) -> dict:
    """Checkpoint bytes (its safetensors files when it is a local folder loaded as stored) and bits per weight."""
    size = linear_size(model)
    files = list(Path(src.location).glob("*.safetensors")) if src.kind == "folder" and qcfg is None else []
    if files:
        size.update(bytes=sum(f.stat().st_size for f in files), measured_from="safetensors files")
    else:
        size.update(bytes=model.get_memory_footprint(), measured_from="memory footprint")
    return size
