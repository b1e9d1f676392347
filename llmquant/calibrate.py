"""Calibrated quantization, one decoder layer at a time.

The calibration windows run through the embeddings once; then, for each decoder
layer in turn, its inputs are the outputs of the layers before it *as quantized*
(so every layer calibrates on what the quantized model will really feed it):

1. run the float layer, measuring each Linear's input statistics (``H = XᵀX``, mean
   ``|x|``, a token sample) and keeping the float outputs;
2. activation-aware scaling (methods ``awq``, ``awq+gptq``): search and fold the scales;
3. quantize the layer's Linear groups in the order the layer calls them (with
   ``true_sequential``, each group's inputs re-measured after the groups before it
   are quantized), and swap in the bitsandbytes modules;
4. run the quantized layer: its outputs, compared with the float outputs, give the
   layer's reconstruction error, and feed the next layer.

Only the current layer needs to be on the compute device; the rest of the model stays
where it was loaded (CPU), so a model larger than the GPU can be calibrated.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .algorithms import ALGORITHMS
from .algorithms.gptq import FactoringError
from .algorithms.awq import apply_scales, reader_scales, scaling_groups, search_scales
from .algorithms.scale_search import LayerStats
from .errors import UserError
from .plan import Plan, PlanEntry
from .quantize import install, layer_weight, quantize_layer
from .quantized import QuantizedWeight
from .schemes import Int8, Keep
from .memory import give_file_pages_back, give_memory_back
from .walk import LayerCalls, Stop, call_layer, capture, decoder_layers


def calibration_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (fixed seed), as the GPTQ paper samples them."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) <= seqlen:
        raise UserError(f"the calibration text has {len(ids)} tokens, not enough for windows of calibration.seqlen {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


GENERATE_BATCH = 16  # windows sampled together (one KV cache of 16 x seqlen tokens)


def generated_windows(model: nn.Module, tokenizer, n: int, seqlen: int, seed: int, progress: bool = True) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens sampled from ``model`` itself (as LLM-QAT makes its data-free training data):
    each starts from a random ordinary token of the vocabulary (a word piece of letters), then every next token is drawn
    from the model's own next-token distribution (temperature 1, no top-k or top-p, end of text suppressed). What the
    model knows beyond the calibration text (other domains, text it memorised) is then seen by the calibration too.
    Deterministic for a given ``seed`` on a given device; the global random state is left as it was."""
    from transformers import GenerationConfig

    vocab = model.get_output_embeddings().out_features
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(tokenizer)))))
    ordinary = [i for i, p in enumerate(pieces) if i not in special and p
                and tokenizer.convert_tokens_to_string([p]).strip().isalpha()]
    if not ordinary:
        raise UserError("calibration.generated: the tokenizer has no ordinary word tokens to start windows from; "
                        "set calibration.generated: 0")
    gen = torch.Generator().manual_seed(seed)
    first = torch.tensor(ordinary)[torch.randint(len(ordinary), (n,), generator=gen)]
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seqlen - 1,
                              min_new_tokens=seqlen - 1, eos_token_id=eos, pad_token_id=pad if pad is not None else 0)
    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=n, desc="generating calibration windows", unit="window", disable=not progress)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for b in range(0, n, GENERATE_BATCH):
            x = first[b : b + GENERATE_BATCH, None].to(device)
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
            if y.shape[1] != seqlen:  # (min_new_tokens keeps every row going to the end)
                raise RuntimeError(f"generation stopped at {y.shape[1]} of {seqlen} tokens")
            out.append(y.cpu())
            bar.update(len(x))
    bar.close()
    return torch.cat(out)


