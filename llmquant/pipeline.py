"""``llmquant run``: the steps in order.

recipe -> model -> plan -> weights chosen -> layers swapped -> written -> reloaded and checked -> in place.
"""

from __future__ import annotations

import io
import json
import platform
import shutil
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from . import __version__
from . import card, distributed
from . import needs as needs_mod
from . import results as results_mod
from .checkpoint import file_digests
from .data import load_text
from .evaluate import Evaluation, ModelResult, check_tasks, linear_size, planned_linear_size
from .errors import UserError
from .errors import ExportCheckError
from .export import (MARKER_FILE, ExportCheck, atomic_output, check_output_dir, keep_in_fp32_modules, keep_unchecked, logits_on,
                     model_device, output_lock, probe_ids, probe_summary, safetensors_bytes, verify_export, verify_streamed_export,
                     export_files, write_checkpoint, write_streamed_checkpoint)
from . import memory
from .memory import give_memory_back, import_bitsandbytes, steady_heap
from .models import (TOKENIZER_FILES, fingerprint, has_tokenizer, load_config, load_model, load_tokenizer, pick_device, resolve_dtype,
                     resolve_source)
from .stream import skeleton
from .plan import Plan, build_plan, row_tile
from .algorithms import ALGORITHMS
from .calibrate import SequentialCalibrator, calibration_windows, generated_windows, needs_calibration
from .quantize import quantize_model
from .walk import decoder_layers
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
    streamed: bool = False  # quantized layer by layer from the checkpoint files, never whole in memory
    resumed_from: int = 0  # decoder layer a streamed run resumed at
    auto: dict | None = None  # the format search of quantization.auto (llmquant.auto)
    peak_memory: dict = field(default_factory=dict)  # memory.peaks: host, and GPU on a CUDA run


def run(recipe: Recipe, dry_run: bool = False, console: Console | None = None, progress: bool = True) -> RunResult:
    """Run a recipe. Plans and summaries go to ``console`` (stdout), progress notes to stderr."""
    import_bitsandbytes()
    console = console or make_console()
    log = make_console(stderr=True)
    if distributed.launched() and not dry_run:
        if recipe.quantization.auto is not None:
            raise UserError("quantization.auto searches formats in one process: run it as one process, or put the rules it "
                            "chose (`llmquant run --dry-run` prints them) into the recipe and launch that")
        q = recipe.quantization
        tuned = sorted({m for m in (q.method, *(r.method for r in q.rules)) if m and ALGORITHMS[m].tunes})
        if tuned:
            raise UserError(f"method {tuned[0]} tunes each decoder layer in one process: run it as one process")
        return _run_distributed(recipe, console, log, progress)
    if dry_run:
        return _run(recipe, dry_run, console, log, progress)
    check_output_dir(Path(recipe.output.dir), recipe.output.overwrite)  # a bad output is refused before it is locked
    with output_lock(Path(recipe.output.dir)):
        return _run(recipe, dry_run, console, log, progress)


