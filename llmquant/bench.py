"""How fast a model runs where it runs: load time, memory, prefill and decode tokens/s.

Each model is loaded as a user would load it (``from_pretrained``), then, for each batch size,
a fixed prompt of ``prompt_tokens`` tokens (the same rows in every batch) is

* **prefilled**: one forward pass over the prompt with the KV cache on (tokens/s = batch × prompt / time);
* **generated**: greedy ``generate`` of exactly ``new_tokens`` tokens, KV cache on. Each step of ``generate``
  is timed from the start of its forward pass to the start of the next one (the last to the end of
  ``generate``), so a step's time includes choosing its token; the first new token comes from the prefill, the
  other ``new_tokens − 1`` from decode steps. Decode tokens/s = batch / the median decode step time: a step
  slowed by other work on the machine moves the median little, where it moves the mean of a short run a lot.
  ``decode_throughput`` is the same count over the whole decode: batch × (new_tokens − 1) / the sum of the steps.

After ``warmup`` untimed runs, ``repeats`` timed runs give the median and the spread (min, max). On CUDA the
clock is read after ``torch.cuda.synchronize`` and timed with CUDA events; peak device memory is
``torch.cuda.max_memory_allocated``. Peak host memory is the process's resident set, sampled while the model
loads and runs. The greedy text of the first row is recorded, so a fast but wrong model shows.
"""

from __future__ import annotations

import platform
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .memory import give_memory_back

PROMPT = (
    "The school stood at the edge of the town, and every morning the new teacher walked past the rice fields "
    "to reach it. The students were quick to test him, and he was quick to anger. "
)


