"""Automatic mixed precision: every layer's format chosen for a size budget or a quality target.

``quantization.auto`` turns into explicit rules before anything is quantized, so the resolved recipe
(``recipe.yaml`` of the export) re-runs without searching. Three steps:

1. **Sensitivity.** On calibration windows the float model runs forward and backward, with the loss
   of tokens sampled from its own output distribution (so the gradients estimate the Fisher
   information of the output, the curvature of the KL divergence). Each Linear layer gets
   ``F_j = mean_t g_tj²`` (the squared gradient of its output channel ``j``) and its input statistics
   ``H = mean_t x_t x_tᵀ``. A weight error ``E = W - Q(W)`` then costs about
   ``½ Σ_j F_j (E H Eᵀ)_jj`` nats per token of KL divergence (second order, channels and layers
   taken as independent). ``Q`` is each candidate format's real bitsandbytes grid: round to
   nearest, and for INT8 the simulated LLM.int8 product on a token sample (its activation error
   counts too). For a calibrated method (``scale_search``, ``gptq``) the method is run for one
   reference 4-bit format per layer, and the layer's 4-bit scores are scaled by how much it
   lowers that format's error. A model read from safetensors is measured and scored one decoder layer
   at a time (:func:`sensitivity_streamed`), never held whole.
2. **Allocation.** A multiple-choice knapsack, solved exactly by dynamic programming over sizes
   rounded up to a fine unit (so the budget always holds, and the answer is optimal for the rounded
   sizes): the least predicted KL whose bytes fit. The same table gives the best predicted KL at
   every size: the frontier, plotted with the uniform formats beside it. With a quality target
   (``kl``), the smallest mix on that frontier whose KL divergence *measured* on the calibration
   windows (the layers swapped for their bitsandbytes modules) meets it, found by a few corrected
   measurements (:func:`meet_kl`; streamed one decoder layer at a time by :class:`StreamedKLMeter`).
3. **Rules.** One rule per chosen format (a glob over the decoder layers where every layer agrees,
   names otherwise), after the recipe's own rules, which keep their layers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import UserError
from .plan import HEADER_BYTES_PER_TENSOR, Plan, PlanEntry, entry_tensors, is_linear, matches
from .quantized import KeptWeight
from .schemes import BNB_BLOCKSIZES, CPU_4BIT_ROW_TILE, DTYPE_NAMES, FourBit, Int8, Keep

# Cells of the allocation table: sizes are counted in units of (largest size / this), rounded up.
TABLE_CELLS = 1 << 18
# Tokens per Linear input kept to measure INT8 candidates (LLM.int8 quantizes activations per token).
INT8_SAMPLE_TOKENS = 2048


def default_candidates(model_dtype: torch.dtype, loadable_by: str = "any") -> list:
    """NF4 at block 32 to 256 with and without double quantization, INT8, and the layer kept as it is (and in
    float16 when the model computes in float32, unless the checkpoint must load in stock transformers)."""
    menu: list = [FourBit(format="nf4", group_size=g, double_quant=dq) for g in (32, 64, 128, 256) for dq in (False, True)]
    menu += [Int8(), Keep(format=DTYPE_NAMES[model_dtype])]
    if model_dtype == torch.float32 and loadable_by == "any":
        menu.append(Keep(format="fp16"))
    return menu


def check_candidates(candidates: list, loadable_by: str, model_dtype: torch.dtype) -> list:
    """The menu for ``loadable_by``, or one line saying why it cannot be used."""
    for c in candidates:
        if isinstance(c, Keep) and c.dtype.itemsize > model_dtype.itemsize:
            raise UserError(f"quantization.auto: candidate {c.label()} is wider than the model's dtype {DTYPE_NAMES[model_dtype]}")
        if loadable_by == "transformers" and isinstance(c, Keep) and c.dtype != model_dtype:
            raise UserError(f"quantization.auto: candidate {c.label()} is not the model's dtype ({DTYPE_NAMES[model_dtype]}); "
                            "stock transformers would not cast it (loadable_by: transformers)")
    if loadable_by == "transformers" and any(isinstance(c, FourBit) for c in candidates):
        candidates = [c for c in candidates if not isinstance(c, Int8)]  # INT8 beside 4-bit needs llmquant's format
    if loadable_by == "transformers" and len({c for c in candidates if isinstance(c, Int8)}) > 1:
        raise UserError("quantization.auto: stock transformers reads one INT8 threshold; give one int8 candidate")
    if not candidates:
        raise UserError("quantization.auto: no candidate formats left")
    return candidates


def fits(c, e: PlanEntry, tile: int | None = CPU_4BIT_ROW_TILE) -> bool:
    if isinstance(c, FourBit):
        return e.in_features % c.group_size == 0 and not (tile and e.out_features % tile)
    return True


# ---- 1. sensitivity ---------------------------------------------------------------------------


class _Stats:
    """One Linear input's ``Σ x xᵀ`` and a token sample (shared by layers reading the same tensor)."""

    def __init__(self):
        self.h, self.tokens, self.sample = None, 0, []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h = x.t() @ x if self.h is None else self.h.addmm_(x.t(), x)
        self.tokens += len(x)
        have = sum(len(s) for s in self.sample)
        if have < INT8_SAMPLE_TOKENS:
            self.sample.append(x[: INT8_SAMPLE_TOKENS - have].clone())