def _run(recipe: Recipe, dry_run: bool, console, log, progress: bool, device: torch.device | None = None) -> RunResult:
    timings: dict[str, float] = {}
    out = Path(recipe.output.dir)
    if not dry_run:
        check_output_dir(out, recipe.output.overwrite)  # before any heavy work

    t_start = t = time.perf_counter()
    m = recipe.model
    src = resolve_source(m.source, m.gguf_file, m.revision)
    eval_text = calib_text = None
    if not dry_run and (recipe.eval or recipe.calibration) and not has_tokenizer(src):
        needs = " and ".join(n for n, v in (("calibration", recipe.calibration), ("evaluation", recipe.eval)) if v)
        raise UserError(f"model folder {src.location!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                        f"{needs} need{'' if ' and ' in needs else 's'} one: copy the original model's tokenizer files into it")
    if recipe.eval and not dry_run:  # bad evaluation settings fail before the model loads
        eval_text = load_text(recipe.eval.text, "eval")
        check_tasks(recipe.eval.tasks)
    if recipe.calibration and not dry_run and recipe.calibration.generated < recipe.calibration.nsamples:
        calib_text = load_text(recipe.calibration.text, "calib")
        if recipe.eval and texts_overlap(recipe.calibration.text, recipe.eval.text):
            log.print("[yellow]warning:[/] the calibration text overlaps the evaluation text; quality numbers will be optimistic")
    # The plan needs only the model's structure: planned on a skeleton without memory, every bad rule or
    # unsupported model fails here, before any weight is read.
    config = load_config(src, m.trust_remote_code)
    dtype = resolve_dtype(m.dtype, src, config, pick_device(recipe.device))
    if recipe.calibration is not None and not dry_run:
        # before the skeleton: building it allocates (untouched) every weight once; with glibc's threshold raised by an
        # earlier free, that left a heap of ~1 GB free space (1B model) that later temporaries filled and stayed in
        steady_heap()
    frame = skeleton(config, dtype, m.trust_remote_code)
    tile = row_tile(pick_device(recipe.device))  # (4-bit row widths bitsandbytes' kernels there take)
    plan = build_plan(frame, recipe.quantization, dtype, tile)
    auto_report = reader = None
    if recipe.quantization.auto is not None:
        from . import auto

        t = time.perf_counter()
        problem = auto.prepare(recipe, frame, dtype)  # a budget that cannot be met fails here, before loading
        # the sensitivity pass (and a kl target's measurements) stream the checkpoint layer by layer when it can;
        # a model that cannot stream is loaded whole
        reader = _stream_reader(recipe, src, frame, log)
        if reader is None:
            _check_fits_for_auto(plan.float_bytes, dtype, recipe.device)
        search = needs_mod.estimate_auto(recipe, frame, dtype, reader is not None, problem)
        if dry_run:
            console.print("what the search of quantization.auto needs (estimates of the largest items):")
            for line in search.lines():
                console.print(f"  {line}")
        else:
            needs_mod.check(search, out, pick_device(recipe.device))  # before the search reads any weight
        recipe, auto_report = _choose_formats(recipe, problem, src, calib_text, log, progress, frame, reader, device, out)
        timings["auto"] = time.perf_counter() - t
        plan = build_plan(frame, recipe.quantization, dtype, tile)
        if auto_report["loadable_by"] == "transformers" and not plan.stock_compatible(keep_in_fp32_modules(frame)):
            raise UserError("quantization.auto: the chosen formats are not all loadable by stock transformers "
                            "(a keep-in-fp32 module of this model was given a 4-bit format?); pin it with a rule")
    if auto_report is None:  # (else the search of quantization.auto opened it already)
        reader = _stream_reader(recipe, src, frame, log, plan)
    needs = _needs(recipe, plan, frame, dtype, reader is not None)
    if dry_run:
        if reader is not None:
            reader.close()
        print_plan(plan, console, per_layer=True)
        console.print(f"estimated checkpoint size: {human_bytes(plan.file_bytes_estimate())}")
        console.print("what the run needs (estimates of the largest items):")
        for line in needs.lines():
            console.print(f"  {line}")
        if auto_report:
            measured = auto_report.get("measured_kl")
            console.print(f"quantization.auto ({auto_report['target']}): predicted KL divergence "
                          f"{auto_report['predicted_kl']:.4f}" + (f", measured {measured:.4f}" if measured is not None else "")
                          + " nats/token; the rules it chose:")
            console.print(yaml_rules(recipe), markup=False, highlight=False)
        return RunResult(recipe, plan, timings=timings, auto=auto_report)
    needs_mod.check(needs, out, pick_device(recipe.device))  # before any weight is loaded
    if distributed.active() and (reader is None or not needs_calibration(plan)):
        raise UserError("a run over several processes shares out calibration windows of a streamed model: "
                        + ("this recipe calibrates nothing" if reader is not None else "this one loads the whole model (see above)")
                        + "; run it as one process")
    if reader is not None:
        return _run_streamed(recipe, src, frame, plan, reader, calib_text, eval_text, console, log, progress, timings, t_start, device,
                             auto_report)
    del frame
    log.print(f"loading {src.describe()} ...")
    model, tokenizer = load_model(src, m.dtype, recipe.device, m.trust_remote_code, allow_pickle=m.allow_pickle)
    timings["load"] = time.perf_counter() - t

    plan = build_plan(model, recipe.quantization, model.dtype, tile)

    evaluation = Evaluation(recipe.eval, tokenizer, progress, log.print, eval_text) if recipe.eval else None
    try:
        evaluated: dict[str, ModelResult] = {}
        if evaluation and recipe.eval.baseline:
            t = time.perf_counter()
            key = evaluation.cache_key(fingerprint(src, model.config), model.dtype, model_device(model))
            evaluated["baseline"] = evaluation.run(model, _dtype_name(model.dtype), _baseline_size(model, plan), reference=True, cache_key=key)
            timings["eval_baseline"] = time.perf_counter() - t

        t = time.perf_counter()
        calibrator = None
        if needs_calibration(plan):
            c = recipe.calibration
            windows = _calibration_windows(c, tokenizer, calib_text, model, progress, log.print)
            calibrator = SequentialCalibrator(model, plan, windows, c, model_device(model), progress, log.print)
            if c.activations == "disk":
                log.print("calibration.activations: disk applies to streamed runs; this model is loaded whole, so its "
                          "activations stay in memory")
        chosen = quantize_model(model, plan, progress=progress, calibration=calibrator)
        timings["quantize"] = time.perf_counter() - t
        calibration_report = _calibration_summary(calibrator, calib_text) if calibrator else None
        if calibration_report:
            log.print(calibration_report["summary"])

        if evaluation:
            t = time.perf_counter()
            evaluated["quantized"] = evaluation.run(model, describe(plan), _quantized_size(model, plan))
            timings["eval_quantized"] = time.perf_counter() - t

        t = time.perf_counter()
        ids = probe_ids(tokenizer, model.config.get_text_config().vocab_size)
        info = {"source": src.describe(), "fingerprint": fingerprint(src, model.config),
                "dtype": _dtype_name(model.dtype), "device": str(model_device(model))}
        result = RunResult(recipe, plan, out, timings=timings, calibration=calibration_report, auto=auto_report)

        def results():
            if evaluation:
                result.results = results_mod.build(
                    {k: v.to_dict() for k, v in evaluated.items()}, evaluation.protocol(), info, recipe.to_dict(), timings
                )

        _export(result, src, t, t_start, log,
                write=lambda tmp: write_checkpoint(tmp, model, tokenizer, plan, chosen, parse_size(recipe.output.max_shard_size),
                                                   extra_files={"recipe.yaml": recipe.to_yaml()}),
                check=lambda tmp: verify_export(tmp, model, plan, chosen, ids),
                probe=lambda: probe_summary(ids, logits_on(model, ids), model_device(model)), results=results)
    finally:
        if evaluation:
            evaluation.close()

    _bench(result, src, log)
    print_summary(result, console)
    _push(recipe, out, console, log)
    return result


def _check_fits_for_auto(nbytes: int, dtype: torch.dtype, device_name: str) -> None:
    """``quantization.auto`` on a model that cannot be streamed (a GGUF file, renamed tensors) measures with the whole
    float model loaded: refuse before loading one whose weights alone exceed the free memory where it would go."""
    device = pick_device(device_name)
    spread = device.type == "cuda" and device_name == "auto" and torch.cuda.device_count() > 1  # over all GPUs
    free, where = memory.free_bytes(device, spread), "the GPUs" if spread else str(device)
    if nbytes > free:
        raise UserError(f"quantization.auto loads the float model whole to measure each layer's sensitivity "
                        f"({human_bytes(nbytes)} in {_dtype_name(dtype)}), more than the {human_bytes(free)} free on {where}: "
                        "choose the formats with quantization.rules, or run the search on a machine with more memory")


def _choose_formats(recipe: Recipe, problem, src, calib_text, log, progress: bool, frame=None, reader=None,
                    device: torch.device | None = None, out: Path | None = None):
    """``quantization.auto`` resolved into rules on the float model: streamed layer by layer from ``reader`` into the
    skeleton ``frame`` (its layers' inputs kept on disk beside the output while it runs), or loaded whole."""
    from . import auto

    m = recipe.model
    if calib_text is None:  # a dry run
        calib_text = load_text(recipe.calibration.text, "calib")
    if reader is not None:
        import tempfile

        log.print(f"streaming {src.describe()} layer by layer to choose the formats (quantization.auto) ...")
        tokenizer = load_tokenizer(src, m.trust_remote_code)
        parent = out.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.llmquant-auto-", dir=parent) as scratch:
            return auto.resolve(recipe, problem, frame, tokenizer, calib_text.text, progress, log.print,
                                streamed=(reader, device or pick_device(recipe.device), scratch))
    log.print(f"loading {src.describe()} to choose the formats (quantization.auto) ...")
    model, tokenizer = load_model(src, m.dtype, recipe.device, m.trust_remote_code, allow_pickle=m.allow_pickle)
    try:
        return auto.resolve(recipe, problem, model, tokenizer, calib_text.text, progress, log.print)
    finally:
        del model
        give_memory_back()


def yaml_rules(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump({"rules": recipe.to_dict()["quantization"]["rules"]}, sort_keys=False)


def _export(result: RunResult, src, t_write: float, t_start: float, log, write, check, probe, results=lambda: None,
            evaluate_export=lambda folder: None) -> None:
    """Write the checkpoint into a temporary folder, reload and check it, then put it in place.

    A failed check keeps what was written beside the output (``OUT.unchecked-...``), so the work is not
    lost: ``llmquant check KEPT --into OUT`` checks it again and puts it in place.
    """
    recipe, timings, out = result.recipe, result.timings, result.output
    with atomic_output(out, recipe.output.overwrite) as tmp:
        write(tmp)
        timings["write"] = time.perf_counter() - t_write
        result.file_bytes = safetensors_bytes(tmp)
        log.print("reloading the export to check it ...")
        try:
            result.check = check(tmp)
        except ExportCheckError as e:
            result.check = ExportCheck(None, None, 0, 0.0, probe(), passed=False, error=str(e))
            results()
            write_records(tmp, result, src.describe())
            kept = keep_unchecked(tmp, out)
            raise ExportCheckError(f"{e}. Nothing was written at {out}; the checkpoint is kept, unchecked, in {kept}: "
                                   f"`llmquant check {kept} --into {out}` checks it again and puts it in place") from None
        timings["check"] = result.check.seconds
        evaluate_export(tmp)  # the checked export itself (a streamed run never has the quantized model whole)
        timings["total"] = time.perf_counter() - t_start
        result.peak_memory = memory.peaks(pick_device(recipe.device))
        results()
        write_records(tmp, result, src.describe())
    for stale in out.absolute().parent.glob(f".{out.name}.llmquant-partial-*"):  # stopped runs of any recipe: superseded
        shutil.rmtree(stale, ignore_errors=True)


def _stream_reader(recipe: Recipe, src, model, log, plan: Plan | None = None):
    """A reader of the checkpoint when the run can stream it layer by layer into ``model`` (a skeleton), else None.

    Streaming needs the weights as safetensors whose names are the model's own; perplexity and divergence
    are streamed too, lm-eval tasks load each model whole for their turn (:func:`_whole_for_tasks`).
    """
    from .stream import CheckpointReader, local_folder, missing_tensors, stream_reason

    reason = stream_reason(src)
    c = recipe.calibration
    if reason is None and plan is not None and c is not None and needs_calibration(plan):
        if c.tune.model_steps > 0:
            reason = "calibration.tune.model_steps tunes the whole model at once"
        elif c.generated > 0:
            reason = "calibration.generated samples calibration windows from the whole float model"
    if reason is None:
        reader = CheckpointReader(local_folder(src))
        reader.rename_for(model)
        missing = missing_tensors(model, reader)
        if not missing:
            return reader
        reader.close()
        reason = f"the checkpoint names its tensors differently from the model (no {missing[0]})"
    log.print(f"loading the whole model ({reason})")
    return None


def _run_distributed(recipe: Recipe, console, log, progress: bool) -> RunResult:
    """``run`` in one of the processes torchrun / accelerate launch started: calibration shared out among them
    (see :mod:`llmquant.distributed`); process 0 reports, writes and checks, the others only calibrate."""
    device = distributed.start(pick_device(recipe.device))
    try:
        if distributed.rank() != 0:
            console = log = Console(file=io.StringIO())
            progress = False
        check_output_dir(Path(recipe.output.dir), recipe.output.overwrite)  # a bad output is refused before it is locked
        with ExitStack() as held:
            refused = None
            try:  # process 0 locks the output for the whole run; every process learns whether it could, and why not
                held.enter_context(output_lock(Path(recipe.output.dir), take=distributed.rank() == 0))
            except UserError as e:
                refused = e
            why = distributed.from_rank(None if refused is None else str(refused), 0)
            if why is not None:
                raise refused or UserError(why)
            return _run(recipe, False, console, log, progress, device)
    finally:
        distributed.stop()


def _run_streamed(recipe: Recipe, src, model, plan, reader, calib_text, eval_text, console, log, progress, timings, t_start,
                  device: torch.device | None = None, auto_report: dict | None = None) -> RunResult:
    """``run`` for a model streamed layer by layer from its checkpoint (see :mod:`llmquant.stream`).

    With ``eval:``, the baseline is evaluated streamed from the checkpoint before quantization, and the quantized
    model streamed from the written export once it passed its check: perplexity and divergence one decoder layer
    at a time over all windows (:func:`llmquant.stream.logits_layer_by_layer`)."""
    from .stream import STATE_FORMAT, LayeredReload, StreamedQuantizer, WorkFolder

    m, out = recipe.model, Path(recipe.output.dir)
    log.print(f"streaming {src.describe()} layer by layer"
              + (f" in {distributed.world_size()} processes ..." if distributed.active() else " ..."))
    tokenizer = load_tokenizer(src, m.trust_remote_code)
    device = device or pick_device(recipe.device)
    ids = probe_ids(tokenizer, model.config.get_text_config().vocab_size)
    timings["load"] = time.perf_counter() - t_start - timings.get("auto", 0.0)
    t = time.perf_counter()
    # (the code that made the saved layers: another llmquant, torch, transformers or bitsandbytes starts afresh)
    code = {k: v for k, v in results_mod.versions().items() if k in ("llmquant", "torch", "transformers", "bitsandbytes")}
    key = WorkFolder.key(recipe.to_dict()["quantization"], recipe.to_dict().get("calibration"), fingerprint(src, model.config),
                         str(plan.model_dtype), device.type, [int(i) for i in ids[0]], STATE_FORMAT, code)
    # the export's files, laid out from the plan and filled layer by layer (process 0 writes)
    work = WorkFolder(out, key).open(export_files(plan, parse_size(recipe.output.max_shard_size)) if distributed.rank() == 0 else None)
    # evaluation is process 0's alone, as writing is
    evaluation = Evaluation(recipe.eval, tokenizer, progress, log.print, eval_text) if recipe.eval and distributed.rank() == 0 else None
    evaluated: dict[str, ModelResult] = {}

    def evaluate_baseline(frame):
        if evaluation and recipe.eval.baseline:
            t = time.perf_counter()
            cache_key = evaluation.cache_key(fingerprint(src, model.config), plan.model_dtype, device)
            evaluated["baseline"] = _evaluate_streamed(
                evaluation, frame, reader, device, _dtype_name(plan.model_dtype), _baseline_size(model, plan), cache_key, progress,
                tasks_model=lambda: _whole_for_tasks(src, "baseline", plan.float_bytes, _dtype_name(plan.model_dtype), device, recipe, log.print))
            timings["eval_baseline"] = time.perf_counter() - t

    # With several processes, process 0 evaluates the baseline once the others are done: they would otherwise wait
    # for it in their first collective (for a 70B model with tasks, past the process group's timeout). It reads the
    # checkpoint into a skeleton of its own, as the model's is quantized layer by layer meanwhile.
    later = skeleton(model.config, plan.model_dtype, m.trust_remote_code) if evaluation and distributed.active() else None
    if later is None:
        evaluate_baseline(model)
    t = time.perf_counter()
    calibrator = None
    if needs_calibration(plan):
        c = recipe.calibration
        windows = calibration_windows(tokenizer, calib_text.text, c.nsamples, c.seqlen, c.seed)
        calibrator = SequentialCalibrator(model, plan, windows, c, device, progress, log.print)
        if evaluation is None:  # not held while the layers are calibrated (a 49k vocabulary: 0.04 GB); loaded again to write
            tokenizer = None
            give_memory_back()
    try:
        streamer = StreamedQuantizer(model, plan, reader, work, device, ids, calibrator, progress, log.print)
        logits = streamer.run()
    finally:
        reader.close()
    timings["quantize"] = time.perf_counter() - t
    if distributed.rank() != 0:
        return RunResult(recipe, plan, None, timings=timings, streamed=True, resumed_from=streamer.resumed_from)
    distributed.stop()  # the others are done; evaluating, writing and checking are process 0's alone
    if later is not None:
        try:
            evaluate_baseline(later)
        finally:
            reader.close()
        del later
    calibration_report = None
    if calibrator is not None:
        calibrator.report, calibrator.seconds = streamer.report, streamer.seconds
        calibration_report = _calibration_summary(calibrator, calib_text)
        log.print(calibration_report["summary"])
    result = RunResult(recipe, plan, out, timings=timings, calibration=calibration_report, streamed=True,
                       resumed_from=streamer.resumed_from, auto=auto_report)
    info = {"source": src.describe(), "fingerprint": fingerprint(src, model.config), "dtype": _dtype_name(plan.model_dtype),
            "device": str(device)}

    def evaluate_export(folder):
        if evaluation:
            t = time.perf_counter()
            reload = LayeredReload(folder, plan.model_dtype, device)
            try:
                evaluated["quantized"] = evaluation.run(
                    reload.model, describe(plan), _quantized_size(model, plan), device=device,
                    logits_of=lambda xs: reload.logits(xs, desc="evaluating the export" if progress else None),
                    tasks_model=lambda: _whole_for_tasks(resolve_source(str(folder)), "the quantized model", plan.total_bytes,
                                                         _dtype_name(plan.model_dtype), device, recipe, log.print, quantized=True))
            finally:
                reload.close()
            timings["eval_quantized"] = time.perf_counter() - t

    def results():
        if evaluation:
            result.results = results_mod.build({k: v.to_dict() for k, v in evaluated.items()}, evaluation.protocol(), info,
                                               recipe.to_dict(), timings)

    try:
        _export(result, src, time.perf_counter(), t_start, log,
                write=lambda tmp: write_streamed_checkpoint(tmp, work, model, tokenizer or load_tokenizer(src, m.trust_remote_code), plan,
                                                            extra_files={"recipe.yaml": recipe.to_yaml()}),
                check=lambda tmp: verify_streamed_export(tmp, plan, ids, logits, device, streamer.lean_check),
                probe=lambda: probe_summary(ids, logits, device, not streamer.lean_check), results=results,
                evaluate_export=evaluate_export)
    except ExportCheckError:
        shutil.rmtree(work.path, ignore_errors=True)  # everything it held is in the kept folder
        raise
    finally:
        if evaluation:
            evaluation.close()
    _bench(result, src, log)
    print_summary(result, console)
    _push(recipe, out, console, log)
    return result


def _bench(result: RunResult, src, log) -> None:
    """The recipe's ``bench:``: speed of the export in place (and of the baseline), into its records and card."""
    recipe, out = result.recipe, result.output
    if not recipe.bench:
        return
    from .bench import SpeedSettings, bench, write_speed

    b = recipe.bench
    log.print("measuring speed (bench) ...")
    models = {"baseline": src, "quantized": str(out)} if b.baseline else {"quantized": str(out)}
    try:
        speed = bench(models, SpeedSettings(list(b.batch_sizes), b.prompt_tokens, b.new_tokens, b.repeats, b.warmup),
                      recipe.device, log=log.print)
    except (torch.OutOfMemoryError, MemoryError, UserError) as e:  # an optional step: the checked export stays, the run goes on
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.print(f"[yellow]warning:[/] the bench did not run ({first}); the export at {out} is in place and checked")
        return
    write_speed(out, speed)
    if result.results:
        result.results["speed"] = speed
    write_records(out, result, src.describe())  # results, llmquant.json and the card, with the speed


def _baseline_size(model, plan: Plan) -> dict:
    return {**linear_size(model), "bytes": plan.float_bytes, "measured_from": "tensor data"}


def _quantized_size(model, plan: Plan) -> dict:
    """The quantized model's size as stored (the plan's formats; layers kept in a narrower float count as such)."""
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    return {**planned_linear_size(plan, head_name), "bytes": plan.total_bytes, "measured_from": "plan"}


def _evaluate_streamed(evaluation: Evaluation, model, reader, device, label: str, size: dict, cache_key, progress: bool,
                       tasks_model=None) -> ModelResult:
    """Evaluate a skeleton's model streamed from its checkpoint, one decoder layer at a time (lm-eval tasks on
    ``tasks_model()``)."""
    from .stream import materialize_outside, release, source_layer
    from .walk import logits_layer_by_layer

    stack, layers = decoder_layers(model)
    outside = materialize_outside(model, layers, reader, device)
    try:
        return evaluation.run(model, label, size, reference=True, cache_key=cache_key, device=device, logits_of=lambda xs: logits_layer_by_layer(
            model, stack, len(layers), xs, lambda i: source_layer(model, stack, i, reader, device), device,
            "evaluating the baseline" if progress else None), tasks_model=tasks_model)
    finally:
        release(model, outside)


@contextmanager
def _whole_for_tasks(src, label: str, nbytes: int, dtype: str, device: torch.device, recipe: Recipe, log, quantized: bool = False):
    """A streamed run's model loaded whole for lm-eval tasks. A float model whose weights take more than the memory
    it may use on ``device`` (``eval.tasks_max_memory``, or 80% of what is free there) gets the rest offloaded by
    accelerate (``device_map="auto"``: to CPU memory, then disk), with a note of the slowdown. A quantized model
    is loaded whole onto the device (its bitsandbytes layers are not offloaded)."""
    budget = parse_size(recipe.eval.tasks_max_memory) if recipe.eval.tasks_max_memory else int(0.8 * memory.free_bytes(device))
    offload, kw = None, {}
    if not quantized and nbytes > budget:
        out = Path(recipe.output.dir).absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        offload = Path(tempfile.mkdtemp(prefix=f".{out.name}.llmquant-offload-", dir=out.parent))
        cuda = device.type == "cuda"
        kw = {"max_memory": {device.index or 0: budget, "cpu": int(0.8 * memory.free_bytes(torch.device("cpu")))} if cuda
              else {"cpu": budget}, "offload_folder": offload}
        log(f"lm-eval tasks: the {label} ({human_bytes(nbytes)}) does not fit in the {human_bytes(budget)} it may use on "
            f"{device}; accelerate keeps the rest {'in CPU memory, then ' if cuda else ''}on disk and reads it again at "
            f"every forward pass: expect the tasks to run several times slower (eval.tasks_max_memory sets the limit)")
    try:
        model, _ = load_model(src, dtype, str(device), recipe.model.trust_remote_code, allow_quantized=quantized, **kw)
        try:
            yield model
        finally:
            del model
            give_memory_back()
    finally:
        if offload is not None:
            shutil.rmtree(offload, ignore_errors=True)


def _needs(recipe: Recipe, plan, frame, dtype: torch.dtype, streamed: bool):
    """The run's memory and disk needs (:mod:`llmquant.needs`), from the recipe and the skeleton."""
    from .calibrate import tracks_float_model

    calibrated = recipe.calibration is not None and needs_calibration(plan)
    tracks = calibrated and tracks_float_model(recipe.calibration, plan.entries)
    return needs_mod.estimate(recipe, plan, frame, dtype, streamed, pick_device(recipe.device), calibrated, tracks)


def _push(recipe: Recipe, out: Path, console, log) -> None:
    if recipe.hub:
        from .hub import push

        h = recipe.hub
        url = push(out, h.repo, h.private, h.revision, h.commit_message, log=log.print)
        console.print(f"pushed to {h.repo}: {url}")


def write_records(folder: Path, result: RunResult, source: str) -> None:
    """results.json/.md/.png, llmquant.json and the model card of an export folder."""
    if result.results:
        results_mod.write(folder, result.results, f"{Path(result.recipe.output.dir).name}: perplexity vs size")
    meta = run_metadata(result, source)
    meta["files"] = file_digests(folder)
    (folder / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if result.auto:
        from . import auto

        auto.plot(result.auto, folder / "auto.png", f"{Path(result.recipe.output.dir).name}: formats chosen for {result.auto['target']}")
    hub = result.recipe.hub
    (folder / "README.md").write_text(card.render(folder, hub.repo if hub else Path(result.recipe.output.dir).name))


def recheck(folder: str | Path, into: str | Path | None = None, overwrite: bool = False) -> dict:
    """``llmquant check``: check an export folder again; with ``into``, move it there once it passes."""
    import yaml

    from .export import check_export_folder, install_export

    folder = Path(folder)
    if into is not None:
        check_output_dir(Path(into), overwrite)
    info = check_export_folder(folder, require_passed=False)
    meta = info["meta"]
    meta["export_check"].update(passed=True, error=None, tensors_checked=info["tensors_checked"],
                                max_abs_logit_diff=info["max_abs_logit_diff"], tolerance=info["tolerance"], rechecked=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (folder / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) if (folder / "recipe.yaml").is_file() else {}
    repo = ((recipe or {}).get("hub") or {}).get("repo")
    (folder / "README.md").write_text(card.render(folder, repo or Path(into or folder).name))
    if into is not None:
        install_export(folder, Path(into), overwrite)
    return info


def texts_overlap(a, b) -> bool:
    """Could two text specs share text? (the same local source with intersecting ranges)."""
    if a.is_dataset or b.is_dataset:
        return False  # named datasets: calibration and evaluation use different splits
    return a.source == b.source and a.range[0] < b.range[1] and b.range[0] < a.range[1]


def _calibration_windows(c, tokenizer, text, model, progress: bool, log) -> torch.Tensor:
    """The calibration windows of a model loaded whole: ``nsamples - generated`` drawn from the text, then
    ``generated`` sampled from the float model itself (before anything is quantized)."""
    drawn = c.nsamples - c.generated
    parts = [calibration_windows(tokenizer, text.text, drawn, c.seqlen, c.seed)] if drawn else []
    if c.generated:
        t = time.perf_counter()
        parts.append(generated_windows(model, tokenizer, c.generated, c.seqlen, c.seed, progress))
        log(f"calibration: {c.generated} windows of {c.seqlen} tokens sampled from the float model in "
            f"{time.perf_counter() - t:.0f}s" + (f", {drawn} drawn from the text" if drawn else " (no text)"))
    return torch.cat(parts)


def _calibration_summary(cal, text) -> dict:
    errs = [r["layer_rel_error"] for r in cal.report]
    worst = max(range(len(errs)), key=errs.__getitem__)
    ordered = sorted(errs)
    e2e = cal.model_tune
    out = {
        "summary": (f"calibration: {len(errs)} decoder layers in {cal.seconds:.0f}s on {len(cal.windows)} windows of "
                    f"{cal.windows.shape[1]} tokens" + (f" ({cal.spec.generated} generated)" if cal.spec.generated else "")
                    + f"; layer output error median {ordered[len(ordered) // 2]:.2%}, "
                    f"max {errs[worst]:.2%} ({cal.report[worst]['layer']})"
                    + (f"; end to end: KL {e2e['kl_before']:.4f} -> {e2e['kl_after']:.4f}" if e2e else "")),
        "seconds": round(cal.seconds, 1),
        "text": text.meta if text is not None else None,
        "generated": cal.spec.generated,
        "windows": list(cal.windows.shape),
        "layers": cal.report,
    }
    if e2e:
        out["model_tune"] = e2e
    return out


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
        "loading": {"streamed": r.streamed, "resumed_from_layer": r.resumed_from},
        "calibration": r.calibration,
        "auto": r.auto,
        "timings_seconds": {k: round(v, 2) for k, v in r.timings.items()},
        "peak_memory_bytes": r.peak_memory,
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
            f"{r.check.tensors_checked} tensors identical, max |Δlogit| {r.check.max_abs_logit_diff:.2g})"
        )
    if r.results:
        console.print(results_mod.rich_table(r.results))
        console.print(f"results: {r.output}/results.json, results.md, results.png")
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    if r.peak_memory:
        console.print("peak memory: " + ", ".join(f"{'host' if k == 'host_bytes' else 'GPU'} {human_bytes(v)}"
                                                  for k, v in r.peak_memory.items()))


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
    if not has_tokenizer(bsrc or src):
        raise UserError(f"model folder {(bsrc or src).location!r} has no tokenizer files; evaluation needs one")
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
            baseline_fingerprint = fingerprint(bsrc, bmodel.config)
            key = evaluation.cache_key(baseline_fingerprint, bmodel.dtype, model_device(bmodel))
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
                                timings={"total": time.perf_counter() - t0},
                                baseline_fingerprint=baseline_fingerprint if bsrc is not None else None)
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
