"""Perplexity under a recorded protocol, and the divergence of one model from another.

Protocols (the token sequence is the whole evaluated text, tokenized once):

* ``windows`` (the GPTQ / AWQ / OmniQuant tables): non-overlapping windows of
  ``seqlen`` tokens; a trailing partial window is dropped; every token but the
  first of each window is predicted from the tokens before it in its window.
* ``sliding`` (the transformers perplexity guide): windows of ``seqlen`` tokens
  starting every ``stride`` tokens; each token is predicted once, in the first
  window that contains it with context, from up to ``seqlen - 1`` tokens before it.

Perplexity is ``exp`` of the mean next-token negative log-likelihood over all
predicted tokens. Divergence compares, at the same predicted positions, a model's
next-token distribution with a reference's (written once to disk, so the two models
never need to be in memory together): KL(reference || model) per token and whether
their most likely tokens agree.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window in the sequence
    end: int  # one past its last token
    first_target: int  # first token (absolute index) whose prediction counts

    @property
    def n_targets(self) -> int:
        return self.end - self.first_target


def make_windows(n_tokens: int, seqlen: int, protocol: str = "windows", stride: int | None = None) -> list[Window]:
    if protocol == "windows":
        return [Window(i * seqlen, (i + 1) * seqlen, i * seqlen + 1) for i in range(n_tokens // seqlen)]
    if protocol == "sliding":
        stride = stride or seqlen // 2
        assert 0 < stride <= seqlen
        out, prev_end = [], 0
        for begin in range(0, n_tokens, stride):
            end = min(begin + seqlen, n_tokens)
            first = max(prev_end, begin + 1)
            if end > first:
                out.append(Window(begin, end, first))
            prev_end = end
            if end == n_tokens:
                break
        return out
    raise ValueError(f"unknown perplexity protocol {protocol!r}; allowed: windows, sliding")


class LogprobStore:
    """Reference next-token log-probabilities (fp16) for the first ``capacity`` predicted tokens, on disk."""

    def __init__(self, path: Path, capacity: int, vocab: int, mode: str):
        self.path, self.capacity, self.vocab = Path(path), capacity, vocab
        self.array = np.lib.format.open_memmap(self.path, mode=mode, dtype=np.float16, shape=(capacity, vocab))
        self.filled = capacity if mode == "r" else 0

    @classmethod
    def create(cls, capacity: int, vocab: int, folder: Path | None = None) -> "LogprobStore":
        fd, name = tempfile.mkstemp(suffix=".logp.npy", dir=folder)
        os.close(fd)
        return cls(Path(name), capacity, vocab, "w+")

    def write(self, logp: torch.Tensor) -> None:
        n = min(len(logp), self.capacity - self.filled)
        if n > 0:
            self.array[self.filled : self.filled + n] = logp[:n].to(torch.float16).cpu().numpy()
            self.filled += n

    def read(self, start: int, n: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[start : start + n], dtype=np.float32))

    def close(self, delete: bool = False) -> None:
        self.array.flush()
        del self.array
        if delete:
            self.path.unlink(missing_ok=True)


@dataclass
class PerplexityResult:
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens counted
    windows: int
    seconds: float
    token_nll: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    divergence: dict | None = None  # KL and top-1 agreement against a reference, when one was given

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def _device(model) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def _logits(model, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The model's logits for a batch of windows; a batch that runs out of memory is split in halves (down to one
    window), so a batch size chosen for the GPU's size backs off instead of failing."""
    try:
        return model(x.to(device)).logits
    except torch.OutOfMemoryError:
        if len(x) == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(x) // 2
        return torch.cat([_logits(model, x[:half], device), _logits(model, x[half:], device)])


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, windows: list[Window], batch_size: int = 4, write_logprobs: LogprobStore | None = None,
             reference: LogprobStore | None = None, progress: bool = True, desc: str = "perplexity",
             logits_of=None) -> PerplexityResult:
    """Score ``ids`` (a 1-D token tensor) window by window, in batches of equal-length windows.

    With ``write_logprobs``, the model's log-probabilities at the counted positions are
    stored (up to the store's capacity); with ``reference``, the model is compared with
    a stored reference at those same positions. ``logits_of(batches)``, when given, computes
    the logits of every batch instead of ``model`` (e.g. one decoder layer at a time over all
    batches, for a model larger than memory), yielding them in order.
    """
    import time

    t0 = time.perf_counter()
    device = _device(model) if logits_of is None else torch.device("cpu")
    ids = ids.reshape(-1)
    nlls: list[torch.Tensor] = []
    kl: list[torch.Tensor] = []
    agree: list[torch.Tensor] = []
    position = 0  # counted tokens so far, in window order (indexes the stores)
    batches = _batches(windows, batch_size)
    xs = [torch.stack([ids[w.begin : w.end] for w in batch]) for batch in batches]
    all_logits = logits_of(xs) if logits_of is not None else (_logits(model, x, device) for x in xs)
    bar = tqdm(total=sum(w.n_targets for w in windows), desc=desc, unit="tok", disable=not progress)
    for batch, x, logits in zip(batches, xs, all_logits):
        x = x.to(logits.device)
        for i, w in enumerate(batch):
            skip = w.first_target - w.begin - 1  # predictions before the first counted target
            logp = torch.log_softmax(logits[i, skip:-1].float(), dim=-1)
            targets = x[i, w.first_target - w.begin :]
            nlls.append(-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu())
            if write_logprobs is not None:
                write_logprobs.write(logp)
            if reference is not None and position < reference.capacity:
                n = min(len(logp), reference.capacity - position)
                ref = reference.read(position, n).to(logp.device)
                kl.append(token_kl(ref, logp[:n]).cpu())
                agree.append((ref.argmax(-1) == logp[:n].argmax(-1)).cpu())
            position += w.n_targets
            bar.update(w.n_targets)
        del logits
    bar.close()
    token_nll = torch.cat(nlls).double()
    result = PerplexityResult(
        nll=token_nll.mean().item(), tokens=len(token_nll), windows=len(windows),
        seconds=time.perf_counter() - t0, token_nll=token_nll.numpy(),
    )
    if reference is not None:
        result.divergence = divergence_stats(torch.cat(kl), torch.cat(agree))
    return result


def token_kl(ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``logp`` from ``ref`` (log-probabilities, ``[..., vocab]``) per position, in nats."""
    return (ref.exp() * (ref - logp)).sum(-1).clamp_min(0)


def divergence_stats(kl: torch.Tensor, agree: torch.Tensor) -> dict:
    kl = kl.double()
    return {
        "kl_divergence": {
            "mean": kl.mean().item(),
            "median": kl.median().item(),
            "p99": torch.quantile(kl, 0.99).item() if len(kl) else float("nan"),
            "max": kl.max().item(),
        },
        "top1_agreement": agree.float().mean().item(),
        "tokens": len(kl),
    }


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most ``batch_size`` per batch (order kept)."""
    out: list[list[Window]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and (out[-1][0].end - out[-1][0].begin) == (w.end - w.begin):
            out[-1].append(w)
        else:
            out.append([w])
    return out


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Tokenize the whole text once (with the tokenizer's own special-token defaults)."""
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=True)
    ids = enc.input_ids[0]
    total = len(ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids, {"tokens_in_text": total, "bos_prepended": bool(bos is not None and len(ids) and ids[0].item() == bos)}
