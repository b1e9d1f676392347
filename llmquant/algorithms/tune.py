"""Quantization-aware tuning of one decoder layer on bitsandbytes' own grids.

After a starting choice (round to nearest for ``tune``, GPTQ for ``gptq+tune``), every
quantized Linear of the decoder layer gets two kinds of parameters, tuned together so
that the layer's outputs match the float layer's outputs on the calibration inputs
(signed gradient descent with a linearly decaying step, as SignRound / AutoRound do):

* a rounding offset per weight, in *code-index space*: the sorted codebook (NF4/FP4)
  or the int8 integers are laid on a line, a weight's position on it is interpolated
  linearly between neighbouring codes, and ``round(position + offset)`` picks its code.
  With offset 0 this is exactly the nearest code; offsets stay within ±0.5, so each
  weight rounds to one of the two codes around its position;
* a factor per stored scale (4-bit block scale, int8 row scale), in ``[0.5, 1.5]``, with a
  tenth of the offsets' step size.

The forward pass computes with exactly the values bitsandbytes will dequantize: the
code's codebook value times the scale *as stored* (after double quantization when that
is on), with straight-through gradients for the rounding of codes and of scales. An
INT8 layer's inputs are rounded as LLM.int8's product rounds them (per token to int8,
columns with an outlier kept in float16; the tokens of a step's windows together), with
straight-through gradients too. What
is emitted (:meth:`TunedLinear.result`) are those codes and scales, so the checkpoint
holds exactly the weights the tuning saw.

An optional end-to-end stage (:func:`tune_model`) then tunes the stored scales of every quantized layer at once,
codes fixed, toward the float model's next-token distribution (its top-k log-probabilities, kept before
quantization), with the same stored-scale forward (:class:`ScaledLinear`).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..quantized import INT8_INV_127, FourBitWeight, Int8Weight, QuantizedWeight, codebook
from ..schemes import FourBit, Int8
from ..walk import call_layer, to
from . import register
from .gptq import GPTQ
from .rtn import RoundToNearest
from .scale_search import stored_scales

SCALE_RANGE = (0.5, 1.5)
# The default step size of the offsets times the number of steps (they then move at most 1/8 of a code in
# all), and the scale factors' step size relative to the offsets'. Chosen on held-out text of SmolLM2's
# layers 3, 15 and 27 (GPTQ start, NF4 block 64): larger steps fit the calibration windows better and
# held-out text worse; equal steps for scales were worse than a tenth.
DEFAULT_LR_TIMES_STEPS = 0.25
SCALE_LR_RATIO = 0.1


def _ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` forward (bit for bit: ``x - x`` is exactly 0), ``surrogate``'s gradient backward."""
    return value.detach() + (surrogate - surrogate.detach())


