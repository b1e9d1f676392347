"""One walk through a model's decoder layers, one layer at a time, as the model's own forward would run them.

Everything in llmquant that runs decoder layers one by one (calibration and tuning, ``quantization.auto``'s
sensitivity and KL passes, the streamed evaluation, the layer-by-layer reload check) starts here:

* :func:`capture` runs the model's own forward once per window with every decoder layer replaced by a stand-in
  that records what it is called with and hands its input on. It returns each window's input to the first layer
  and, for *every* layer, the call arguments the model gives that layer: its own attention mask (sliding-window or
  full, chunked), its own rotary embeddings (local or global base), its position ids. The layers' weights are never
  needed (a skeleton on the meta device will do), only the modules before the first layer (embeddings).
* :func:`call_layer` runs one real layer on a window's hidden state with that layer's own arguments.
* :func:`logits_after_layers` finishes the model's forward from the last layer's output (final norm, head, the
  family's logit scaling), again through the model's own code.

Arguments that do not depend on the tokens (masks and rotary tables depend only on the window's length) are
kept once for all windows of a shape, and objects the model shares between layers stay shared.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .memory import give_file_pages_back, maps_a_file


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of identical blocks holding Linear layers (the longest such ModuleList)."""
    from .plan import quantizable

    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(type(c) is type(m[0]) for c in m):
            if any(quantizable(x) for x in m[0].modules()) and (best is None or len(m) > len(best[1])):
                best = (name, m)
    if best is None:
        raise UserError(f"{type(model).__name__}: no stack of decoder layers found to calibrate layer by layer")
    return best


class Stop(Exception):
    """Raised inside a forward pass to end it once what was wanted has been seen."""


def first(y):
    """A decoder layer's hidden states (layers return them alone or first in a tuple)."""
    return y[0] if isinstance(y, tuple) else y


def to(obj, device, float_dtype: torch.dtype | None = None, memo: dict | None = None):
    """Tensors (also inside tuples, lists and dicts) moved to ``device``; floating ones also cast to ``float_dtype``
    when given. With ``memo``, a tensor met twice (an object the model gives several layers) is moved once and
    stays one object."""
    if isinstance(obj, torch.Tensor):
        if memo is not None and id(obj) in memo:
            return memo[id(obj)][1]
        out = obj.to(device=device, dtype=float_dtype) if float_dtype is not None and obj.is_floating_point() else obj.to(device)
        if memo is not None:
            memo[id(obj)] = (obj, out)  # (the original held, so its id is not reused while the memo lives)
        return out
    if isinstance(obj, (tuple, list)):
        return type(obj)(to(o, device, float_dtype, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: to(v, device, float_dtype, memo) for k, v in obj.items()}
    return obj


class _Out(tuple):
    """A stand-in layer's output: a one-element tuple holding the hidden state. Families whose loop takes
    ``outputs[0]`` (Falcon, Bloom, GPT-J...) get the tensor; families that use the output whole pass this on to the
    next layer or module, which unwraps it (see :func:`_unwrapping`)."""


def _hidden_arg(args: tuple, kwargs: dict):
    """(the hidden state, the other positional arguments, the other keyword arguments) of a layer's call."""
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _unwrap(x):
    return x[0] if isinstance(x, _Out) else x


@contextmanager
def _unwrapping(model: nn.Module):
    """While in effect, every module of ``model`` called with a stand-in's :class:`_Out` gets the tensor in it."""

    def hook(module, args, kwargs):
        if args and isinstance(args[0], _Out):
            return (args[0][0], *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), _Out):
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"][0]}
        return None

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _forward_replaced(module: nn.Module, forward):
    """``module`` computing ``forward`` instead of its own (an instance attribute: hooks that wrap the forward, such
    as accelerate's, come back as they were)."""
    had = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had is None:
            del module.forward
        else:
            module.forward = had


