"""results.json (schema ``llmquant.results/1``), results.md and a quality-vs-size plot.

results.json::

    {
      "schema": "llmquant.results/1",
      "created": "2026-11-22T14:00:00Z",
      "model": {"source": ..., "fingerprint": ..., "dtype": ..., "device": ...},
      "recipe": {...} | null,                  # the resolved recipe, for `llmquant run`
      "protocol": {                            # how every number below was measured
        "perplexity": {"name": "windows", "seqlen": 512, "stride": null, "windows": 32,
                       "tokens_scored": 16352, "text": {"source": ..., "sha256": ..., ...}, ...},
        "divergence": {"reference": "baseline", "tokens": 8192, ...},
        "tasks": {"names": [...], "limit": 40, "num_fewshot": 0, ...}
      },
      "models": {
        "baseline":  {"label", "size": {"bytes", "linear_bits_per_weight", ...}, "perplexity", "nll",
                      "tokens", "tokens_per_second", "tasks": {task: {metric: value}}, "seconds"},
        "quantized": {... the same ..., "kl_divergence": {"mean", "median", "p99", "max"},
                      "top1_agreement", "divergence_tokens"}
      },
      "deltas": {"quantized": {"perplexity": {"abs", "rel"}, "size": {"ratio"}, "tasks": {task: {metric: abs}}}},
      "timings_seconds": {...},
      "versions": {"llmquant", "python", "torch", "transformers", "bitsandbytes", "lm_eval"}
    }
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

from .errors import UserError

SCHEMA = "llmquant.results/1"
TASK_METRICS = ("acc", "acc_norm", "perplexity", "exact_match", "f1")


def versions() -> dict:
    import bitsandbytes
    import torch
    import transformers

    from . import __version__

    try:
        from importlib.metadata import version

        lm_eval = version("lm_eval")
    except Exception:  # not installed
        lm_eval = None
    return {"llmquant": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__, "lm_eval": lm_eval}


def deltas(base: dict, other: dict) -> dict:
    d: dict = {}
    if base.get("perplexity") and other.get("perplexity"):
        d["perplexity"] = {"abs": other["perplexity"] - base["perplexity"], "rel": other["perplexity"] / base["perplexity"] - 1}
    if base["size"].get("bytes") and other["size"].get("bytes"):
        d["size"] = {"ratio": other["size"]["bytes"] / base["size"]["bytes"]}
    tasks = {}
    for task, metrics in other.get("tasks", {}).items():
        ref = base.get("tasks", {}).get(task, {})
        tasks[task] = {m: metrics[m] - ref[m] for m in TASK_METRICS if metrics.get(m) is not None and ref.get(m) is not None}
    if tasks:
        d["tasks"] = tasks
    return d


def build(models: dict[str, dict], protocol: dict, model_info: dict, recipe: dict | None = None, timings: dict | None = None,
          baseline_fingerprint: str | None = None) -> dict:
    """``baseline_fingerprint``: the model the baseline is (default: ``model_info``'s, a run's source model)."""
    base = models.get("baseline")
    if base is not None:
        base["fingerprint"] = baseline_fingerprint or model_info.get("fingerprint")
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model_info,
        "recipe": recipe,
        "protocol": protocol,
        "models": models,
        "deltas": {k: deltas(base, m) for k, m in models.items() if base is not None and k != "baseline"},
        "timings_seconds": {k: round(v, 2) for k, v in (timings or {}).items()},
        "versions": versions(),
    }


def load(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise UserError(f"no results at {str(path)!r} (a results.json file or a folder holding one)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not JSON ({e.msg} at line {e.lineno})") from None
    if data.get("schema") != SCHEMA:
        raise UserError(f"{p}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return data


# ---- tables -------------------------------------------------------------------------------


def _fmt(v, kind: str = "") -> str:
    if v is None:
        return "–"
    if kind == "bytes":
        from .report import human_bytes

        return human_bytes(v)
    if kind == "pct":
        return f"{v:+.2%}"
    if kind == "share":
        return f"{v:.2%}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.4e}"
    return str(v)


def table_rows(res: dict) -> tuple[list[str], list[list[str]]]:
    """Columns (model labels, then Δ for two models) and rows of the results table."""
    models = _models(res)
    labels = list(models)
    base = models.get("baseline")
    two = base is not None and len(labels) == 2
    other = models[labels[1]] if two else None
    header = ["metric"] + [f"{k} ({m['label']})" if m["label"] != k else k for k, m in models.items()] + (["Δ"] if two else [])
    rows: list[list[str]] = []

    def row(name, getter, kind="", delta=None):
        vals = [getter(m) for m in models.values()]
        if all(v is None for v in vals):
            return
        r = [name] + [_fmt(v, kind) for v in vals]
        if two:
            r.append(delta(base, other) if delta else "")
        rows.append(r)

    row("size", lambda m: m["size"].get("bytes"), "bytes",
        lambda b, o: f"×{o['size']['bytes'] / b['size']['bytes']:.3f}" if b["size"].get("bytes") and o["size"].get("bytes") else "")
    row("bits per weight (Linear but head)", lambda m: m["size"].get("linear_bits_per_weight"))
    row("perplexity", lambda m: m.get("perplexity"), "",
        lambda b, o: _fmt(o["perplexity"] / b["perplexity"] - 1, "pct") if b.get("perplexity") and o.get("perplexity") else "")
    row("KL divergence, mean (nats/token)", lambda m: (m.get("kl_divergence") or {}).get("mean"))
    row("KL divergence, median", lambda m: (m.get("kl_divergence") or {}).get("median"))
    row("KL divergence, 99th percentile", lambda m: (m.get("kl_divergence") or {}).get("p99"))
    row("top-1 agreement with baseline", lambda m: m.get("top1_agreement"), "share")
    speeds = [m["speed"] for m in models.values() if m.get("speed")]
    if speeds:
        bs = speeds[0]["batch_size"]
        row(f"decode tokens/s (batch {bs}, {speeds[0]['where']})", lambda m: (m.get("speed") or {}).get("decode_tokens_per_second"))
        row(f"prefill tokens/s (batch {bs})", lambda m: (m.get("speed") or {}).get("prefill_tokens_per_second"))
    tasks = sorted({t for m in models.values() for t in m.get("tasks", {})})
    for t in tasks:
        for metric in TASK_METRICS:
            def get(m, t=t, metric=metric):
                return m.get("tasks", {}).get(t, {}).get(metric)

            def stderr(m, t=t, metric=metric):
                return m.get("tasks", {}).get(t, {}).get(f"{metric}_stderr")

            if all(get(m) is None for m in models.values()):
                continue
            r = [f"{t} {metric}"] + [
                "–" if get(m) is None else (f"{get(m):.4f} ± {stderr(m):.4f}" if stderr(m) is not None else f"{get(m):.4f}")
                for m in models.values()
            ]
            if two:
                r.append(f"{get(other) - get(base):+.4f}" if get(other) is not None and get(base) is not None else "")
            rows.append(r)
    return header, rows


def protocol_line(res: dict) -> str:
    p = res["protocol"]["perplexity"]
    t = p["text"]
    where = t.get("split") or t.get("range")
    kind = "non-overlapping windows" if p["name"] == "windows" else f"sliding windows (stride {p['stride']})"
    proto = f"{kind} of {p['seqlen']} tokens"
    line = (f"perplexity: {t['source']} ({where}), {proto}; {p['tokens_scored']} tokens scored in {p['windows']} windows; "
            f"text sha256 {t['sha256'][:16]}")
    div = res["protocol"].get("divergence")
    if div:
        line += f"; divergence on the first {div['tokens']} scored tokens"
    tk = res["protocol"].get("tasks")
    if tk:
        line += f"; tasks: lm-eval, {tk['num_fewshot']}-shot, limit {tk['limit'] or 'none'}"
    return line


def markdown(res: dict) -> str:
    header, rows = table_rows(res)
    lines = [f"# Evaluation of {res['model'].get('source', 'a model')}", "", protocol_line(res), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if res.get("speed"):
        from .bench import speed_table

        lines += ["", "## Speed", "", speed_table(res["speed"])]
    v = res["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val), ""]
    return "\n".join(lines)


def rich_table(res: dict):
    from rich.table import Table

    header, rows = table_rows(res)
    t = Table(title="evaluation", title_justify="left", caption=protocol_line(res), caption_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    return t


# ---- plot -----------------------------------------------------------------------------------


def plot(points: list[dict], path: Path, title: str) -> None:
    """Perplexity against size, one labelled point per model; beside it perplexity against decode speed when
    the points carry a speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("bytes", lambda p: p["bytes"] / 1e6, "checkpoint size (MB)")]
    speeds = [p["speed"] for p in points if p.get("speed")]
    if speeds:
        s = speeds[0]
        panels.append(("speed", lambda p: p["speed"]["decode_tokens_per_second"],
                       f"decode tokens/s, batch {s['batch_size']}, {s['where']} (higher is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, (key, x, label) in zip(axes[0], panels):
        for i, p in enumerate(points):
            if p.get("perplexity") and p.get(key):
                ax.scatter(x(p), p["perplexity"], s=40, zorder=3, color=f"C{i % 10}")
                ax.annotate(p["name"], (x(p), p["perplexity"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.margins(0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (lower is better)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title + (" and decode speed" if speeds else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def points(res: dict, prefix: str = "") -> list[dict]:
    out = []
    for key, m in _models(res).items():
        name = f"{prefix}{key}" if key in ("baseline", "quantized") and prefix else (m["label"] if m["label"] != key else key)
        out.append({"name": name, "bytes": m["size"].get("bytes"), "perplexity": m.get("perplexity"), "speed": m.get("speed")})
    return out


def write(folder: Path, res: dict, plot_title: str | None = None) -> list[str]:
    """results.json, results.md and results.png into ``folder`` (each written whole, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"results.json": json.dumps(res, indent=2, default=str) + "\n", "results.md": markdown(res)}
    for name, text in files.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
    tmp = folder / ".results.png.tmp.png"
    plot(points(res), tmp, plot_title or f"{res['model'].get('source', '')}: perplexity vs size")
    os.replace(tmp, folder / "results.png")
    return [*files, "results.png"]


def compare(paths: list[str]) -> dict:
    """Merge results files measured under the same protocol into one table (refuse otherwise)."""
    loaded = [(p, load(p)) for p in paths]
    ref_path, ref = loaded[0]
    key = _protocol_key(ref)
    models: dict[str, dict] = {}
    speed_key, speed_dropped = None, []
    baselines: dict = {}  # the first results file with a baseline, and that baseline's fingerprint (or label)
    for path, res in loaded:
        if _protocol_key(res) != key:
            raise UserError(
                f"{path} was measured under another protocol than {ref_path} ({_protocol_summary(res)} vs "
                f"{_protocol_summary(ref)}); only results measured the same way can be compared"
            )
        b = res["models"].get("baseline")
        if b is not None:  # one baseline in the table: every file's must be the same model
            who = b.get("fingerprint") or f"label {b.get('label')}"
            first = baselines.setdefault("first", (path, who))
            if who != first[1]:
                raise UserError(f"{path} has another baseline model than {first[0]} ({who} vs {first[1]}); compare "
                                f"results whose baseline is the same model")
        name = _name(path, res)
        speed = _speed_of(path, res)
        if speed is not None:
            k = _speed_key(speed)
            speed_key = speed_key or k
            if k != speed_key:  # another device or other settings: not comparable, left out of the speed columns
                speed_dropped.append(str(path))
                speed = None
        for k, m in res["models"].items():
            m = {**m, "speed": _speed_summary(speed, k, res)} if speed is not None else m
            if k == "baseline":
                if "baseline" in models:
                    continue  # one baseline (the same text and protocol); keep the first
                models["baseline"] = m
            else:
                models[name if len(res["models"]) <= 2 else f"{name}:{k}"] = {**m, "label": name}
    merged = {**ref, "models": models, "recipe": None, "compared": [str(p) for p, _ in loaded]}
    merged.pop("speed", None)  # per model now, under models.*.speed
    if speed_dropped:
        merged["speed_left_out"] = {"paths": speed_dropped, "why": "measured on another device or with other bench settings"}
    base = models.get("baseline")
    merged["deltas"] = {k: deltas(base, m) for k, m in models.items() if base is not None and k != "baseline"}
    return merged


def _models(res: dict) -> dict:
    """``res``'s models, each with its speed summary when the results carry a bench."""
    speed = res.get("speed")
    if not speed:
        return res["models"]
    return {k: {**m, "speed": m.get("speed") or _speed_summary(speed, k, res)} for k, m in res["models"].items()}


def _speed_of(path: str, res: dict) -> dict | None:
    """The bench of a results file: its ``speed`` section, or speed.json beside it."""
    if res.get("speed"):
        return res["speed"]
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / "speed.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _speed_key(speed: dict) -> str:
    where = {k: speed.get(k) for k in ("gpu", "cpu_threads", "machine", "processor", "torch", "bitsandbytes")}
    return json.dumps({"settings": speed["settings"], "where": where}, sort_keys=True)


def _speed_summary(speed: dict, key: str, res: dict) -> dict | None:
    """One model's batch-1 (first batch size) medians from a bench; ``key`` names the model in ``res``."""
    others = [k for k in res["models"] if k != "baseline"]
    label = key if key == "baseline" else next((s for s in ("quantized", "model") if s in speed["models"] and len(others) == 1), key)
    r = speed["models"].get(label)
    if r is None:
        return None
    row = r["rows"][0]
    return {"batch_size": row["batch_size"], "decode_tokens_per_second": row["decode_tokens_per_second"]["median"],
            "prefill_tokens_per_second": row["prefill_tokens_per_second"]["median"],
            "where": speed.get("gpu") or f"CPU {speed['cpu_threads']} threads"}


def _protocol_key(res: dict) -> str:
    p = dict(res["protocol"]["perplexity"])
    p.pop("batch_size", None)  # batching does not change the scores
    return json.dumps({"ppl": p, "div": res["protocol"].get("divergence"), "tasks": res["protocol"].get("tasks")}, sort_keys=True)


def _protocol_summary(res: dict) -> str:
    p = res["protocol"]["perplexity"]
    return f"{p['name']}/{p['seqlen']}, {p['tokens_scored']} tokens of text {p['text']['sha256'][:8]}"


def _name(path: str, res: dict) -> str:
    p = Path(path)
    return (p if p.is_dir() else p.parent).name or str(p)