class _Scales(nn.Module):
    """A quantized weight's stored scales (``s0``: the starting choice's, ``[out, blocks]``) times tunable factors ``f``."""

    def _init_scales(self, scheme, s0: torch.Tensor, start_nested) -> None:
        self.scheme = scheme
        self.fourbit = isinstance(scheme, FourBit)
        self.register_buffer("s0", s0)
        self.register_buffer("start_scales", s0.reshape(-1).clone())
        self.start_nested = start_nested
        self.f = nn.Parameter(torch.ones_like(s0))

    def _stored(self) -> tuple[torch.Tensor, object]:
        """The scales as bitsandbytes will store them (flat) and their double quantization, for the current factors.

        Untouched factors give back the starting choice's scales exactly (double quantizing already
        double-quantized scales again would move them by a rounding step)."""
        if not bool((self.f != 1).any()):
            return self.start_scales, self.start_nested
        s = (self.s0 * self.f).detach()
        if self.fourbit:
            return stored_scales(s, self.scheme)
        return s.reshape(-1), None

    def _scales_used(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales as bitsandbytes will store them, and the same values with the gradient of the tuned
        (continuous) scales ``s0 * f``, straight through; both ``[out, blocks]``."""
        s = self.s0 * self.f
        stored = self._stored()[0].view_as(s)
        return stored, _ste(stored, s)


class TunedLinear(_Scales):
    """A Linear layer whose weight is a bitsandbytes-quantized weight with tunable codes and scales.

    ``weight``: the float weight ``[out, in]``; ``start``: the starting choice in ``scheme``. The values
    rounded are ``start.latent`` when the start carries it (GPTQ's weights as compensated when each
    column was rounded), else the float weight: a weight then starts at its position relative to the
    codes around it, and a small offset flips it to the other neighbour when that helps the output.
    """

    def __init__(self, weight: torch.Tensor, start: QuantizedWeight, scheme, bias: torch.Tensor | None):
        super().__init__()
        w = getattr(start, "latent", weight).detach().float().to(weight.device)
        self.register_buffer("w", w)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        out_f, in_f = w.shape
        if isinstance(scheme, FourBit):
            assert isinstance(start, FourBitWeight)
            values, order = torch.sort(codebook(scheme.format, w.device))
            self.register_buffer("values", values)
            self.register_buffer("order", order.to(torch.uint8))  # sorted position -> code
            s0, nested = start.scales.view(out_f, -1).to(w.device).clone(), start.nested
            position = torch.argsort(order).to(w.device)[start.codes.long()].float()  # code -> sorted position
            self.top = float(len(values) - 1)
        else:
            assert isinstance(start, Int8Weight)
            s0, nested = start.scb.to(w.device).float().view(-1, 1).clone(), None
            position = start.codes.float() + 127.0
            self.top = 254.0
        self._init_scales(scheme, s0, nested)
        # Offsets start at 0 (a weight at its own position, rounding to its nearest code), except where that
        # is not the starting code (ties, clipped values): there the offset that reproduces it.
        here = self._position(self._blocks(w), self.s0).reshape(out_f, in_f)
        start_offset = torch.where(torch.round(here.clamp(0.0, self.top)) == position, torch.zeros_like(here), position - here)
        self.register_buffer("v_low", start_offset - 0.5)
        self.register_buffer("v_high", start_offset + 0.5)
        self.v = nn.Parameter(start_offset.clone())
        self.fixed: torch.Tensor | None = None  # the weight, computed once, while evaluating without gradients

    # ---- the grid -------------------------------------------------------------------------

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``[out, in]`` -> ``[out, blocks, group]`` (int8: one block per row)."""
        g = self.scheme.group_size if self.fourbit else x.shape[1]
        return x.reshape(x.shape[0], -1, g)

    def _position(self, blocks: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Continuous code-index position of ``blocks`` for scales ``s`` ([out, blocks])."""
        safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
        x = blocks / safe
        if not self.fourbit:
            return x * 127.0 + 127.0
        vals = self.values
        k = (torch.searchsorted(vals, x.detach().contiguous(), right=True) - 1).clamp(0, len(vals) - 2)
        lo, hi = vals[k], vals[k + 1]
        return k + (x - lo) / (hi - lo)

    def _codes_and_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sorted-position codes, stored scales, and the dequantized weight (with straight-through gradients)."""
        stored, s_used = self._scales_used()
        blocks = self._blocks(self.w)
        u = (self._position(blocks, s_used) + self._blocks(self.v)).clamp(0.0, self.top)
        idx = torch.round(u)
        if self.fourbit:
            k = u.detach().floor().clamp(0, self.top - 1).long()
            lo, hi = self.values[k], self.values[k + 1]
            continuous = lo + (u - k) * (hi - lo)
            exact = self.values[idx.long()]
            q = _ste(exact, continuous)
        else:
            q = _ste(idx, u) - 127.0
        w = q * s_used.unsqueeze(-1) if self.fourbit else q * s_used.unsqueeze(-1) * INT8_INV_127
        return idx.detach(), stored, w.reshape(self.w.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fixed if self.fixed is not None else self._codes_and_weight()[2]
        if not self.fourbit:
            x = _int8_inputs(x, self.scheme.threshold)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # ---- tuning steps and the result ----------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One signed-gradient step, kept inside the allowed ranges."""
        for p, p_lr in ((self.v, lr), (self.f, lr * SCALE_LR_RATIO)):
            if p.grad is not None:
                p.sub_(p_lr * torch.sign(p.grad))
                p.grad = None
        torch.maximum(torch.minimum(self.v, self.v_high, out=self.v), self.v_low, out=self.v)
        self.f.clamp_(*SCALE_RANGE)

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.v.detach().clone(), self.f.detach().clone()

    @torch.no_grad()
    def load(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.v.copy_(state[0])
        self.f.copy_(state[1])

    @torch.no_grad()
    def weight_value(self) -> torch.Tensor:
        """The float32 weight the forward computes with (what bitsandbytes dequantizes the result to)."""
        return self._codes_and_weight()[2]

    @torch.no_grad()
    def result(self, dtype: torch.dtype) -> QuantizedWeight:
        """The tuned codes and scales in bitsandbytes' terms."""
        idx, stored, _ = self._codes_and_weight()
        out_f, in_f = self.w.shape
        if self.fourbit:
            codes = self.order[idx.long()].reshape(out_f, in_f)
            eff, nested = self._stored()
            assert torch.equal(eff.view_as(stored), stored)
            return FourBitWeight(codes, eff, self.scheme.format, self.scheme.group_size, dtype, nested)
        codes = (idx.reshape(out_f, in_f) - 127.0).to(torch.int8)
        assert isinstance(self.scheme, Int8)
        return Int8Weight(codes=codes, scb=stored.reshape(-1).contiguous(), threshold=self.scheme.threshold)


class FrozenLinear(nn.Module):
    """A quantized layer of the same decoder layer that is not tuned: its dequantized weight, fixed."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("w", qw.dequantize().float())
        self.register_buffer("b", None if bias is None else bias.detach().float())
        self.threshold = qw.threshold if isinstance(qw, Int8Weight) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            x = _int8_inputs(x, self.threshold)
        return F.linear(x, self.w.to(x.dtype), None if self.b is None else self.b.to(x.dtype))


def _int8_inputs(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """An INT8 layer's inputs as LLM.int8 multiplies them (rounded to int8 per token, outlier columns in float16),
    with the float inputs' gradient: the tuning sees the activations' rounding error as the export will have it."""
    from .awq import llm_int8_activations

    return _ste(llm_int8_activations(x.detach(), threshold).to(x.dtype), x)


def tune_layer(layer: nn.Module, tuned: dict[str, tuple[torch.Tensor, QuantizedWeight, object]],
               frozen: dict[str, QuantizedWeight], inputs: list[torch.Tensor], targets: list[torch.Tensor],
               call: tuple[tuple, dict], device: torch.device, options: dict, dtype: torch.dtype,
               on_step=None, groups: list[list[str]] | None = None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Tune the Linear layers ``tuned`` (name relative to ``layer`` -> float weight, starting choice, scheme)
    of one decoder layer so its outputs on ``inputs`` match ``targets`` (the float layer's outputs). ``call``: the
    layer's own call arguments (:meth:`llmquant.walk.LayerCalls.of`; the windows are of one length, so one window's
    serve a batch of them).

    ``frozen``: the layer's other quantized Linear layers (they compute with their chosen weights). The
    layer's modules are swapped for the tuning and put back as they were; returns the tuned weights and a
    report (loss before and after, mean squared error per output value over all windows). The result
    is the better of the start and the end of the tuning on that loss, so it is never worse than the start.
    ``options``: steps, lr (default 0.25 / steps), batch (windows per step), seed. ``dtype``: the compute
    dtype of the results (the layer computes in float32 while tuning; its tensors get their dtypes back).

    ``groups`` (``tune.scope: group``): the layers tuned together, one group after the other, each for all the steps,
    in this order; the others compute meanwhile with their weights as chosen so far (their starting choice before
    their turn, their tuned weights after it), so only one group's tuning state exists at a time. ``None``: all of
    ``tuned`` at once. Layers of ``tuned`` in no group come last, one group each.
    """

    steps, batch, seed = options["steps"], options["batch"], options["seed"]
    lr = options.get("lr") or DEFAULT_LR_TIMES_STEPS / steps
    t0 = time.perf_counter()
    phases = [list(tuned)] if groups is None else [[n for n in g if n in tuned] for g in groups]
    phases = [p for p in phases if p] + [[n] for n in tuned if not any(n in p for p in phases)]
    total = steps * len(phases)
    originals = {n: layer.get_submodule(n) for n in [*tuned, *frozen]}
    plain, grads, dtypes = [], [], {}
    results: dict[str, QuantizedWeight] = {}
    reports = []
    try:
        for n, qw in frozen.items():
            layer.set_submodule(n, FrozenLinear(qw, _bias(originals[n])).to(device))
        for n, (_, start, _) in tuned.items():  # each takes its turn below; until then it computes with its start
            layer.set_submodule(n, FrozenLinear(start, _bias(originals[n])).to(device))
        # The rest of the layer (norms, attention) computes in float32 while tuning; its own dtype comes back after.
        plain = [p for p in layer.parameters() if p.is_floating_point()]
        grads = [p.requires_grad for p in plain]
        for p in plain:
            p.requires_grad_(False)
        dtypes = {n: t.dtype for n, t in _tensors(layer) if t.is_floating_point()}
        layer.float()
        call32 = to(call, device, torch.float32)

        def loss_on(windows) -> torch.Tensor:
            x = torch.cat([inputs[i] for i in windows]).to(device).float()
            t = torch.cat([targets[i] for i in windows]).to(device).float()
            return F.mse_loss(call_layer(layer, x, call32, device, grad=torch.is_grad_enabled()), t)

        for k, phase in enumerate(phases):
            modules: dict[str, TunedLinear] = {}
            for n in phase:
                w, start, scheme = tuned[n]
                modules[n] = TunedLinear(w.to(device), start, scheme, _bias(originals[n]))
                layer.set_submodule(n, modules[n])
            before = _mean_loss(modules.values(), loss_on, len(inputs))
            start_state = {n: m.state() for n, m in modules.items()}
            with torch.enable_grad():
                for t, windows in enumerate(_window_batches(len(inputs), batch, steps, seed)):
                    loss = loss_on(windows)
                    loss.backward()
                    step_lr = lr * (1.0 - t / steps)
                    for m in modules.values():
                        m.step(step_lr)
                    if on_step is not None:
                        on_step(k * steps + t + 1, total, loss.item())
            after = _mean_loss(modules.values(), loss_on, len(inputs))
            if after > before:  # keep the start: tuning must never make the layer worse on its own calibration loss
                for n, m in modules.items():
                    m.load(start_state[n])
            for n, m in modules.items():  # the group's result computes in its place; its tuning state goes
                results[n] = m.result(dtype)
                layer.set_submodule(n, FrozenLinear(results[n], _bias(originals[n])).to(device))
            del modules, start_state, m  # (the loops' last module too)
            reports.append({"layers": phase, "loss_before": before, "loss_after": min(before, after), "kept_start": after > before})
        report = {"loss_before": reports[0]["loss_before"], "loss_after": reports[-1]["loss_after"],
                  "kept_start": all(r["kept_start"] for r in reports), "steps": steps,
                  "seconds": round(time.perf_counter() - t0, 2)}
        if groups is not None:
            report["groups"] = reports
    finally:
        for n, t in _tensors(layer):  # each tensor back to its dtype, while the quantized modules are still out
            if n in dtypes and t.dtype != dtypes[n]:
                t.data = t.data.to(dtypes[n])
        for n, m in originals.items():
            layer.set_submodule(n, m)
        for p, g in zip(plain, grads):
            p.requires_grad_(g)
    return results, report


def _window_batches(n: int, batch: int, steps: int, seed: int):
    """``steps`` lists of ``batch`` window indices: shuffled passes over all ``n`` windows, in an order fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += torch.randperm(n, generator=gen).tolist()
        yield order[:batch]
        order = order[batch:]


@torch.no_grad()
def _mean_loss(modules, loss_on, n: int) -> float:
    """``loss_on([i])`` averaged over all ``n`` windows, each module's weight computed once for all of them."""
    for m in modules:
        m.fixed = m.weight_value()
    try:
        return sum(loss_on([i]).item() for i in range(n)) / n
    finally:
        for m in modules:
            m.fixed = None


def _tensors(layer: nn.Module):
    return [*layer.named_parameters(), *layer.named_buffers()]


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach()


# ---- end to end: every quantized layer's stored scales at once, toward the float model's next-token distribution ----

# The float model's most likely next tokens kept per position (the rest of its probability is one more bin).
TEACHER_TOP_K = 64


class ScaledLinear(_Scales):
    """A chosen quantized weight with its codes fixed and a tunable factor per stored scale (the end-to-end stage).

    The forward computes with exactly what bitsandbytes will dequantize (the scales as stored, after double
    quantization when that is on; straight-through gradients to the factors)."""

    def __init__(self, qw: QuantizedWeight, scheme, bias: torch.Tensor | None, device: torch.device):
        super().__init__()
        self.register_buffer("codes", qw.codes.to(device))
        if isinstance(qw, FourBitWeight):
            self.register_buffer("values", codebook(qw.quant_type, device))
            s0, nested = qw.scales.view(qw.shape[0], -1).to(device).clone(), qw.nested
        else:
            assert isinstance(qw, Int8Weight)
            s0, nested = qw.scb.to(device).float().view(-1, 1).clone(), None
        self._init_scales(scheme, s0, nested)
        self.start = qw
        self.register_buffer("b", None if bias is None else bias.detach().to(device))
        self.fixed: torch.Tensor | None = None  # the weight, computed once, while evaluating without gradients

    def weight_value(self) -> torch.Tensor:
        """The float32 weight for the current factors (with their gradient)."""
        _, s_used = self._scales_used()
        out_f, in_f = self.codes.shape
        if self.fourbit:
            q = self.values[self.codes.long()].view(out_f, -1, self.scheme.group_size)
            return (q * s_used.unsqueeze(-1)).view(out_f, in_f)
        return self.codes.float() * s_used * INT8_INV_127

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fixed if self.fixed is not None else self.weight_value()
        if not self.fourbit:
            x = _int8_inputs(x, self.scheme.threshold)
        return F.linear(x, w.to(x.dtype), None if self.b is None else self.b.to(x.dtype))

    @torch.no_grad()
    def result(self) -> QuantizedWeight:
        """The same codes with the tuned scales, in bitsandbytes' terms."""
        stored, nested = self._stored()
        if self.fourbit:
            q = self.start
            return FourBitWeight(q.codes, stored.contiguous(), q.quant_type, q.group_size, q.dtype, nested)
        return Int8Weight(codes=self.start.codes, scb=stored.reshape(-1).contiguous(), threshold=self.start.threshold)


@torch.no_grad()
def teacher_distribution(model: nn.Module, windows: torch.Tensor, device: torch.device, k: int,
                         progress: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The float model's ``k`` most likely next tokens at every position of each window and their log-probabilities
    (``[1, seqlen, k]`` each, on the CPU): what the end-to-end stage brings the quantized model to."""
    out = []
    for w in tqdm(windows, desc="float model's predictions", unit="window", leave=False, disable=not progress):
        logits = model(w.unsqueeze(0).to(device), use_cache=False).logits
        v, i = F.log_softmax(logits.float(), -1).topk(k, -1)
        out.append((v.cpu(), i.to(torch.int32).cpu()))
    return out


def top_k_kl(logits: torch.Tensor, top_logp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """KL divergence (nats per position, mean) of ``logits`` from the teacher, both seen on the teacher's top-k tokens
    plus one bin for all other tokens (a lower bound of the full KL, equal to it when the top k hold all the mass)."""
    logp = F.log_softmax(logits.float(), -1)
    s = logp.gather(-1, top_ids.long())
    p = top_logp.exp()
    rest_t = (1 - p.sum(-1)).clamp_min(1e-12)
    rest_s = (1 - s.exp().sum(-1)).clamp_min(1e-12)
    return ((p * (top_logp - s)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())).mean()


def tune_model(model: nn.Module, chosen: dict[str, tuple[QuantizedWeight, object]], windows: torch.Tensor,
               teacher: list[tuple[torch.Tensor, torch.Tensor]], options: dict, on_step=None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Tune the stored scales of the layers ``chosen`` (name -> chosen weight, scheme), codes fixed, all together, so
    the model's next-token distribution on ``windows`` matches the float model's (``teacher``, from
    :func:`teacher_distribution`): Adam on a factor per scale (within ``SCALE_RANGE``), one step per ``batch`` windows,
    the step size decaying to 0 on a cosine. As the layer stage, the result is the better of start and end on the KL
    over all windows. The modules are swapped for the tuning and put back; returns the tuned weights and a report."""
    steps, batch, seed, lr = options["steps"], options["batch"], options["seed"], options["lr"]
    t0 = time.perf_counter()
    originals = {n: model.get_submodule(n) for n in chosen}
    trainable = [p for p in model.parameters() if p.requires_grad]
    modules: dict[str, ScaledLinear] = {}
    device = model.get_input_embeddings().weight.device
    try:
        for p in trainable:
            p.requires_grad_(False)
        for n, (qw, scheme) in chosen.items():
            old = originals[n]
            modules[n] = ScaledLinear(qw, scheme, _bias(old), next(old.parameters()).device)
            if hasattr(old, "_hf_hook"):  # accelerate's device-placement hook (device_map="auto")
                from accelerate.hooks import add_hook_to_module

                add_hook_to_module(modules[n], old._hf_hook)
            model.set_submodule(n, modules[n])

        def loss_on(idx: list[int]) -> torch.Tensor:
            logits = model(windows[idx].to(device), use_cache=False).logits
            return top_k_kl(logits, *(torch.cat([teacher[i][j] for i in idx]).to(logits.device) for j in (0, 1)))

        def full_loss() -> float:
            return _mean_loss(modules.values(), loss_on, len(windows))

        before = full_loss()
        params = [m.f for m in modules.values()]
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for t, idx in enumerate(_window_batches(len(windows), batch, steps, seed)):
                loss = loss_on(idx)
                loss.backward()
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for f in params:
                        f.clamp_(*SCALE_RANGE)
                if on_step is not None:
                    on_step(t + 1, steps, loss.item())
        del opt
        after = full_loss()
        if after > before:  # keep the start
            with torch.no_grad():
                for f in params:
                    f.fill_(1.0)
        results = {n: m.result() for n, m in modules.items()}
        report = {"kl_before": before, "kl_after": min(before, after), "kept_start": after > before, "steps": steps,
                  "top_k": teacher[0][0].shape[-1] if teacher else 0, "seconds": round(time.perf_counter() - t0, 2)}
    finally:
        for n, m in originals.items():
            model.set_submodule(n, m)
        for p in trainable:
            p.requires_grad_(True)
    return results, report


# ---- the methods a recipe names: the starting choice per Linear; the calibrator then tunes each decoder layer ----


@register("tune")
class Tune(RoundToNearest):
    """Tuning from round to nearest (bitsandbytes' own absmax scales and nearest codes)."""

    calibrated = True
    tunes = True


@register("gptq+tune")
class GPTQTune(GPTQ):
    """Tuning from GPTQ's codes and scales (and the compensated weights it rounded)."""

    tunes = True
    keep_latent = True