def _same(a, b, memo: dict | None = None) -> bool:
    """Whether two layers' arguments are equal (tensors: same values); ``memo`` remembers the answer for tensors
    already compared (the model gives many layers the same mask)."""
    memo = {} if memo is None else memo
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        key = (id(a), id(b))
        if key not in memo:
            memo[key] = (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
        return memo[key]
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y, memo) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], memo) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


@dataclass
class LayerCalls:
    """Every decoder layer's call arguments on every window: ``calls[window][layer]`` is ``(args, kwargs)`` (the
    hidden state left out). Windows whose arguments are the same (same length, no padding) share one list."""

    calls: list[list[tuple[tuple, dict]]]

    def of(self, window: int, layer: int) -> tuple[tuple, dict]:
        return self.calls[window][layer]

    def __len__(self) -> int:
        return len(self.calls)

    def at(self, layer: int, device, float_dtype: torch.dtype | None = None) -> list[tuple[tuple, dict]]:
        """Layer ``layer``'s arguments for every window, moved to ``device`` (floating ones cast to ``float_dtype`` when
        given): an object shared by windows is moved once and stays shared."""
        memo: dict = {}
        return [to(self.calls[b][layer], device, float_dtype, memo) for b in range(len(self.calls))]

    def distinct(self) -> int:
        """How many different sets of arguments are kept (one per window shape, usually)."""
        return len({id(c) for c in self.calls})


def capture(model: nn.Module, layers: nn.ModuleList, batches, device, store=None, into=None) -> tuple[list, LayerCalls]:
    """Each batch of token ids (``batches``: tensors ``[batch, tokens]``) as the first decoder layer receives it, and
    every layer's own call arguments on it, from the model's own forward with each decoder layer replaced by a
    stand-in (see the module docstring). The hidden states and arguments are kept on ``store`` (default: where the
    model computed them); the hidden states are appended to ``into`` (default: a new list) as they come, so a
    container on disk never has them all in memory. Only the modules before the first decoder layer need weights."""
    hidden = [] if into is None else into
    calls: list[list[tuple]] = []
    seen: list[list[tuple]] = []  # the distinct argument lists so far
    n = len(layers)
    for ids in batches:
        got: list[tuple] = [None] * n
        memo: dict = {}

        def stand_in(i):
            def forward(*args, **kwargs):
                x, a, kw = _hidden_arg(args, kwargs)
                x = _unwrap(x)
                if i == 0:
                    hidden.append(x.detach() if store is None else x.detach().to(store))
                got[i] = (to(a, store, memo=memo), to(kw, store, memo=memo)) if store is not None else (a, kw)
                if i == n - 1:
                    raise Stop
                return _Out((x,))

            return forward

        with torch.no_grad(), _unwrapping(model):
            try:
                with _stand_ins(layers, stand_in):
                    model(ids.to(device), use_cache=False)
            except Stop:
                pass
        if any(g is None for g in got):
            missing = got.index(None)
            raise UserError(f"{type(model).__name__}: the forward did not call decoder layer {missing} of {n} in order; "
                            "this architecture cannot be run one layer at a time")
        same = next((s for s in seen if _same(s, got)), None)
        if same is None:
            seen.append(got)
            same = got
        calls.append(same)
    return hidden, LayerCalls(calls)