class DiskWindows:
    """The calibration windows' activations at one layer, one file per window in ``folder`` (``calibration.activations:
    disk``): a list whose items are read from disk when taken, so memory holds one window at a time. Creating one
    starts a fresh folder (a stopped run's leftovers go); the files stay until :meth:`drop`, also when an item is set
    to None, so that a resumed run can still read the generation its saved state points to."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.n = 0

    def _path(self, i: int) -> Path:
        return self.folder / f"{i:06d}.pt"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return torch.load(self._path(i), weights_only=True)

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def __setitem__(self, i: int, x: None) -> None:
        """``windows[i] = None`` drops a window from a list in memory; here its file stays until :meth:`drop`. A
        generation on disk is only ever written by :meth:`append`."""
        if x is not None:
            raise TypeError("a generation of activations on disk is written by append, not item by item")

    def append(self, x: torch.Tensor) -> None:
        x = x.detach().cpu()
        if x.untyped_storage().nbytes() != x.nbytes:  # a view: only its own values
            x = x.clone()
        tmp = self.folder / f"{self.n:06d}.tmp.pt"
        torch.save(x, tmp)
        os.replace(tmp, self._path(self.n))
        self.n += 1

    def copy(self, folder: Path) -> "DiskWindows":
        """The same windows under another folder (hard links where the filesystem allows: no second copy)."""
        other = DiskWindows(folder)
        for i in range(self.n):
            try:
                os.link(self._path(i), other._path(i))
            except OSError:
                shutil.copyfile(self._path(i), other._path(i))
        other.n = self.n
        return other

    def drop(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.n = 0


def drop_windows(windows) -> None:
    """Give back a generation of activations that is no longer needed (on disk: its files)."""
    if isinstance(windows, DiskWindows):
        windows.drop()


@dataclass
class _Inputs:
    """Statistics of one tensor fed to one or more Linear layers of the current decoder layer."""

    h: torch.Tensor | None = None  # H = XᵀX / tokens, float32, once finished
    parts: list[torch.Tensor] = field(default_factory=list)  # the float64 sums of XᵀX while measuring (see add)
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    tokens: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)
    sampled: int = 0

    def add(self, x: torch.Tensor, keep_tokens: int) -> None:
        """Accumulate H (and, when ``keep_tokens`` > 0, mean |x| and a token sample for AWQ).

        Each call's (one window's) sums are taken in float32 and added up in float64: the total then rounds to
        the same float32 numbers whatever the order the windows are added in, so processes sharing the windows
        out (:mod:`llmquant.distributed`) choose the very weights one process chooses. XᵀX is symmetric, so only
        its upper triangle is summed and kept, as column blocks (block ``k``: the rows above and in its own
        columns): about half the memory and half the products of the whole matrix (the sums of a 70B model's
        ``down_proj`` inputs are 6.6 GB whole in float64).
        """
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[1]
        if not self.parts:
            self.parts = [torch.zeros(j + s, s, device=x.device, dtype=torch.float64) for j, s in _triangle_blocks(n)]
            self.abs_sum = torch.zeros(n, device=x.device, dtype=torch.float64)
            self.abs_max = torch.zeros(n, device=x.device)
        for part, (j, s) in zip(self.parts, _triangle_blocks(n)):
            part.add_(x[:, : j + s].t() @ x[:, j : j + s])
        self.tokens += len(x)
        if keep_tokens:
            ax = x.abs()
            self.abs_sum.add_(ax.sum(0))
            torch.maximum(self.abs_max, ax.amax(0), out=self.abs_max)
        if self.sampled < keep_tokens:
            take = x[: keep_tokens - self.sampled]
            self.sample.append(take.clone())
            self.sampled += len(take)

    def finish(self) -> None:
        """Once every window is in (and summed over the processes): H = XᵀX / tokens in float32, the upper
        triangle's sums mirrored, each block of sums dropped, and given back, as soon as it is in (so the float64 sums
        and the float32 matrix are never both whole)."""
        if not self.parts:
            return
        n = self.parts[-1].shape[0]
        h = torch.empty(n, n, device=self.parts[0].device)
        for j, s in _triangle_blocks(n):
            part = self.parts.pop(0).float().div_(max(self.tokens, 1))
            h[:j, j : j + s] = part[:j]
            h[j : j + s, :j] = part[:j].t()
            h[j : j + s, j : j + s] = part[j:].triu() + part[j:].triu(1).t()
            del part
            give_memory_back()  # the block's sums (heap-sized) as they go: the matrix's pages come as it is filled
        self.h = h

    @property
    def hessian(self) -> torch.Tensor:
        self.finish()
        return self.h

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()


class SequentialCalibrator:
    def __init__(self, model: nn.Module, plan: Plan, windows: torch.Tensor, spec, device: torch.device,
                 progress: bool = True, log=print):
        self.model, self.plan, self.windows, self.spec = model, plan, windows, spec
        self.device, self.progress, self.log = device, progress, log
        self.entries = {e.name: e for e in plan.entries if e.scheme is not None}
        self.chosen: dict[str, QuantizedWeight] = {}
        self.report: list[dict] = []
        self._turn = 0  # with several processes: whose turn it is to make the next decision
        # where the windows' activations are kept between forward passes (None: on the compute device); a streamed
        # run keeps them on the CPU, so that the compute device holds one layer and one window
        self.store: torch.device | None = None
        # the float model's own activations at the current layer (tuning toward the float model), else None
        self.float_inputs: list[torch.Tensor] | None = None
        # with calibration.activations: disk (a streamed run), where each generation of activations is kept
        self.activations_dir: Path | None = None
        self.model_tune: dict | None = None  # the end-to-end stage's report (calibration.tune.model_steps)
        self._said: set = set()  # what was logged once per run (see _note_once)

    def tracks_float_model(self) -> bool:
        """Whether the float model's activations are carried beside the quantized ones (tune.target: model)."""
        return tracks_float_model(self.spec, self.entries.values())

    def tunes_model(self) -> bool:
        """Whether the chosen scales are tuned end to end after the last decoder layer (calibration.tune.model_steps)."""
        return self.spec.tune.model_steps > 0

    def _decide(self, make):
        """``make()``'s result, computed by one process in turn and sent to the others (or here, alone)."""
        if not distributed.active():
            return make()
        owner, self._turn = self._turn % distributed.world_size(), self._turn + 1
        return distributed.from_rank(make() if distributed.rank() == owner else None, owner)

    # ---- running one decoder layer on all calibration windows -------------------------------

    def _windows(self, tag: str):
        """A new, empty generation of activations: a list, or files (``calibration.activations: disk``)."""
        return [] if self.activations_dir is None else DiskWindows(self.activations_dir / tag)

    def _capture_inputs(self, layers: nn.ModuleList) -> tuple[list[torch.Tensor], LayerCalls]:
        """This process's windows as the first decoder layer receives them, and every layer's own call arguments."""
        mine = self.windows[distributed.share(len(self.windows))]  # all of them in one process
        return capture(self.model, layers, mine.unsqueeze(1), self._input_device(), store=self.store, into=self._windows("inputs"))

    def _input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _run_quantized(self, layer: nn.Module, inputs, float_out, tag: str) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Run the quantized layer on every window: in memory its outputs replace ``inputs`` one window at a time, and
        each float output is dropped once compared (so no third copy of the activations is ever held); on disk they
        are a new generation (``tag``), the inputs' files kept until the caller drops them. Returns the squared error
        and the squared float output, summed, and the outputs."""
        calls = self.calls.at(self._index, self.device)
        outputs = inputs if isinstance(inputs, list) else self._windows(tag)
        num = den = 0
        with torch.no_grad():
            for i, x in enumerate(inputs):
                q, f = call_layer(layer, x.to(self.device), calls[i], self.device).detach(), float_out[i].to(self.device)
                float_out[i] = None
                # each window's sums in float64: their total is then the same however the windows are shared out
                num = num + ((q.float() - f.float()) ** 2).sum(dtype=torch.float64)
                den = den + (f.float() ** 2).sum(dtype=torch.float64)
                if outputs is inputs:
                    inputs[i] = self._keep(q)
                else:
                    outputs.append(self._keep(q))
        return torch.as_tensor(num), torch.as_tensor(den), outputs

    def _run_float(self, layer: nn.Module, inputs, tag: str):
        calls = self.calls.at(self._index, self.device)
        out = self._windows(tag)
        for x, call in zip(inputs, calls):
            out.append(self._keep(call_layer(layer, x.to(self.device), call, self.device).detach()))
        return out

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        if self.store is None or x.device == self.store:
            return x
        if self.store.type == "cpu" and x.device.type == "cuda":  # page-locked: the copies back are faster
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            return out.copy_(x)
        return x.to(self.store)

    def _measure(self, layer: nn.Module, inputs: list[torch.Tensor], names: list[str], stop_early: bool = False,
                 first_group_only: bool = False, keep: int = 0, tag: str = "") -> tuple[dict, list, list]:
        """Run the layer on every window, measuring the inputs of ``names``.

        Layers reading the very same tensor in one forward call (q/k/v, gate/up) share
        one statistics object. With ``stop_early`` each forward stops once all of ``names``
        have seen their input (no outputs are returned then); with ``first_group_only`` only
        the first group called gets statistics (the others are measured again later anyway).
        ``keep`` tokens per input are sampled, with mean |x|, for AWQ. Returns (statistics by
        layer name, groups in call order, the layer's outputs).
        """
        stats: dict[str, _Inputs] = {}
        groups: list[list[str]] = []
        # Input tensor of this forward call -> first layer that read it. The tensors are held until
        # the call ends: a freed one's memory could otherwise come back, at the same address and
        # shape, as another layer's input and be taken for the same tensor.
        owner_of: dict[tuple, tuple[str, torch.Tensor]] = {}
        first_call = [True]

        def make_hook(name):
            def hook(module, args):
                x = args[0]
                owner = owner_of.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), (name, x))[0]
                if owner == name:
                    if first_call[0]:
                        groups.append([name])
                    if not first_group_only or groups[0][0] == name:
                        stats.setdefault(name, _Inputs()).add(x, keep)
                else:
                    if owner in stats:
                        stats[name] = stats[owner]
                    if first_call[0]:
                        next(g for g in groups if g[0] == owner).append(name)
                seen.add(name)
                if stop_early and len(seen) == len(names):
                    raise Stop

            return hook

        hooks = [self.model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
        calls = self.calls.at(self._index, self.device)
        outs = [] if stop_early else self._windows(f"{tag}.float-outputs")
        seen: set[str] = set()
        try:
            with torch.no_grad():
                for x, call in zip(inputs, calls):
                    owner_of.clear()
                    seen.clear()
                    try:
                        outs.append(self._keep(call_layer(layer, x.to(self.device), call, self.device).detach()))
                    except Stop:
                        pass
                    first_call[0] = False
        finally:
            for h in hooks:
                h.remove()
        if distributed.active():
            _combine(stats, keep)
        for st in stats.values():
            st.finish()
        return stats, groups, outs

    # ---- the whole model -------------------------------------------------------------------

    def run(self) -> dict[str, QuantizedWeight]:
        t_start = time.perf_counter()
        stack_name, layers = decoder_layers(self.model)
        inside = {f"{stack_name}.{i}" for i in range(len(layers))}
        outside = [e for n, e in self.entries.items() if not any(n.startswith(p + ".") for p in inside)]
        self.log(f"calibrating {len(layers)} decoder layers on {len(self.windows)} windows of {self.windows.shape[1]} tokens")
        teacher = None
        if self.tunes_model():  # the float model's predictions, before any layer changes
            from .algorithms import tune

            teacher = tune.teacher_distribution(self.model, self.windows, self._input_device(), tune.TEACHER_TOP_K, self.progress)
        inputs, self.calls = self._capture_inputs(layers)
        self.float_inputs = list(inputs) if self.tracks_float_model() else None
        bar = tqdm(range(len(layers)), desc="calibrating", unit="layer", disable=not self.progress)
        for i in bar:
            layer = layers[i]
            prefix = f"{stack_name}.{i}"
            home = next(layer.parameters()).device
            layer.to(self.device)
            inputs = [x.to(self.device) for x in inputs]
            err = self._layer(layer, i, prefix, inputs)
            layer.to(home)
            bar.set_postfix_str(f"layer {i}: output error {err['layer_rel_error']:.3%}")
            self.report.append(err)
            inputs = err.pop("_outputs")
        self.float_inputs = None
        for e in outside:  # e.g. a quantized output head: no decoder-layer statistics
            method = "rtn" if ALGORITHMS[e.method].calibrated else e.method
            self.log(f"{e.name}: outside the decoder layers, quantized with {method}")
            qw = ALGORITHMS[method].quantize(layer_weight(self.model.get_submodule(e.name)).detach(), e.scheme, self.plan.model_dtype)
            install(self.model, e, qw, self.plan.model_dtype)
            self.chosen[e.name] = qw
        if teacher is not None:
            self.model_tune = self._tune_model(teacher, {e.name for e in outside})
        self.seconds = time.perf_counter() - t_start
        return self.chosen

    def _batches(self, group: list[str], stats: dict) -> list[list[str]]:
        """Layers of one group quantized together: same calibrated method, format and inputs."""
        out: list[list[str]] = []
        keys: dict = {}
        for n in group:
            key = _batch_key(self.entries[n])
            if key is not None and n in stats:
                key = (key, id(stats[n]))
                if key in keys:
                    out[keys[key]].append(n)
                    continue
                keys[key] = len(out)
            out.append([n])
        return out

    def _layer(self, layer: nn.Module, index: int, prefix: str, inputs: list[torch.Tensor]) -> dict:
        """Calibrate and quantize decoder layer number ``index`` (``prefix``: its name) on its inputs."""
        self._index = index
        names = [f"{prefix}.{n}" for n, m in layer.named_modules() if n and f"{prefix}.{n}" in self.entries]
        awq = any(ALGORITHMS[self.entries[n].method].scales_inputs for n in names)
        stats, groups, float_out = self._measure(
            layer, inputs, names, first_group_only=self.spec.true_sequential and not awq, keep=self.spec.awq.tokens if awq else 0,
            tag=prefix)
        give_memory_back()
        groups += [[n] for n in names if not any(n in g for g in groups)]  # layers the forward never called
        # the float layer on the float model's activations (before anything here is quantized): the tuning targets
        # and the next layer's float activations
        model_out = None if self.float_inputs is None else self._run_float(layer, self.float_inputs, f"{prefix}.model-outputs")
        report = {"layer": prefix, "scaled": []}

        # activation-aware scaling, on the float layer's statistics
        for sg in self._scaling_groups(layer, prefix, inputs) if awq else []:
            st = stats.get(sg.targets[0])
            if st is None:
                continue
            entries = [self.entries.get(t) for t in sg.targets]
            weights = [layer_weight(self.model.get_submodule(t)).detach().float() for t in sg.targets]
            schemes = [e.scheme if e is not None else None for e in entries]
            sample = torch.cat(st.sample) if st.sample else None
            int8 = any(isinstance(sc, Int8) for sc in schemes)  # activation maxima matter for LLM.int8
            s, alpha, ratio = self._decide(lambda: search_scales(weights, schemes, st.hessian, st.abs_mean, sample, self.spec.awq.grid,
                                                                 st.abs_max if int8 else None, sg.expand))
            s = s.to(weights[0].device)
            if alpha > 0:
                apply_scales(self.model, sg, s)
                rs = reader_scales(s, sg.expand)
                st.h = st.h / (rs.unsqueeze(0) * rs.unsqueeze(1))
                st.abs_sum, st.abs_max = st.abs_sum / rs, st.abs_max / rs
                st.sample = [x / rs for x in st.sample]
            report["scaled"].append({"after": sg.prev.removeprefix(prefix + "."), "alpha": alpha, "loss_ratio": ratio})

        # float weights of the layers tuned after their starting choice (the choice replaces the modules)
        floats = {n: layer_weight(self.model.get_submodule(n)).detach().float().clone() for n in names
                  if ALGORITHMS[self.entries[n].method].tunes and not isinstance(self.entries[n].scheme, Keep)}
        options = {**self.spec.gptq.model_dump(), **self.spec.scale_search.model_dump()}
        for gi, group in enumerate(groups):
            if self.spec.true_sequential and gi > 0 and any(ALGORITHMS[self.entries[n].method].calibrated for n in group):
                stats.update(self._measure(layer, inputs, group, stop_early=True)[0])  # as the quantized layers before give them
            batches = self._batches(group, stats)
            for bi, batch in enumerate(batches):
                e, st = self.entries[batch[0]], stats.get(batch[0])
                modules = [self.model.get_submodule(n) for n in batch]
                algo = ALGORITHMS[e.method]
                if not algo.calibrated:
                    qws = [quantize_layer(modules[0], e, self.plan.model_dtype)]
                elif st is None:  # the forward never called it: no statistics
                    self.log(f"{batch[0]}: no calibration inputs reached it, quantized with rtn")
                    qws = [ALGORITHMS["rtn"].quantize(layer_weight(modules[0]).detach(), e.scheme, self.plan.model_dtype)]
                else:
                    ws = [layer_weight(m).detach() for m in modules]
                    last = not any(stats.get(b[0]) is st for b in batches[bi + 1 :])
                    # at its last use (statistics belong to one group) the solve may free the Hessian as it goes
                    layer_stats = LayerStats(st.hessian, st.tokens, options, owned=last)
                    if last:
                        st.h = None

                    def solve():  # run by one process in turn (_decide)
                        energy = [_output_energy(w, layer_stats.hessian) for w in ws]  # before the solve frees it
                        qws = algo.quantize_many(ws, e.scheme, self.plan.model_dtype, layer_stats)
                        return qws, [_rel_error(w, qw, layer_stats.hessian, en) for w, qw, en in zip(ws, qws, energy)]

                    try:
                        qws, errs = self._decide(solve)
                    except FactoringError as err:
                        raise UserError(f"{batch[0]}: {err}") from None
                    for n, qw in zip(batch, qws):
                        if getattr(qw, "damping", None) is not None:
                            self.log(f"{n}: its inputs' Hessian is not positive definite with gptq.damp {options['damp']}; "
                                     f"factored with damping {qw.damping:.3g} of its mean diagonal")
                    for n, err in zip(batch, errs):
                        report.setdefault("linear_rel_error", {})[n.removeprefix(prefix + ".")] = err
                for n, qw in zip(batch, qws):
                    install(self.model, self.entries[n], qw, self.plan.model_dtype)
                    self.chosen[n] = qw
                give_memory_back()  # the solver's n x n temporaries, before the next batch's
                # a streamed layer's weights map the checkpoint: the pages of those now replaced go now, not with the layer
                give_file_pages_back(layer_weight(m) for m in modules)

        if floats:
            report["tune"] = self._tune(layer, prefix, names, floats, inputs, float_out if model_out is None else model_out,
                                        groups if self.spec.tune.scope == "group" else None)
        if model_out is not None:
            self.float_inputs = model_out
        num, den, outputs = self._run_quantized(layer, inputs, float_out, f"{prefix}.outputs")
        drop_windows(float_out)
        num, den = distributed.sum_(num), distributed.sum_(den)
        report["layer_rel_error"] = (num / den).sqrt().item()
        report["_outputs"] = outputs  # the quantized layer's outputs (in memory: in place of its inputs)
        return report

    def _scaling_groups(self, layer: nn.Module, prefix: str, inputs) -> list:
        """The pairs of this decoder layer whose readers' method scales inputs and that are checked to keep the float
        layer's function (on the first calibration window); what is not folded, and why, is said once per pair."""
        from .algorithms.awq import FOLDING_TOLERANCE, folding_error, norm_readers

        x, call = inputs[0].to(self.device), self.calls.at(self._index, self.device)[0]

        def run():
            return call_layer(layer, x, call, self.device)

        seen = []  # the forward that finds the norms' readers also gives the float layer's output to compare with
        readers = norm_readers(layer, lambda: seen.append(run()))
        reference = seen[0]
        groups, skipped = scaling_groups(layer, prefix, self.model.config, readers)
        out = []
        for sg in groups:
            if not any(ALGORITHMS[self.entries[t].method].scales_inputs for t in sg.targets if t in self.entries):
                continue
            err = self._decide(lambda: folding_error(self.model, sg, run, reference))
            if err <= FOLDING_TOLERANCE:
                out.append(sg)
            else:
                rel = [t.removeprefix(prefix + ".") for t in sg.targets]
                skipped.append((sg.prev.removeprefix(prefix + "."), rel,
                                f"folding changes the float layer's output (by {err:.1%} of its largest value in {prefix})"))
        for prev, targets, why in skipped:
            self._note_once((type(layer).__name__, prev, tuple(targets)),
                            f"activation-aware scales are not folded from {prev} into {', '.join(targets)} "
                            f"({type(layer).__name__} layers): {why}")
        if not out:
            self._note_once((type(layer).__name__,), f"{type(layer).__name__}: no pair of this layer takes activation-aware "
                            f"scales ({prefix} first); its Linear layers are quantized without them")
        return out

    def _note_once(self, key, line: str) -> None:
        """Say ``line`` the first time ``key`` comes (it would come again for every decoder layer of the model)."""
        if key not in self._said:
            self._said.add(key)
            self.log(line)

    def _tune(self, layer: nn.Module, prefix: str, names: list[str], floats: dict, inputs: list, float_out: list,
              groups: list[list[str]] | None) -> dict:
        """Tune the codes and scales of the layers in ``floats`` (from their starting choice) on the layer's output,
        all at once or (``groups``: the layer's groups of Linear layers reading the same inputs) one group at a time."""
        from .algorithms.tune import tune_layer
        from .quantized import KeptWeight

        rel = {n: n.removeprefix(prefix + ".") for n in names}
        tuned = {rel[n]: (w, self.chosen[n], self.entries[n].scheme) for n, w in floats.items()}
        frozen = {rel[n]: self.chosen[n] for n in names if n not in floats and n in self.chosen
                  and not isinstance(self.chosen[n], KeptWeight)}
        o = self.spec.tune
        bar, on_step = self._step_bar(o.steps, f"tuning {prefix}", "loss", leave=False)
        try:
            results, rep = tune_layer(layer, tuned, frozen, inputs, float_out, self.calls.of(0, self._index), self.device,
                                      {"steps": o.steps, "lr": o.lr, "batch": o.batch, "seed": self.spec.seed},
                                      self.plan.model_dtype, on_step,
                                      None if groups is None else [[rel[n] for n in g if n in rel] for g in groups])
        finally:
            bar.close()
        for n in floats:
            qw = results[rel[n]]
            install(self.model, self.entries[n], qw, self.plan.model_dtype)
            self.chosen[n] = qw
        give_memory_back()
        return rep

    def _step_bar(self, total: int, desc: str, label: str, leave: bool):
        """A progress bar counting tuning steps, and the callback that advances it (showing the loss every 10 steps)."""
        bar = tqdm(total=total, desc=desc, unit="step", leave=leave, disable=not self.progress)

        def on_step(t, steps, loss):
            bar.total = steps  # one decoder layer's groups tuned in turn take their steps each
            bar.update(1)
            if t % 10 == 0 or t == steps:
                bar.set_postfix_str(f"{label} {loss:.3g}")

        return bar, on_step

    def _tune_model(self, teacher: list, outside: set[str]) -> dict:
        """The end-to-end stage: the stored scales of every quantized layer of the decoder layers at once, toward the
        float model's predictions."""
        from .algorithms.tune import tune_model
        from .quantized import KeptWeight

        chosen = {n: (self.chosen[n], e.scheme) for n, e in self.entries.items()
                  if n not in outside and n in self.chosen and not isinstance(self.chosen[n], KeptWeight)}
        o = self.spec.tune
        bar, on_step = self._step_bar(o.model_steps, "tuning the model's scales", "KL", leave=True)
        try:
            results, rep = tune_model(self.model, chosen, self.windows, teacher,
                                      {"steps": o.model_steps, "lr": o.model_lr, "batch": o.batch, "seed": self.spec.seed}, on_step)
        finally:
            bar.close()
        for n, qw in results.items():
            install(self.model, self.entries[n], qw, self.plan.model_dtype)
            self.chosen[n] = qw
        self.log(f"tuned the scales of {len(results)} layers end to end: KL from the float model on the calibration windows "
                 f"{rep['kl_before']:.4f} -> {rep['kl_after']:.4f} nats/token" + (" (kept the start)" if rep["kept_start"] else ""))
        give_memory_back()
        return rep


def _combine(stats: dict[str, _Inputs], keep: int) -> None:
    """Every process's statistics summed (maxima: the maximum; AWQ's sample: the first ``keep`` tokens in window
    order, the processes holding consecutive windows), so each holds what one process would measure on all."""
    names = sorted(stats)
    if any(other != names for other in distributed.gather(names)):
        raise UserError("the calibration windows reached different layers in different processes (routed experts?); "
                        "run this model as one process")
    done: set[int] = set()
    for n in names:
        st = stats[n]
        if id(st) in done:
            continue
        done.add(id(st))
        for part in st.parts:
            distributed.sum_(part)
        st.tokens = int(distributed.sum_(torch.tensor([float(st.tokens)], dtype=torch.float64, device=st.abs_sum.device)).item())
        if keep:
            distributed.sum_(st.abs_sum)
            distributed.max_(st.abs_max)
            parts = [x for sample in distributed.gather([x.cpu() for x in st.sample]) for x in sample]
            st.sample = [torch.cat(parts)[:keep].to(st.abs_sum.device)] if parts else []
            st.sampled = sum(len(x) for x in st.sample)


def _triangle_blocks(n: int) -> list[tuple[int, int]]:
    """(first column, columns) of the column blocks the upper triangle of an ``n x n`` sum is kept in: at least 16
    blocks when ``n`` allows (the diagonal squares, summed whole, are the memory above half), each block's product
    at most 8M floats."""
    s = max(64, min((1 << 23) // n, -(-n // 16)))
    return [(j, min(s, n - j)) for j in range(0, n, s)]


def _batch_key(e: PlanEntry):
    return (e.method, e.scheme) if ALGORITHMS[e.method].calibrated else None


def _output_energy(w: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(W H Wᵀ)``: the squared output of a Linear on its calibration inputs (summed over tokens, / tokens), a
    few rows at a time."""
    from .algorithms.grid import quadratic_error

    h = h.to(w.device)
    step = max(1, (1 << 22) // w.shape[1])
    return sum(float(quadratic_error(w[r : r + step].float(), h).sum(dtype=torch.float64)) for r in range(0, w.shape[0], step))


def _rel_error(w: torch.Tensor, qw: QuantizedWeight, h: torch.Tensor | None, energy: float) -> float:
    """Relative output error of one Linear on its calibration inputs: sqrt(tr(E H Eᵀ) / tr(W H Wᵀ)), ``E = W - Q``;
    ``tr(E H Eᵀ)`` as the algorithm measured it when it did (``qw.output_error``), else computed with ``h``."""
    num = getattr(qw, "output_error", None)
    if num is None:
        num = _output_energy(w.float() - qw.dequantize().to(w.device).float(), h)
    return (num / max(energy, 1e-30)) ** 0.5


def tracks_float_model(spec, entries) -> bool:
    """Whether calibration carries the float model's activations beside the quantized ones: tuning toward the float
    model (``tune.target: model``) of any of ``entries`` (plan entries)."""
    return spec.tune.target == "model" and any(e.scheme is not None and ALGORITHMS[e.method].tunes for e in entries)


def calibrated_methods(plan: Plan) -> list[str]:
    return sorted({e.method for e in plan.entries if e.scheme is not None and ALGORITHMS[e.method].calibrated})


def needs_calibration(plan: Plan) -> bool:
    return bool(calibrated_methods(plan))


__all__ = ["SequentialCalibrator", "calibration_windows", "decoder_layers", "needs_calibration", "PlanEntry"]