@dataclass
class SpeedSettings:
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1

    def check(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UserError(f"batch sizes must be 1 or more, got {self.batch_sizes}")
        if self.prompt_tokens < 1:
            raise UserError(f"--prompt-tokens must be 1 or more, got {self.prompt_tokens}")
        if self.new_tokens < 2:
            raise UserError(f"--new-tokens must be 2 or more (the first comes from the prefill), got {self.new_tokens}")
        if self.repeats < 1 or self.warmup < 0:
            raise UserError(f"--repeats must be 1 or more and --warmup 0 or more, got {self.repeats} and {self.warmup}")

    def to_dict(self) -> dict:
        return {"batch_sizes": self.batch_sizes, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "repeats": self.repeats, "warmup": self.warmup}


class _PeakRSS:
    """The process's largest resident set while active (sampled every 10 ms)."""

    def __init__(self):
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


class _Clock:
    """Seconds of a piece of work on ``device`` (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000
        else:
            self.seconds = time.perf_counter() - self._t0


class _Steps:
    """When each forward pass of ``model`` starts (a forward pre-hook): the steps of ``generate``."""

    def __init__(self, model, device: torch.device):
        self.cuda, self.marks = device.type == "cuda", []
        self._handle = model.register_forward_pre_hook(lambda module, args: self.marks.append(self._now()))

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def decode_seconds(self) -> list[float]:
        """Seconds of each decode step of the last ``generate`` (from its second forward pass on); call right
        after it returns."""
        marks = self.marks[1:] + [self._now()]
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
        return [b - a for a, b in zip(marks, marks[1:])]

    def close(self) -> None:
        self._handle.remove()


def prompt_ids(tokenizer, n: int, vocab_size: int) -> torch.Tensor:
    """``n`` fixed prompt tokens: the bench text repeated (token ids spread over the vocabulary without a tokenizer)."""
    if tokenizer is not None:
        ids = tokenizer(PROMPT * (1 + n // 20), return_tensors="pt").input_ids[0]
        while len(ids) < n:
            ids = torch.cat([ids, ids])
        return ids[:n]
    return (torch.arange(n) * 7919 + 11) % vocab_size


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@torch.no_grad()
def bench_model(model, tokenizer, settings: SpeedSettings, log=print) -> dict:
    """Prefill and decode speed of a loaded model, per batch size (see the module docstring)."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    vocab = model.config.get_text_config().vocab_size
    prompt = prompt_ids(tokenizer, settings.prompt_tokens, vocab)
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
    rows = []
    text = None
    for bs in settings.batch_sizes:
        x = prompt.unsqueeze(0).repeat(bs, 1).to(device)
        mask = torch.ones_like(x)
        gen = dict(max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens, do_sample=False,
                   use_cache=True, pad_token_id=pad, attention_mask=mask)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill, total, steps = [], [], []
        try:
            for i in range(settings.warmup + settings.repeats):
                with _Clock(device) as c1:
                    model(x, attention_mask=mask, use_cache=True)
                clock = _Steps(model, device)
                try:
                    with _Clock(device) as c2:
                        out = model.generate(x, **gen)
                    step = clock.decode_seconds()
                finally:
                    clock.close()
                new = out.shape[1] - x.shape[1]
                if new != settings.new_tokens or len(step) != new - 1:
                    raise RuntimeError(f"generate made {new} tokens in {len(step) + 1} forward passes, "
                                       f"not {settings.new_tokens}")
                if i >= settings.warmup:
                    prefill.append(c1.seconds)
                    total.append(c2.seconds)
                    steps.append(step)
        except torch.OutOfMemoryError:
            raise UserError(f"batch size {bs} with {settings.prompt_tokens}+{settings.new_tokens} tokens does not fit "
                            f"in {device} memory; give smaller --batch-sizes or fewer tokens") from None
        if text is None and tokenizer is not None:
            text = tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)
        first = out[0, x.shape[1]:].tolist()
        median_step = [statistics.median(st) for st in steps]
        row = {
            "batch_size": bs,
            "prefill_seconds": _stats(prefill),
            "generate_seconds": _stats(total),
            "prefill_tokens_per_second": _stats([bs * settings.prompt_tokens / s for s in prefill]),
            "decode_step_seconds": _stats(median_step),
            "decode_seconds": _stats([sum(st) for st in steps]),
            "decode_tokens_per_second": _stats([bs / s for s in median_step]),
            "decode_throughput": _stats([bs * len(st) / sum(st) for st in steps]),
            "generated_tokens": bs * settings.new_tokens,
            "greedy_ids": first,
        }
        if device.type == "cuda":
            row["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        rows.append(row)
        log(f"  batch {bs}: prefill {row['prefill_tokens_per_second']['median']:.1f} tok/s, "
            f"decode {row['decode_tokens_per_second']['median']:.1f} tok/s")
    return {"rows": rows, "greedy_text": text}


def device_info(device: torch.device) -> dict:
    import bitsandbytes
    import transformers

    info = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__, "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench(models: dict, settings: SpeedSettings, device: str = "auto", log=print) -> dict:
    """Load each of ``models`` (label -> Hub id, folder, asset:NAME or a resolved model source) in turn and bench
    it; the ``speed`` section of results.json."""
    from .models import load_model, pick_device, resolve_source

    settings.check()
    dev = pick_device(device)
    out = {"settings": settings.to_dict(), **device_info(dev), "models": {}}
    for label, source in models.items():
        src = resolve_source(source) if isinstance(source, str) else source
        log(f"{label}: loading {src.describe()} ...")
        with _PeakRSS() as rss:
            t0 = time.perf_counter()
            model, tokenizer = load_model(src, "auto", str(dev), allow_quantized=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            load = time.perf_counter() - t0
            result = bench_model(model, tokenizer, settings, log)
        result.update(source=src.describe(), load_seconds=load, peak_host_bytes=rss.peak)
        out["models"][label] = result
        del model
        give_memory_back()  # the next model's peak starts from what this one leaves
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = out["models"].get("baseline")
    if base is not None:  # how far the greedy continuations agree (first tokens, batch row 0, first batch size)
        for label, r in out["models"].items():
            if label != "baseline":
                a, b = base["rows"][0]["greedy_ids"], r["rows"][0]["greedy_ids"]
                same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                r["greedy_agrees_with_baseline_for_tokens"] = same
    return out


def speed_table(speed: dict) -> str:
    """Markdown table of a ``speed`` section."""
    s = speed["settings"]
    where = speed.get("gpu") or f"CPU ({speed['cpu_threads']} threads)"
    lines = [f"Speed on {where}, torch {speed['torch']}, bitsandbytes {speed['bitsandbytes']}: prompt {s['prompt_tokens']} "
             f"tokens, {s['new_tokens']} new tokens (greedy, KV cache), median of {s['repeats']} runs (min–max); "
             f"decode tok/s = batch / the median time of a decode step.", "",
             "| model | batch | load (s) | prefill tok/s | decode tok/s | peak host memory | peak device memory |",
             "|---|---|---|---|---|---|---|"]
    for label, r in speed["models"].items():
        for row in r["rows"]:
            p, d = row["prefill_tokens_per_second"], row["decode_tokens_per_second"]
            dev = f"{row['peak_device_bytes'] / 1e9:.2f} GB" if "peak_device_bytes" in row else "–"
            lines.append(f"| {label} | {row['batch_size']} | {r['load_seconds']:.1f} | {p['median']:.1f} ({p['min']:.1f}–{p['max']:.1f}) | "
                         f"{d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f}) | {r['peak_host_bytes'] / 1e9:.2f} GB | {dev} |")
    for label, r in speed["models"].items():
        if "greedy_agrees_with_baseline_for_tokens" in r:
            lines.append(f"\n{label}: greedy output agrees with the baseline's for its first "
                         f"{r['greedy_agrees_with_baseline_for_tokens']} of {s['new_tokens']} tokens.")
    return "\n".join(lines) + "\n"


def write_speed(folder, speed: dict) -> None:
    """speed.json and speed.md into ``folder`` (each written whole, then renamed)."""
    import json
    import os
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in {"speed.json": json.dumps(speed, indent=2) + "\n", "speed.md": speed_table(speed)}.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