class _Recorder:
    """What the sensitivity pass gathers, through hooks on the Linear layers: each input's statistics (forward
    pre-hooks) and the squared gradients of each output channel, summed over tokens (forward hooks that hook the
    output's gradient)."""

    def __init__(self):
        self.fisher: dict[str, torch.Tensor] = {}
        self.stats: dict[str, _Stats] = {}
        # input tensor of this forward -> its statistics; the tensor is held until the forward ends, so that its memory
        # cannot come back (same address, same shape) as another layer's input and be taken for the same tensor
        self.seen: dict[tuple, tuple[_Stats, torch.Tensor]] = {}

    def attach(self, model: nn.Module, names: list[str], inputs: bool = True, grads: bool = True) -> list:
        handles = []
        for name in names:
            m = model.get_submodule(name)
            if inputs:
                handles.append(m.register_forward_pre_hook(self._pre(name)))
            if grads:
                handles.append(m.register_forward_hook(self._post(name)))
        return handles

    def _pre(self, name: str):
        def pre(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            if key not in self.seen:  # layers reading the very same tensor (q/k/v, gate/up) share statistics
                self.seen[key] = (self.stats.get(name) or _Stats(), x)
                self.seen[key][0].add(x.detach())
            self.stats[name] = self.seen[key][0]

        return pre

    def _post(self, name: str):
        def grad(g):
            g2 = g.detach().reshape(-1, g.shape[-1]).float().square().sum(0)
            self.fisher[name] = g2 if name not in self.fisher else self.fisher[name].add_(g2)

        def post(module, args, out):
            if out.requires_grad:
                out.register_hook(grad)

        return post

    def result(self, entries: list[PlanEntry], tokens: int):
        missing = [e.name for e in entries if e.name not in self.fisher or e.name not in self.stats]
        if missing:
            raise UserError(f"quantization.auto: no gradient reached {missing[0]} on the calibration windows; pin it with a rule")
        return {n: f / tokens for n, f in self.fisher.items()}, self.stats


def _draw_labels(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Tokens drawn from the model's own next-token distribution: their loss's gradients estimate the Fisher
    information of the output."""
    with torch.no_grad():
        return torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen).squeeze(1).to(logits.device)


def measure(model: nn.Module, entries: list[PlanEntry], windows: torch.Tensor, seed: int, progress: bool = True):
    """Per layer: Fisher weights of its output channels ``F`` and its input statistics (see the module docstring)."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    rec = _Recorder()
    handles = rec.attach(model, [e.name for e in entries])
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = 0
    try:
        for w in tqdm(windows, desc="sensitivity", unit="window", disable=not progress):
            rec.seen.clear()
            logits = model(w.unsqueeze(0).to(device), use_cache=False).logits[0].float()
            labels = _draw_labels(logits, gen)
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
            tokens += len(labels)
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return rec.result(entries, tokens)


def _by_layer(entries: list[PlanEntry], stack: str, n: int) -> tuple[list[list[PlanEntry]], list[PlanEntry]]:
    """The entries inside each of the ``n`` decoder layers of ``stack``, and those outside them (the head)."""
    inside = [[e for e in entries if e.name.startswith(f"{stack}.{i}.")] for i in range(n)]
    return inside, [e for e in entries if not any(e in group for group in inside)]


def sensitivity_streamed(model: nn.Module, entries: list[PlanEntry], menus: dict[str, list], windows: torch.Tensor, seed: int,
                         method: str, options: dict, dtype: torch.dtype, reader, device, scratch, progress: bool = True,
                         record: dict | None = None):
    """:func:`measure` then :func:`score` on a skeleton whose decoder layers are read from the checkpoint one at a time.

    Forward: all windows through the embeddings, then through layer 0, layer 1, ... (each layer's inputs saved in
    ``scratch``, a folder); the final norm and head give each window's logits, the tokens are drawn and the loss's
    gradient with respect to the last hidden state is kept. Backward: layer by layer from the last, each layer read
    again and run again on its saved inputs with gradients (its Linear inputs measured on the way), the kept gradient
    sent back through it (its output channels' squared gradients measured on the way), which gives the gradient for
    the layer before; the layer's formats are scored then, and its statistics dropped. The same windows, draws and
    sums in the same order as :func:`measure`: the same numbers up to the order autograd adds a layer's input
    gradients in. Memory: one layer and its statistics, and the hidden states and gradients of all windows at one
    layer (on the CPU); every layer's inputs go to ``scratch`` on disk. ``record`` (when given) gets the Fisher
    weights and statistics of every layer (for tests: they are dropped otherwise)."""
    from pathlib import Path

    from .memory import give_memory_back
    from .stream import materialize_outside, release, source_layer
    from .walk import call_layer, capture, decoder_layers, logits_after_layers, through_layer

    stack, layers = decoder_layers(model)
    n = len(layers)
    names = [e.name for e in entries]
    inside, outside = _by_layer(entries, stack, n)
    rec, scratch = _Recorder(), Path(scratch)
    scores: dict[str, dict[str, float]] = {}
    ratios: dict[str, float] = {}
    tokens = 0

    def score_now(group: list[PlanEntry]) -> None:  # with the group's weights in place
        fisher, stats = rec.result(group, tokens)
        s, r = score(model, group, menus, fisher, stats, method, options, dtype, progress=False)
        scores.update(s)
        ratios.update(r)
        if record is not None:
            record.setdefault("fisher", {}).update(fisher)
            record.setdefault("stats", {}).update({e.name: stats[e.name] for e in group})
        for e in group:
            del rec.fisher[e.name], rec.stats[e.name]
        give_memory_back()  # the scoring's temporaries, before the next layer's

    outer = materialize_outside(model, layers, reader, device)
    try:
        hidden, calls = capture(model, layers, windows.unsqueeze(1), device, store="cpu")
    finally:
        release(model, outer)
    bar = tqdm(total=2 * n + 1, desc="sensitivity", unit="pass", disable=not progress)
    for i in range(n):  # forward
        torch.save(hidden, scratch / f"inputs-{i:05d}.pt")
        with source_layer(model, stack, i, reader, device) as layer:
            through_layer(layer, i, hidden, calls, device)
        bar.update(1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    outer = materialize_outside(model, layers, reader, device)
    handles = rec.attach(model, [e.name for e in outside])
    try:
        for b, w in enumerate(windows):  # the head: tokens drawn, and the loss's gradient at the last hidden state
            rec.seen.clear()
            x = hidden[b].to(device).requires_grad_(True)
            logits = logits_after_layers(model, layers, w.unsqueeze(0).to(device), x, stack, grad=True)[0]
            labels = _draw_labels(logits, gen)
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
            hidden[b] = x.grad.cpu()
            tokens += len(labels)
        for h in handles:
            h.remove()
        if outside:
            score_now(outside)
    finally:
        for h in handles:
            h.remove()
        release(model, outer)
    bar.update(1)
    for i in reversed(range(n)):  # backward, and the layer's scores
        inputs = torch.load(scratch / f"inputs-{i:05d}.pt")
        with source_layer(model, stack, i, reader, device) as layer:
            handles = rec.attach(model, [e.name for e in inside[i]])
            try:
                for b, call in enumerate(calls.at(i, device)):
                    rec.seen.clear()
                    x = inputs[b].to(device).requires_grad_(True)
                    call_layer(layer, x, call, device, grad=True).backward(hidden[b].to(device))
                    hidden[b] = x.grad.cpu()
            finally:
                for h in handles:
                    h.remove()
            rec.seen.clear()
            if inside[i]:
                score_now(inside[i])
        del inputs
        (scratch / f"inputs-{i:05d}.pt").unlink()
        bar.update(1)
    bar.close()
    return {x: scores[x] for x in names}, ratios


def candidate_error(w: torch.Tensor, c, dtype: torch.dtype, st: _Stats, h: torch.Tensor, f: torch.Tensor,
                    qw=None) -> float:
    """Predicted KL (nats/token) of storing ``w`` as ``c`` (``qw``: the weights a method chose, else round to nearest)."""
    from .algorithms import ALGORITHMS
    from .algorithms.awq import llm_int8_output
    from .algorithms.grid import quadratic_error

    if isinstance(c, Keep):
        if c.dtype == dtype:
            return 0.0
        e = w - w.to(c.dtype).float()
        return 0.5 * float(quadratic_error(e, h) @ f)
    qw = qw or ALGORITHMS["rtn"].quantize(w, c, dtype)
    if isinstance(c, Int8):
        x = torch.cat(st.sample)
        dy = llm_int8_output(x, qw.codes, qw.scb, c.threshold) - x @ w.t()
        return 0.5 * float(dy.square().mean(0) @ f)
    return 0.5 * float(quadratic_error(w - qw.dequantize().float(), h) @ f)


def score(model: nn.Module, entries: list[PlanEntry], menus: dict[str, list], fisher: dict, stats: dict, method: str,
          options: dict, dtype: torch.dtype, progress: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Predicted KL of every candidate of every layer; and, for a calibrated method, how much it lowered the
    reference 4-bit format's error per layer."""
    from .algorithms import ALGORITHMS
    from .algorithms.scale_search import LayerStats
    from .quantize import layer_weight

    algo = ALGORITHMS[method]
    scores: dict[str, dict[str, float]] = {}
    ratios: dict[str, float] = {}
    for e in tqdm(entries, desc="scoring formats", unit="layer", disable=not progress):
        w = layer_weight(model.get_submodule(e.name)).detach().float()
        st = stats[e.name]
        h = st.h / st.tokens
        f = fisher[e.name].to(w.device)
        row = {c.label(): candidate_error(w, c, dtype, st, h, f) for c in menus[e.name]}
        four = [c for c in menus[e.name] if isinstance(c, FourBit)]
        if algo.calibrated and four:
            ref = next((c for c in four if c.group_size == 64 and not c.double_quant), four[0])
            qm = algo.quantize(w, ref, dtype, LayerStats(h, st.tokens, options))
            r = candidate_error(w, ref, dtype, st, h, f, qm) / max(row[ref.label()], 1e-30)
            ratios[e.name] = r = min(max(r, 0.0), 1.0)
            row = {c.label(): v * r if isinstance(c, FourBit) else v for c, v in zip(menus[e.name], row.values())}
        scores[e.name] = row
    return scores, ratios


# ---- 2. allocation ----------------------------------------------------------------------------


def allocate(costs: list[list[int]], values: list[list[float]], budget: int, cells: int = TABLE_CELLS, span: int = 0):
    """Least total value, one choice per item, total cost within ``budget`` (multiple-choice knapsack).

    The table covers capacities up to ``max(budget, span)`` in units of that ``/ cells`` (rounded up), and each
    cost is rounded up to whole units: the answer never exceeds the budget and is optimal for the rounded costs
    (exact when the unit is 1). Returns (the choice per item, the unit, the table's best value at each capacity
    in units); ``None`` as the choice when nothing fits.
    """
    top = max(budget, span, 1)
    unit = max(1, math.ceil(top / cells))
    cap = top // unit
    best = torch.zeros(cap + 1, dtype=torch.float64)  # no items yet: value 0 at every capacity
    picks = []
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    small = max(len(c) for c in costs) < 127
    for cost, val in zip(costs, values):
        new = torch.full_like(best, float("inf"))
        pick = torch.full((cap + 1,), -1, dtype=torch.int8 if small else torch.int16)
        for k, (c, v) in enumerate(zip(cost, val)):
            w = -(-c // unit)
            if w > cap:
                continue
            cand = torch.cat([inf.expand(w), best[: cap + 1 - w] + v])
            better = cand < new
            new = torch.where(better, cand, new)
            pick[better] = k
        best = new
        picks.append(pick)
    c = min(budget // unit, cap)
    if not math.isfinite(best[c].item()):
        return None, unit, best
    choice = []
    for cost, pick in zip(reversed(costs), reversed(picks)):
        k = int(pick[c])
        choice.append(k)
        c -= -(-cost[k] // unit)
    return choice[::-1], unit, best


# ---- 2b. a quality target ----------------------------------------------------------------------

# Mixes measured at most to meet a ``kl`` target; stop early once one meets it within this fraction.
KL_ROUNDS = 6
KL_CLOSE = 0.9


def meet_kl(p: "Problem", values: list[list[float]], best: torch.Tensor, unit: int, kl_of, target: float, log=print):
    """The smallest mix whose KL divergence *measured* by ``kl_of`` (a :class:`KLMeter` or
    :class:`StreamedKLMeter`) is at most ``target``.

    The table gives the smallest mix for any predicted KL; the prediction is not the measurement (it is a second-order,
    layer-by-layer estimate), so the predicted level to ask for is corrected by measuring: start at the target, then move
    the level by the ratio measured/predicted, kept strictly between the largest level that met the target and the
    smallest that did not (halfway, in ratio, when the ratio would leave that interval). Returns (the choice, the checks, its measured KL).
    """
    span = sum(max(c) for c in p.costs)
    checks: list[dict] = []
    good, good_goal, bad_goal, tried = None, 0.0, math.inf, set()
    goal = target
    for r in range(KL_ROUNDS + 1):
        if r == KL_ROUNDS:  # nothing met the target yet: the least predicted KL the candidates allow, once
            if good is not None:
                break
            goal = best[-1].item()
        ok = torch.nonzero(best <= goal * (1 + 1e-9))
        cap = int(ok[0]) if len(ok) else len(best) - 1
        choice, _, _ = allocate(p.costs, values, cap * unit, span=span)
        if tuple(choice) in tried:  # a level between two known ones that selects a known mix
            if good is not None:
                break
            goal /= 4
            continue
        tried.add(tuple(choice))
        predicted = sum(v[k] for v, k in zip(values, choice))
        size = sum(x[k] for x, k in zip(p.costs, choice))
        kl = kl_of({e.name: p.menus[e.name][k] for e, k in zip(p.free, choice)})
        checks.append({"x": round(_x(p, p.fixed + size), 4), "predicted_kl": predicted, "measured_kl": kl})
        log(f"auto: kl {target:g}: the mix at {_x(p, p.fixed + size):.3f} bits per weight measures {kl:.4f} "
            f"nats/token (predicted {predicted:.4f})")
        if kl <= target:
            if good is None or size < good[1]:
                good = (choice, size, kl)
            good_goal = max(good_goal, goal)
            if kl >= KL_CLOSE * target:
                break
        else:
            bad_goal = min(bad_goal, goal)
        nxt = predicted * target / kl if kl > 0 and predicted > 0 else goal * 2
        if not good_goal < nxt < bad_goal:
            nxt = math.sqrt(max(good_goal, goal / 16) * min(bad_goal, goal * 16))
        goal = nxt
    if good is None:
        least = min(c["measured_kl"] for c in checks)
        raise UserError(f"quantization.auto: kl {target:g} cannot be met with these candidates; the best mix measures "
                        f"{least:.4f} nats/token on the calibration windows: add wider candidates or raise the target")
    return good[0], checks, good[2]


def _module_for(orig: nn.Module, qw, dtype: torch.dtype) -> nn.Module:
    """The module the export will hold in place of ``orig`` for the chosen weights ``qw``."""
    import copy

    from .backends.bnb import build_module

    if isinstance(qw, KeptWeight):
        new = copy.deepcopy(orig)
        w = qw.weight if is_linear(orig) else qw.weight.t()
        new.weight.data = w.to(device=orig.weight.device, dtype=dtype).contiguous()
        return new
    new = build_module(qw, orig.bias, dtype, orig.weight.device)
    if hasattr(orig, "_hf_hook"):  # accelerate's device placement (a model spread over GPUs)
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, orig._hf_hook)
    return new


class KLMeter:
    """Mean KL divergence (nats/token) of the float model's next-token distribution from that of the model with some
    layers swapped for their bitsandbytes modules (weights chosen by ``method``, built as the export builds them)."""

    def __init__(self, model: nn.Module, entries: list[PlanEntry], windows: torch.Tensor, stats: dict, method: str,
                 options: dict, progress: bool):
        self.model, self.windows, self.stats, self.method, self.options, self.progress = model, windows, stats, method, options, progress
        self.entries = {e.name: e for e in entries}
        self.float = {e.name: model.get_submodule(e.name) for e in entries}
        self.built: dict[tuple[str, str], nn.Module] = {}  # (layer, format) -> module, reused between mixes

    def module(self, name: str, c) -> nn.Module:
        from .algorithms import ALGORITHMS
        from .algorithms.scale_search import LayerStats
        from .quantize import layer_weight

        key = (name, c.label())
        if key not in self.built:
            orig, dtype = self.float[name], self.model.dtype
            algo, st = ALGORITHMS[self.method], self.stats[name]
            layer_stats = LayerStats(st.h / st.tokens, st.tokens, self.options) if algo.calibrated else None
            qw = algo.quantize(layer_weight(orig).detach().float(), c, dtype, layer_stats)
            self.built[key] = _module_for(orig, qw, dtype)
        return self.built[key]

    def _use(self, modules: dict[str, nn.Module]) -> None:
        for name, m in modules.items():
            self.model.set_submodule(name, m)

    @torch.no_grad()
    def __call__(self, picked: dict) -> float:
        from .evaluate.perplexity import token_kl

        quant = {n: self.float[n] if isinstance(c, Keep) and c.dtype == self.model.dtype else self.module(n, c)
                 for n, c in picked.items()}
        device = next(p.device for p in self.model.parameters() if p.device.type != "meta")
        total, tokens = 0.0, 0
        try:
            for w in tqdm(self.windows, desc="measuring KL", unit="window", disable=not self.progress, leave=False):
                x = w.unsqueeze(0).to(device)
                self._use(self.float)
                ref = torch.log_softmax(self.model(x, use_cache=False).logits[0].float(), -1)
                self._use(quant)
                logp = torch.log_softmax(self.model(x, use_cache=False).logits[0].float(), -1)
                total += float(token_kl(ref, logp).sum())
                tokens += len(ref)
        finally:
            self._use(self.float)
        return total / tokens

    def close(self) -> None:
        self._use(self.float)
        self.built.clear()


class StreamedKLMeter:
    """:class:`KLMeter`'s measurement for a skeleton whose decoder layers are read from the checkpoint one at a time.

    Once, the float pass: all windows through the embeddings (the start of every mix's pass, saved in ``scratch``),
    then through one decoder layer at a time, each layer's Linear input statistics measured for a calibrated method
    (saved), and the float model's last hidden states kept (saved). Each mix then runs all windows through one layer
    at a time again with the mix's modules in place of that layer's Linear layers, and compares the two models'
    next-token distributions through the final norm and head (the head's format swapped in for the mix). The weights a
    format gets are chosen once per layer and format and kept in ``scratch`` for the mixes after. Memory: one layer and
    the hidden states of all windows at one layer; disk: a few hidden-state copies and the chosen weights."""

    def __init__(self, model: nn.Module, entries: list[PlanEntry], windows: torch.Tensor, method: str, options: dict,
                 reader, device, scratch, progress: bool = True):
        from pathlib import Path

        from .algorithms import ALGORITHMS
        from .stream import materialize_outside, release, source_layer
        from .walk import capture, decoder_layers, logits_after_layers, through_layer

        self.model, self.windows, self.method, self.options = model, windows, method, options
        self.reader, self.device, self.scratch, self.progress = reader, device, Path(scratch), progress
        self.stack, layers = decoder_layers(model)
        self.n = len(layers)
        self.inside, self.outside = _by_layer(entries, self.stack, self.n)
        self.calibrated = ALGORITHMS[method].calibrated
        rec = _Recorder()
        outer = materialize_outside(model, layers, reader, device)
        try:
            hidden, self.calls = capture(model, layers, windows.unsqueeze(1), device, store="cpu")
        finally:
            release(model, outer)
        torch.save(hidden, self.scratch / "kl-start.pt")
        for i in tqdm(range(self.n), desc="KL: float model", unit="layer", disable=not progress):
            with source_layer(model, self.stack, i, reader, device) as layer:
                handles = rec.attach(model, [e.name for e in self.inside[i]], grads=False) if self.calibrated else []
                try:
                    through_layer(layer, i, hidden, self.calls, device, before=lambda b: rec.seen.clear())
                finally:
                    for h in handles:
                        h.remove()
                rec.seen.clear()
            self._save_stats(i, rec)
        torch.save(hidden, self.scratch / "kl-float.pt")
        if self.calibrated and self.outside:  # the head's (and any other outside Linear's) inputs
            outer = materialize_outside(model, layers, reader, device)
            handles = rec.attach(model, [e.name for e in self.outside], grads=False)
            try:
                for b, w in enumerate(windows):
                    rec.seen.clear()
                    logits_after_layers(model, layers, w.unsqueeze(0).to(device), hidden[b].to(device), self.stack)
            finally:
                for h in handles:
                    h.remove()
                rec.seen.clear()
                release(model, outer)
            self._save_stats("outside", rec)

    def _save_stats(self, key, rec: _Recorder) -> None:
        if rec.stats:
            torch.save({n: (st.h / st.tokens, st.tokens) for n, st in rec.stats.items()}, self.scratch / f"kl-stats-{key}.pt")
        rec.stats.clear()

    def _modules(self, group: list[PlanEntry], picked: dict, key) -> dict[str, nn.Module]:
        """The mix's modules for the group's Linear layers (materialized) that it changes."""
        import re

        from .algorithms import ALGORITHMS
        from .algorithms.scale_search import LayerStats
        from .quantize import layer_weight

        dtype, stats, out = self.model.dtype, None, {}
        for e in group:
            c = picked[e.name]
            if isinstance(c, Keep) and c.dtype == dtype:
                continue
            orig = self.model.get_submodule(e.name)
            path = self.scratch / re.sub(r"[^\w.+-]", "_", f"kl-weights-{e.name}-{c.label()}.pt")
            if path.exists():
                qw = torch.load(path, weights_only=False)
            else:
                layer_stats = None
                if self.calibrated:
                    if stats is None:
                        stats = torch.load(self.scratch / f"kl-stats-{key}.pt")
                    h, tokens = stats[e.name]
                    layer_stats = LayerStats(h, tokens, self.options)
                qw = ALGORITHMS[self.method].quantize(layer_weight(orig).detach().float(), c, dtype, layer_stats)
                torch.save(qw, path)
            out[e.name] = _module_for(orig, qw, dtype)
        return out

    @torch.no_grad()
    def __call__(self, picked: dict) -> float:
        from .evaluate.perplexity import token_kl
        from .stream import materialize_outside, release, source_layer
        from .walk import decoder_layers, logits_after_layers, through_layer

        model, device = self.model, self.device
        layers = decoder_layers(model)[1]
        hidden = torch.load(self.scratch / "kl-start.pt")
        for i in tqdm(range(self.n), desc="KL: the mix", unit="layer", disable=not self.progress, leave=False):
            with source_layer(model, self.stack, i, self.reader, device) as layer:
                for name, m in self._modules(self.inside[i], picked, i).items():  # given back with the layer
                    model.set_submodule(name, m)
                through_layer(layer, i, hidden, self.calls, device)
        ref_hidden = torch.load(self.scratch / "kl-float.pt")
        total, tokens = 0.0, 0
        outer = materialize_outside(model, layers, self.reader, device)
        floats = {e.name: model.get_submodule(e.name) for e in self.outside}
        try:
            quant = self._modules(self.outside, picked, "outside")
            for b, w in enumerate(self.windows):
                ids = w.unsqueeze(0).to(device)
                for name, m in floats.items():
                    model.set_submodule(name, m)
                ref = torch.log_softmax(logits_after_layers(model, layers, ids, ref_hidden[b].to(device), self.stack)[0], -1)
                for name, m in quant.items():
                    model.set_submodule(name, m)
                logp = torch.log_softmax(logits_after_layers(model, layers, ids, hidden[b].to(device), self.stack)[0], -1)
                total += float(token_kl(ref, logp).sum())
                tokens += len(ref)
        finally:
            for name, m in floats.items():
                model.set_submodule(name, m)
            release(model, outer)
        return total / tokens

    def close(self) -> None:
        for f in self.scratch.glob("kl-*.pt"):
            f.unlink()


# ---- 3. the whole step ------------------------------------------------------------------------


@dataclass
class Problem:
    """What the search chooses among, from the model's shapes alone (a skeleton will do): checked before any
    weight is read."""

    free: list[PlanEntry]  # layers no rule pins and ignore leaves
    menus: dict[str, list]  # layer -> candidate formats that fit it
    candidates: list
    costs: list[list[int]]  # per free layer and candidate: bytes the budget counts
    budget: int  # bytes left to the free layers
    fixed: int  # bytes of the rest that the budget counts
    weights: int  # weights of the formatted Linear layers (bits per weight divide by it)
    per_weight: bool  # budget in bits per weight (else the files' bytes)
    target: str
    file_rest: int = 0  # bytes of the files but the budgeted ones: a mix whose costs sum to C writes file_rest + C

    def file_bytes(self, cost: int) -> int:
        return self.file_rest + cost


def prepare(recipe, model: nn.Module, dtype: torch.dtype) -> Problem:
    """The search's layers, candidates and sizes; one line if the budget cannot be met."""
    from .plan import build_plan
    from .recipe import parse_size

    q, auto = recipe.quantization, recipe.quantization.auto
    from .models import pick_device
    from .plan import row_tile

    tile = row_tile(pick_device(recipe.device))
    base = build_plan(model, q.model_copy(update={"auto": None}), dtype, tile)
    free = [e for e in base.entries if e.source == "default"]
    if not free:
        raise UserError("quantization.auto: the rules and ignore leave no layer to choose a format for")
    candidates = list(auto.candidates) if auto.candidates else default_candidates(dtype, auto.loadable_by)
    pinned = [x for x in base.entries if x.source != "default"]
    if auto.loadable_by == "transformers":
        pinned_plan = Plan(pinned, dtype, {}, 0)
        if pinned_plan.quantized_entries and not pinned_plan.stock_compatible():
            raise UserError("quantization.auto: loadable_by transformers, but the recipe's own rules mix formats stock "
                            "transformers cannot load (INT8 beside 4-bit, or a float layer in another dtype)")
        kinds = {type(x.scheme) for x in pinned_plan.quantized_entries}
        candidates = [c for c in candidates if not (isinstance(c, Int8) and FourBit in kinds)
                      and not (isinstance(c, FourBit) and Int8 in kinds)]
    candidates = check_candidates(candidates, auto.loadable_by, dtype)
    menus = {e.name: [k for k in candidates if fits(k, e, tile)] for e in free}
    for e in free:
        if not menus[e.name]:
            raise UserError(f"quantization.auto: no candidate fits {e.name} ({e.out_features}x{e.in_features}); "
                            f"add int8 or a float format, or 4-bit blocks dividing {e.in_features} "
                            f"({', '.join(str(b) for b in BNB_BLOCKSIZES if e.in_features % b == 0) or 'none'})")
    per_weight = auto.max_size is None

    def size(e: PlanEntry, k, files: bool = not per_weight) -> int:  # what one choice adds to the budgeted quantity
        t = entry_tensors(PlanEntry(e.name, e.layer, e.out_features, e.in_features, e.has_bias, k, q.method, "auto"), dtype)
        if files:  # the files' bytes: data and header entries
            return sum(math.prod(s) * d.itemsize + len(f"{e.name}.{n}") + HEADER_BYTES_PER_TENSOR for n, (s, d) in t.items())
        return sum(math.prod(s) * d.itemsize for n, (s, d) in t.items() if n != "bias")

    n = sum(x.numel for x in base.entries if x.scheme is not None)
    costs = [[size(e, k) for k in menus[e.name]] for e in free]
    if per_weight:
        fixed = sum(x.nbytes - (x.out_features * dtype.itemsize if x.has_bias else 0) for x in pinned if x.scheme is not None)
        if auto.kl is not None:  # any size: the search looks for the smallest mix that meets the target
            budget, target = sum(max(x) for x in costs), f"kl {auto.kl:g}"
        else:
            budget, target = math.floor(auto.bits_per_weight * n / 8) - fixed, f"bits_per_weight {auto.bits_per_weight:g}"
    else:
        fixed = Plan(pinned, dtype, base.other_tensors, base.float_bytes).file_bytes_estimate()
        budget, target = parse_size(auto.max_size) - fixed, f"max_size {auto.max_size}"
    # the rest of the files (for bits per weight: the biases and header entries of the free layers too, with their
    # first candidate; other candidates' header entries differ by a few hundred bytes a layer)
    file_rest = Plan(pinned, dtype, base.other_tensors, base.float_bytes).file_bytes_estimate()
    if per_weight:
        file_rest += sum(size(e, menus[e.name][0], files=True) - cost[0] for e, cost in zip(free, costs))
    smallest = sum(min(x) for x in costs)
    if smallest > budget:
        least = f"{8 * (fixed + smallest) / n:.3f} bits per weight" if per_weight else f"{(fixed + smallest) / 1e6:.2f} MB"
        raise UserError(f"quantization.auto: {target} cannot be met with these candidates; the smallest mix is {least}")
    return Problem(free, menus, candidates, costs, budget, fixed, n, per_weight, target, file_rest)


def resolve(recipe, problem: Problem, model: nn.Module, tokenizer, calib_text: str, progress: bool = True, log=print,
            streamed: tuple | None = None):
    """The recipe with ``quantization.auto`` replaced by explicit rules, and the report of the search. ``streamed``:
    (checkpoint reader, device, scratch folder) when ``model`` is a skeleton whose layers are read one at a time."""
    from .calibrate import calibration_windows
    from .recipe import Rule

    t0 = time.perf_counter()
    q, auto, c, p = recipe.quantization, recipe.quantization.auto, recipe.calibration, problem
    windows = calibration_windows(tokenizer, calib_text, min(auto.windows, c.nsamples), c.seqlen, c.seed)
    log(f"auto: measuring sensitivity on {len(windows)} windows of {c.seqlen} tokens, {len(p.free)} layers, "
        f"{len(p.candidates)} candidate formats (method {q.method})")
    options = {**c.gptq.model_dump(), **c.scale_search.model_dump()}
    if streamed is None:
        fisher, stats = measure(model, p.free, windows, c.seed, progress)
        scores, ratios = score(model, p.free, p.menus, fisher, stats, q.method, options, model.dtype, progress)
    else:
        reader, device, scratch = streamed
        scores, ratios = sensitivity_streamed(model, p.free, p.menus, windows, c.seed, q.method, options, model.dtype, reader,
                                              device, scratch, progress)
        stats = None
    values = [[scores[e.name][k.label()] for k in p.menus[e.name]] for e in p.free]
    span = sum(max(c) for c in p.costs)
    _, f_unit, best = allocate(p.costs, values, p.budget, span=span)  # every size: the frontier
    checks = measured = None
    if auto.kl is not None:
        kl_of = (KLMeter(model, p.free, windows, stats, q.method, options, progress) if streamed is None
                 else StreamedKLMeter(model, p.free, windows, q.method, options, *streamed, progress))
        try:
            choice, checks, measured = meet_kl(p, values, best, f_unit, kl_of, auto.kl, log)
        finally:
            kl_of.close()
    else:
        choice, unit, _ = allocate(p.costs, values, p.budget)  # a table up to the budget: the finest units
    del stats
    picked = {e.name: p.menus[e.name][k] for e, k in zip(p.free, choice)}
    rules = [*q.rules, *(Rule.model_validate(r) for r in _rules(picked))]
    resolved = recipe.model_copy(update={"quantization": q.model_copy(update={"auto": None, "rules": rules})})
    total = sum(x[k] for x, k in zip(p.costs, choice))
    report = {
        "target": p.target, "method": q.method, "windows": len(windows), "seqlen": c.seqlen,
        "candidates": [k.label() for k in p.candidates], "loadable_by": auto.loadable_by,
        "predicted_kl": sum(v[k] for v, k in zip(values, choice)),
        "budget_bytes": p.budget, "chosen_bytes": total, "unit_bytes": f_unit if checks is not None else unit,
        "chosen_x": round(_x(p, p.fixed + total), 4),
        "chosen_file_bytes": p.file_bytes(total),  # every file the export writes (embeddings, head, scales, headers)
        "layers": {e.name: {"chosen": picked[e.name].label(), "method_error_ratio": ratios.get(e.name),
                            "candidates": {k.label(): {"bytes": b, "predicted_kl": scores[e.name][k.label()]}
                                           for k, b in zip(p.menus[e.name], cx)}}
                   for e, cx in zip(p.free, p.costs)},
        "frontier": _frontier(p, best, f_unit),
        "measured_kl": measured,  # with a kl target: of the chosen mix on the sensitivity windows
        "kl_checks": checks,
        "uniform": _uniform(p, scores),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    also = f", measured {measured:.4f}" if measured is not None else ""
    log(f"auto: {p.target}: predicted KL {report['predicted_kl']:.4f}{also} nats/token, {_counts(picked)}, "
        f"{p.file_bytes(total) / 1e6:.1f} MB of files in {report['seconds']:.0f}s")
    return resolved, report


def _rules(picked: dict) -> list[dict]:
    """One rule per format; a decoder layer's sublayer (``model.layers.*.mlp.down_proj``) as one glob when every
    layer of the stack got the same format for it."""
    import re

    by_suffix: dict[str, dict[str, object]] = {}
    for name, k in picked.items():
        m = re.fullmatch(r"(.*\.)(\d+)(\..*)", name)
        key = f"{m.group(1)}*{m.group(3)}" if m else name
        by_suffix.setdefault(key, {})[name] = k
    patterns: dict[str, tuple[object, list[str]]] = {}
    for key, names in by_suffix.items():
        kinds = {k.model_dump_json() for k in names.values()}
        if len(kinds) == 1 and "*" in key:
            k = next(iter(names.values()))
            patterns.setdefault(k.model_dump_json(), (k, []))[1].append(key)
        else:
            for n, k in names.items():
                patterns.setdefault(k.model_dump_json(), (k, []))[1].append(n)
    out = []
    for k, pats in patterns.values():
        # a glob must not reach layers it was not meant for (e.g. a name-listed neighbour with another format)
        assert all(any(matches(p, n) for p in pats) == (picked[n] == k) for n in picked)
        out.append({"match": pats, **k.model_dump()})
    return out


def _x(p: Problem, nbytes: int) -> float:
    return 8 * nbytes / p.weights if p.per_weight else nbytes


def _frontier(p: Problem, best: torch.Tensor, unit: int) -> list[list[float]]:
    """(bits per weight or bytes, least predicted KL, bytes of all the files) along the table, where it improves."""
    pts, last = [], float("inf")
    for cap in range(0, len(best), max(1, len(best) // 400)):
        v = best[cap].item()
        if math.isfinite(v) and v < last * 0.999:
            pts.append([round(_x(p, p.fixed + cap * unit), 4), v, p.file_bytes(cap * unit)])
            last = v
    return pts


def _uniform(p: Problem, scores: dict) -> dict:
    """Each candidate given to every layer it fits: (x, predicted KL) reference points."""
    out = {}
    for k in p.candidates:
        if all(k in p.menus[e.name] for e in p.free):
            cost = sum(cx[p.menus[e.name].index(k)] for e, cx in zip(p.free, p.costs))
            out[k.label()] = [round(_x(p, p.fixed + cost), 4), sum(scores[e.name][k.label()] for e in p.free),
                              p.file_bytes(cost)]
    return out


def _counts(picked: dict) -> str:
    counts: dict[str, int] = {}
    for k in picked.values():
        counts[k.label()] = counts.get(k.label(), 0) + 1
    return ", ".join(f"{lab} ×{c}" for lab, c in sorted(counts.items(), key=lambda x: -x[1]))


def plot(report: dict, path, title: str) -> None:
    """The predicted quality-vs-size frontier the search saw, the uniform formats, and the chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_weight = not report["target"].startswith("max_size")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    fr = [p for p in report["frontier"] if p[1] > 0]
    if fr:
        ax.plot([p[0] for p in fr], [p[1] for p in fr], "-", color="C0", label="best mix at each size (predicted)")
    for i, (lab, (x, y, files)) in enumerate(report["uniform"].items()):
        if y > 0:
            ax.scatter(x, y, marker="s", s=28, color=plt.get_cmap("tab20")((i + 2) % 20),
                       label=f"uniform {lab}: {files / 1e6:.1f} MB")
    ax.scatter(report["chosen_x"], max(report["predicted_kl"], 1e-12), marker="*", s=220, color="red", zorder=5,
               label=f"chosen: {report['chosen_file_bytes'] / 1e6:.1f} MB of files")
    checks = [c for c in report.get("kl_checks") or [] if c["measured_kl"] > 0]
    if checks:  # a kl target: the mixes measured on the way, and the target
        ax.scatter([c["x"] for c in checks], [c["measured_kl"] for c in checks], marker="o", s=36, facecolors="none",
                   edgecolors="red", zorder=5, label="mixes measured")
        ax.axhline(float(report["target"].split()[1]), color="red", lw=0.8, ls="--", label=report["target"])
    ax.set_yscale("log")
    if per_weight:  # the region where the choices are: past INT8, the curve only creeps down to zero
        xs = [x for k, (x, y, _) in report["uniform"].items() if y > 0 and k not in DTYPE_NAMES.values()] + [report["chosen_x"]]
        lo, hi = min(xs) - 0.2, max(max(xs) + 0.6, 8.6)
        ys = [y for x, y, _ in fr if lo <= x <= hi] + [y for x, y, _ in report["uniform"].values() if y > 0 and lo <= x <= hi]
        ys += [c["measured_kl"] for c in checks if lo <= c["x"] <= hi]
        ax.set_xlim(lo, hi)
        if ys:
            ax.set_ylim(min(ys) * 0.7, max(ys) * 1.5)
    ax.set_xlabel("bits per weight (Linear layers but ignored ones)" if per_weight else "checkpoint bytes")
    ax.set_ylabel("KL divergence (nats/token): predicted; circles measured" if checks else "predicted KL divergence (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["allocate", "prepare", "resolve", "measure", "score", "meet_kl", "KLMeter", "StreamedKLMeter", "default_candidates",
           "plot"]