@contextmanager
def _stand_ins(layers: nn.ModuleList, make):
    """Each of ``layers`` computing ``make(i)`` while in effect."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.enter_context(_forward_replaced(layer, make(i)))
        yield


def call_layer(layer: nn.Module, x: torch.Tensor, call: tuple[tuple, dict], device, float_dtype=None,
               grad: bool = False) -> torch.Tensor:
    """Decoder layer ``layer`` on hidden state ``x`` with its own arguments ``call`` (:meth:`LayerCalls.of`), moved to
    ``device`` (floating ones cast to ``float_dtype`` when given); its output hidden state."""
    args, kwargs = call
    with torch.set_grad_enabled(grad):
        return first(layer(x, *to(args, device, float_dtype), **to(kwargs, device, float_dtype)))


def through_layer(layer: nn.Module, index: int, hidden: list[torch.Tensor], calls: LayerCalls, device, before=None) -> None:
    """Every window's hidden state (kept on the CPU) replaced by decoder layer ``index``'s output on it
    (``before(b)``, when given, is called before window ``b`` goes through)."""
    here = calls.at(index, device)
    for b in range(len(hidden)):
        if before is not None:
            before(b)
        hidden[b] = call_layer(layer, hidden[b].to(device), here[b], device).cpu()


def logits_layer_by_layer(model: nn.Module, stack: str, n_layers: int, batches: list[torch.Tensor], layer_at, device,
                          desc: str | None = None):
    """A model's logits on each batch of token ids, one decoder layer at a time: every batch goes through the
    embeddings, then through layer 0, then layer 1, ... (``layer_at(i)``: a context manager that has layer ``i`` in
    place while it runs), then through the norm and head; yields each batch's logits (float32, on the CPU).
    Only the hidden states of all batches (and their call arguments) are kept between layers, on the CPU."""
    from tqdm.auto import tqdm

    layers = model.get_submodule(stack)
    hidden, calls = capture(model, layers, batches, device, store="cpu")
    for i in tqdm(range(n_layers), desc=desc, unit="layer", disable=desc is None):
        with layer_at(i) as layer:
            through_layer(layer, i, hidden, calls, device)
    for ids, h in zip(batches, hidden):
        yield logits_after_layers(model, layers, ids.to(device), h.to(device), stack)


class _Replay(nn.Module):
    """Stands in for all decoder layers: returns the hidden state the streamed layers computed."""

    def __init__(self, hidden: torch.Tensor, like: nn.Module):
        super().__init__()
        self.hidden = hidden
        self.attention_type = getattr(like, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        return _Out((self.hidden,))


HEAD_SLICE_BYTES = 32 << 20


@contextmanager
def head_in_slices(model: nn.Module):
    """A float head whose weight is a view of the checkpoint file (as the streamed runs and the reloaded export read
    it) multiplies one slice of vocabulary rows at a time and gives each slice's pages back once used, so that the
    head (0.2 GB for a 49k x 2048 bf16 head, 1 GB for 128k x 4096) is never resident whole. The logits are the same
    numbers: each is still one row's product with the hidden state."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    if type(head) is not nn.Linear or not isinstance(w, torch.Tensor) or not w.is_contiguous() or not maps_a_file(w):
        yield
        return
    rows = max(1, HEAD_SLICE_BYTES // (w.shape[1] * w.element_size()))

    def forward(x):
        out = None
        for s in range(0, w.shape[0], rows):
            part = w[s : s + rows]
            y = nn.functional.linear(x, part, None if head.bias is None else head.bias[s : s + rows])
            if out is None:
                out = y.new_empty(*y.shape[:-1], w.shape[0])
            out[..., s : s + rows] = y
            give_file_pages_back([part])
        return out

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def logits_after_layers(model, layers: nn.ModuleList, ids: torch.Tensor, hidden: torch.Tensor, stack_name: str | None = None,
                        grad: bool = False) -> torch.Tensor:
    """The model's logits on ``ids`` given its last decoder layer's output (the rest of the forward as usual): float32 on
    the CPU, or with ``grad`` where they were computed, with autograd recording (gradients reach ``hidden``)."""
    stack_name = stack_name or decoder_layers(model)[0]
    owner, _, attr = stack_name.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    original = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([_Replay(hidden, layers[0])]))
    try:
        with head_in_slices(model), _unwrapping(model):
            if grad:
                return model(ids, use_cache=False).logits.float()
            with torch.no_grad():
                return model(ids, use_cache=False).logits.float().cpu()
    finally:
        setattr(parent, attr, original)
