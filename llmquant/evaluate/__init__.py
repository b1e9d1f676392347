"""Evaluating models under one protocol: perplexity, divergence from a reference model, tasks.

The first model evaluated with ``reference=True`` (the baseline) writes its next-token
log-probabilities to disk; every later model is compared with them at the same token
positions, so baseline and quantized model are never in memory together. Baseline
results are cached (keyed by the weights' fingerprint, the text's hash and every
protocol setting), so sweeping recipes over one model evaluates its baseline once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..assets import cache_dir
from ..data import DATASETS, load_text
from ..errors import UserError
from .perplexity import LogprobStore, PerplexityResult, evaluate, make_windows, tokenize
from .tasks import check_tasks, run_tasks  # noqa: F401  (check_tasks is part of this API)

# C4 evaluation in the GPTQ paper scores the first 256 windows of its text.
C4_EVAL_WINDOWS = 256


@dataclass
class ModelResult:
    label: str
    size: dict  # bytes, linear_bits_per_weight (and what they were measured from)
    perplexity: PerplexityResult | None = None
    tasks: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    cached: bool = False

    def to_dict(self) -> dict:
        d: dict = {"label": self.label, "size": self.size}
        p = self.perplexity
        if p is not None:
            d["perplexity"] = p.perplexity
            d["nll"] = p.nll
            d["tokens"] = p.tokens
            d["tokens_per_second"] = p.tokens_per_second
            if p.divergence:
                d["kl_divergence"] = p.divergence["kl_divergence"]
                d["top1_agreement"] = p.divergence["top1_agreement"]
                d["divergence_tokens"] = p.divergence["tokens"]
        d["tasks"] = self.tasks
        d["seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
        d["from_cache"] = self.cached
        return d


def output_vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):
        return head.out_features
    return model.config.get_text_config().vocab_size


def linear_size(model: nn.Module) -> dict:
    """Stored bits per weight of a loaded model's Linear layers but the output head (any bitsandbytes or float model).

    The head is left out because it is usually kept in float (and often tied to the
    embeddings); counting it would mostly measure the vocabulary size.
    """
    import bitsandbytes as bnb

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n, bits = 0, 0
    for m in model.modules():
        if m is head:
            continue
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            numel = math.prod(qs.shape)
            nested = getattr(qs, "original_nested", qs.nested)
            blocks = numel // qs.blocksize
            bits += numel * 4 + blocks * (8 if nested else 32)
        elif isinstance(m, bnb.nn.Linear8bitLt):
            numel = m.weight.numel()
            bits += numel * 8 + m.out_features * 32
        elif isinstance(m, nn.Linear):
            numel = m.weight.numel()
            bits += numel * m.weight.element_size() * 8
        else:
            continue
        n += numel
    return {"linear_bits_per_weight": bits / max(n, 1), "linear_weights": n}


def planned_linear_size(plan, head: str | None) -> dict:
    """:func:`linear_size` of the quantized model, from its plan (for a model never whole in memory)."""
    from ..schemes import FourBit, Int8, Keep

    n, bits = 0, 0
    for e in plan.entries:
        if e.name == head:
            continue
        sc = e.scheme
        if isinstance(sc, FourBit):
            bits += e.numel * 4 + (e.numel // sc.group_size) * (8 if sc.double_quant else 32)
        elif isinstance(sc, Int8):
            bits += e.numel * 8 + e.out_features * 32
        else:
            dtype = sc.dtype if isinstance(sc, Keep) else plan.model_dtype
            bits += e.numel * dtype.itemsize * 8
        n += e.numel
    return {"linear_bits_per_weight": bits / max(n, 1), "linear_weights": n}


class Evaluation:
    def __init__(self, spec, tokenizer, progress: bool = True, log=None, text=None):
        self.spec, self.tokenizer, self.progress = spec, tokenizer, progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.text = text or load_text(spec.text, "eval")
        max_tokens = spec.max_tokens
        if max_tokens is None and spec.text.source == "c4":
            max_tokens = C4_EVAL_WINDOWS * spec.seqlen
        self.ids, self.tokenization = tokenize(tokenizer, self.text.text, max_tokens)
        self.windows = make_windows(len(self.ids), spec.seqlen, spec.protocol, spec.stride)
        if not self.windows:
            raise UserError(
                f"the evaluation text has {len(self.ids)} tokens, not one window of eval.seqlen {spec.seqlen}; "
                "lower eval.seqlen or give more text"
            )
        self.targets = sum(w.n_targets for w in self.windows)
        self.reference: LogprobStore | None = None
        self._temporary: list[LogprobStore] = []

    def batch_size(self, device: torch.device) -> int:
        if self.spec.batch_size != "auto":
            return self.spec.batch_size
        return 1 if device.type == "cpu" else 8

    def protocol(self) -> dict:
        s = self.spec
        ppl = {
            "name": s.protocol, "seqlen": s.seqlen, "stride": (s.stride or s.seqlen // 2) if s.protocol == "sliding" else None,
            "windows": len(self.windows), "tokens_scored": self.targets, "tokens_used": len(self.ids),
            "batch_size": s.batch_size, "score": "exp(mean next-token NLL over scored tokens)",
            "tokenization": {"whole_text_once": True, **self.tokenization},
            "text": self.text.meta,
        }
        out = {"perplexity": ppl}
        if s.divergence:
            out["divergence"] = {"reference": "baseline", "tokens": min(s.divergence_tokens, self.targets),
                                 "kl": "KL(baseline || model) in nats per token, over the first scored tokens"}
        if s.tasks:
            out["tasks"] = {"names": list(s.tasks), "limit": s.task_limit, "num_fewshot": s.num_fewshot, "harness": "lm-evaluation-harness"}
        return out

    # ---- one model ------------------------------------------------------------------------

    def run(self, model: nn.Module, label: str, size: dict, reference: bool = False, cache_key: str | None = None,
            logits_of=None, device: torch.device | None = None, tasks_model=None) -> ModelResult:
        """Evaluate ``model``; ``reference=True`` for the baseline (others are compared with it).

        ``logits_of`` (see :func:`~llmquant.evaluate.perplexity.evaluate`) computes perplexity and divergence for a
        model that is never whole in memory (``model`` is then its skeleton, ``device`` where it computes); its
        lm-eval tasks run on ``tasks_model()``, a context manager that has the model whole while they run.
        """
        device = device or next(p.device for p in model.parameters() if p.device.type != "meta")
        s = self.spec
        if reference and cache_key:
            cached = self._load_cached(cache_key, label, size)
            if cached is not None:
                return cached
        work = None
        if reference and cache_key:
            final = self._cache_folder(cache_key)
            work = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}")
            work.mkdir(parents=True)
        store = self._new_store(model, work) if reference and s.divergence else None
        try:
            t0 = time.perf_counter()
            ppl = evaluate(
                model, self.ids, self.windows, self.batch_size(device), write_logprobs=store,
                reference=None if reference else self.reference, progress=self.progress, desc=f"perplexity ({label})",
                logits_of=logits_of,
            )
            seconds = {"perplexity": time.perf_counter() - t0}
            t0 = time.perf_counter()
            tasks = {}
            if s.tasks and (logits_of is None or tasks_model is not None):
                with (contextlib.nullcontext(model) if logits_of is None else tasks_model()) as whole:
                    tasks = run_tasks(whole, self.tokenizer, s.tasks, s.task_limit, s.task_batch_size, s.num_fewshot, device)
                seconds["tasks"] = time.perf_counter() - t0
        except BaseException:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            raise
        result = ModelResult(label, size, ppl, tasks, seconds)
        if work is not None:
            store = self._commit_cache(work, final, result, store)
        if store is not None:
            self.reference = store
        return result

    def _new_store(self, model: nn.Module, folder: Path | None) -> LogprobStore:
        capacity, vocab = min(self.spec.divergence_tokens, self.targets), output_vocab(model)
        need = capacity * vocab * 2
        where = folder or cache_dir() / "tmp"
        where.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(where).free
        if free < need * 1.1:
            raise UserError(
                f"divergence needs {need / 1e6:.0f} MB free in {where} ({capacity} tokens x {vocab} log-probabilities), "
                f"{free / 1e6:.0f} MB are; lower eval.divergence_tokens or set LLMQUANT_CACHE elsewhere"
            )
        self.log(f"divergence: keeping {capacity} x {vocab} baseline log-probabilities on disk ({need / 1e6:.0f} MB)")
        if folder is not None:
            return LogprobStore(folder / "logp.npy", capacity, vocab, "w+")
        store = LogprobStore.create(capacity, vocab, where)
        self._temporary.append(store)
        return store

    # ---- the baseline cache -------------------------------------------------------------------

    def cache_key(self, model_fingerprint: str | None, dtype: torch.dtype, device: torch.device) -> str | None:
        if model_fingerprint is None:
            return None
        import hashlib

        blob = json.dumps({
            "model": model_fingerprint, "dtype": str(dtype), "device": device.type, "llmquant": __version__,
            "spec": self.spec.model_dump(mode="json"), "text": self.text.fingerprint, "tokens": len(self.ids),
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _cache_folder(self, key: str) -> Path:
        return cache_dir() / "baselines" / key

    def _load_cached(self, key: str, label: str, size: dict) -> ModelResult | None:
        folder = self._cache_folder(key)
        if not (folder / "result.json").is_file():
            return None
        data = json.loads((folder / "result.json").read_text())
        if self.spec.divergence:
            self.reference = LogprobStore(folder / "logp.npy", data["divergence_capacity"], data["vocab"], "r")
        p = data["perplexity"]
        ppl = PerplexityResult(nll=p["nll"], tokens=p["tokens"], windows=p["windows"], seconds=p["seconds"])
        self.log(f"baseline: reusing its evaluation cached in {folder}")
        return ModelResult(label, size, ppl, data["tasks"], data["seconds"], cached=True)

    def _commit_cache(self, work: Path, final: Path, result: ModelResult, store: LogprobStore | None) -> LogprobStore | None:
        p = result.perplexity
        data = {
            "perplexity": {"nll": p.nll, "tokens": p.tokens, "windows": p.windows, "seconds": p.seconds},
            "tasks": result.tasks, "seconds": result.seconds,
            "divergence_capacity": store.capacity if store else None, "vocab": store.vocab if store else None,
        }
        if store is not None:
            store.close()
        (work / "result.json").write_text(json.dumps(data))
        try:
            os.rename(work, final)
        except OSError:  # another run cached the same baseline meanwhile: use theirs
            shutil.rmtree(work, ignore_errors=True)
        if store is None:
            return None
        return LogprobStore(final / "logp.npy", store.capacity, store.vocab, "r")

    def close(self) -> None:
        for store in self._temporary:
            store.close(delete=True)
        if self.reference is not None and self.reference not in self._temporary:
            self.reference.close()
        self._temporary, self.reference = [], None
