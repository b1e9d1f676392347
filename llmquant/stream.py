"""Layer-streamed quantization: a model larger than memory, one decoder layer at a time.

The model is built as a skeleton without memory (accelerate's ``init_empty_weights``:
parameters on the meta device). Each decoder layer in turn is read from the checkpoint's
safetensors files (``safe_open``, one tensor at a time), put on the compute device,
quantized (round to nearest, or calibrated on the outputs of the quantized layers before
it), run on the fixed probe input, and its tensors written into the export's files;
then it is freed. Embeddings, the final norm and the head are handled the same way.
Peak memory is one layer (plus the calibration activations), whatever the size of the
model.

The export's files are laid out from the plan before anything is quantized (every
tensor's dtype and shape is planned exactly: :class:`ShardFiles`), in the same order
and shards as the in-memory export, so both are the same bytes; each tensor is written
at its place once, as soon as it is made. They live in a work folder beside the output
(``.OUT.llmquant-partial-KEY``) with a record of each finished layer and the state after the last layer saved
(see :data:`STATE_TIME_SHARE`), which makes runs resumable: a run stopped during layer 57 of 80 restarts after the
last layer whose state was saved (57 where states are small) with the same result. Once every layer is written the
files are linked into the export.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .memory import give_file_pages_back, give_memory_back, steady_heap
from .backends.bnb import unlink, without_cpu_repacking
from .calibrate import DiskWindows, drop_windows
from .walk import call_layer, capture, decoder_layers, logits_after_layers, logits_layer_by_layer
from .errors import UserError
from .plan import LLMQUANT_METHOD

# ---- safetensors, written one tensor at a time ----------------------------------------------

# safetensors orders a file's tensors by dtype (this rank, highest first), then by name
_DTYPE_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def _layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict | None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors file laid out as ``safetensors.torch.save_file`` lays it out: its header (the length prefix
    included) and each tensor's (start, end) in the file."""
    order = sorted(specs, key=lambda n: (-_DTYPE_RANK.index(_ST_DTYPES[specs[n][0]]), n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for n in order:
        dtype, shape = specs[n]
        size = _nbytes(dtype, shape)
        header[n] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    return head, {n: (len(head) + header[n]["data_offsets"][0], len(head) + header[n]["data_offsets"][1]) for n in order}


class ShardFiles:
    """A checkpoint's safetensors files laid out before any of its tensors exists, from each tensor's dtype and shape
    (in the checkpoint's order): split into shards of at most ``max_shard_size`` as transformers splits them, each
    file laid out as ``safetensors.torch.save_file`` lays it out. The files are created with their headers and sized;
    each tensor is then written at its place whenever it comes, in any order, so a streamed run writes every quantized
    layer once, into the export itself, as soon as it is made."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_size: int):
        from huggingface_hub import split_state_dict_into_shards_factory

        split = split_state_dict_into_shards_factory(
            specs, get_storage_size=lambda spec: _nbytes(*spec), filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
        self.specs = specs
        self.heads: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}
        self.places: dict[str, tuple[str, int, int]] = {}  # tensor -> (file, start, end)
        for filename, names in split.filename_to_tensors.items():
            head, places = _layout({n: specs[n] for n in names}, {"format": "pt"})
            self.heads[filename] = head
            self.sizes[filename] = max([len(head), *(end for _, end in places.values())])
            self.places.update({n: (filename, a, b) for n, (a, b) in places.items()})
        self.index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename} if split.is_sharded else None

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def create(self, folder: Path, where: Path | None = None) -> None:
        """Each file with its header, at its full size (the data still holes), readable as any other output is (the
        user's umask); refused at once when the filesystem has no room for them (``where``: the folder the message
        names)."""
        import shutil

        from .report import human_bytes

        free = shutil.disk_usage(folder).free
        if self.nbytes > free:
            raise UserError(f"the export needs {human_bytes(self.nbytes)} in {where or folder} and {human_bytes(free)} are "
                            "free; free some space there or choose another output folder")
        for filename, head in self.heads.items():
            with open(folder / filename, "wb") as f:
                f.write(head)
                f.truncate(self.sizes[filename])
            os.chmod(folder / filename, 0o666 & ~_umask())

    def present(self, folder: Path) -> bool:
        """Whether ``folder`` holds these files as :meth:`create` made them (their headers and sizes)."""
        for filename, head in self.heads.items():
            path = folder / filename
            if not path.is_file() or path.stat().st_size != self.sizes[filename]:
                return False
            with open(path, "rb") as f:
                if f.read(len(head)) != head:
                    return False
        return True

    def put(self, folder: Path, tensors: dict) -> None:
        """Write each tensor (or :class:`FileRange`: copied file to file) at its place, one at a time."""
        fds: dict[str, int] = {}
        try:
            for name, src in tensors.items():
                filename, start, end = self.places[name]
                dtype, shape = self.specs[name]
                fd = fds.get(filename)
                if fd is None:
                    fd = fds[filename] = os.open(folder / filename, os.O_WRONLY)
                if isinstance(src, FileRange):  # bytes already in a file: copied in the kernel, never through memory
                    assert (src.dtype, tuple(src.shape)) == (dtype, tuple(shape)), (name, src, dtype, shape)
                    src.copy_to(fd, start)
                    continue
                t = src.detach().to("cpu").contiguous()
                assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (name, t.dtype, t.shape, dtype, shape)
                if t.numel():
                    _pwrite(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), start)
        finally:
            for fd in fds.values():
                os.close(fd)

    def write_index(self, folder: Path) -> list[str]:
        """``model.safetensors.index.json`` when sharded; the files' names."""
        if self.index is not None:
            (folder / "model.safetensors.index.json").write_text(json.dumps(self.index, indent=2, sort_keys=True) + "\n")
        return sorted(self.heads)


def _pwrite(fd: int, data: memoryview, at: int) -> None:
    data = data.cast("B")
    while len(data):
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n


@dataclass(frozen=True)
class FileRange:
    """One tensor's bytes inside a safetensors file."""

    path: Path
    start: int
    length: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def copy_to(self, fd: int, at: int) -> None:
        """Write the bytes into the file ``fd`` from offset ``at`` (in the kernel where it can: ``copy_file_range``)."""
        with open(self.path, "rb", buffering=0) as src:
            offset, left = self.start, self.length
            while left:
                try:
                    n = os.copy_file_range(src.fileno(), fd, left, offset, at)
                except (AttributeError, OSError):  # not Linux, or a filesystem that cannot: through a small buffer
                    src.seek(offset)
                    chunk = src.read(min(left, 1 << 26))
                    _pwrite(fd, memoryview(chunk), at)
                    n = len(chunk)
                if n == 0:
                    raise OSError(f"{self.path} ends before its tensor data")
                offset, left, at = offset + n, left - n, at + n


def tensor_ranges(path: Path) -> tuple[dict[str, FileRange], dict[str, str]]:
    """Where each tensor of a safetensors file lies in it, and the file's metadata (read from its header alone)."""
    torch_dtype = {name: dt for dt, name in _ST_DTYPES.items()}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    return {k: FileRange(Path(path), 8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0],
                         torch_dtype[v["dtype"]], tuple(v["shape"])) for k, v in header.items()}, metadata


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- reading a checkpoint lazily -----------------------------------------------------------------


class CheckpointReader:
    """The tensors of a safetensors checkpoint (one file, or shards with an index), read one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
            for f in sorted(set(self.where.values())):  # a damaged or missing shard fails now, with one line
                self._keys(f)
        else:
            self.where = {k: "model.safetensors" for k in self._keys("model.safetensors")}
        self._stack = ExitStack()
        self._open: dict[str, object] = {}
        self._ranges: dict[str, dict[str, FileRange]] = {}
        self._stored_as: dict[str, str] = {}  # model name -> name in the files, where they differ (see rename_for)

    def rename_for(self, model: nn.Module) -> None:
        """Also answer to the model's names for tensors the files store under older names, as transformers renames
        them when it loads (:func:`llmquant.checkpoint.model_names`)."""
        from .checkpoint import model_names

        for key, new in model_names(model, list(self.where), set(state_names(model))).items():
            if new not in self.where:
                self.where[new] = self.where[key]
                self._stored_as[new] = key

    def _handle(self, f: str):
        from safetensors import safe_open

        if f not in self._open:
            self._open[f] = self._stack.enter_context(safe_open(str(self.folder / f), "pt"))
        return self._open[f]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.where[name]).get_tensor(self._stored_as.get(name, name))

    def get_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor, reading only their bytes."""
        return self._handle(self.where[name]).get_slice(self._stored_as.get(name, name))[start:stop]

    def range(self, name: str) -> "FileRange":
        """Where a tensor's bytes lie in its file (from the file's header alone)."""
        f = self.where[name]
        if f not in self._ranges:
            self._ranges[f] = tensor_ranges(self.folder / f)[0]
        return self._ranges[f][self._stored_as.get(name, name)]

    def _keys(self, f: str) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.folder / f), "pt") as h:
                return list(h.keys())
        except Exception as e:
            raise UserError(f"could not load model {self.folder}: {f} is damaged: {str(e).strip().splitlines()[0]}; "
                            "download or save the checkpoint again") from None

    def close(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self._open.clear()


def stream_reason(src) -> str | None:
    """Why ``src`` cannot be streamed from its files (None when it can)."""
    if src.kind == "gguf":
        return "a GGUF file is dequantized whole by transformers"
    if src.kind == "folder":
        folder = Path(src.location)
        if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
            return "the folder has no model.safetensors (nor a shard index)"
    return None


def local_folder(src) -> Path:
    """The checkpoint's files on this machine (a Hub repository is downloaded once to the Hub cache)."""
    if src.kind == "folder":
        return Path(src.location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src.location, revision=src.revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:
        raise UserError(f"could not download {src.describe()} from the Hub: {str(e).strip().splitlines()[0]}") from None


def skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model without memory: parameters on the meta device, buffers computed from the config as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # tied embeddings are one parameter, stored once (as from_pretrained leaves them)
    return model.eval().requires_grad_(False)


def state_names(model: nn.Module) -> list[str]:
    """Parameters and persistent buffers, each once (a tied weight under its first name)."""
    from .plan import _persistent_buffers

    return [n for n, _ in model.named_parameters()] + [n for n, _ in _persistent_buffers(model)]


def missing_tensors(model: nn.Module, reader: CheckpointReader) -> list[str]:
    return [n for n in state_names(model) if n not in reader.where]


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, device, skip=frozenset(), only=None,
                unchanged: dict | None = None) -> None:
    """Read a module's parameters and persistent buffers from the checkpoint onto ``device`` (in the skeleton's dtypes);
    ``skip``/``only``: names (relative to ``module``) to leave out / to read alone. ``unchanged`` (when given) gets,
    for each tensor read without a conversion, what :func:`as_read` needs to know it still holds the file's bytes."""
    from accelerate.utils import set_module_tensor_to_device

    for name in state_names(module):
        if name in skip or (only is not None and name not in only):
            continue
        full = f"{prefix}.{name}" if prefix else name
        if full not in reader.where:
            continue  # a tied weight, stored under the other module's name: tied again by the caller
        owner, _, leaf = name.rpartition(".")
        m = module.get_submodule(owner) if owner else module
        old = m._parameters.get(leaf) if leaf in m._parameters else m._buffers.get(leaf)
        raw = reader.get(full)
        set_module_tensor_to_device(module, name, device, value=raw.to(old.dtype))
        if unchanged is not None and raw.dtype == old.dtype:
            new = m._parameters.get(leaf) if leaf in m._parameters else m._buffers.get(leaf)
            unchanged[full] = (new.data_ptr(), new._version, reader.range(full))


def as_read(tensors: dict, unchanged: dict) -> dict:
    """``tensors`` with each one that is still exactly as :func:`materialize` read it (the same memory, never
    written to since: torch counts in-place writes) replaced by its bytes' place in the source file, so that writing
    it copies file to file and never brings it into memory."""
    out = {}
    for k, t in tensors.items():
        seen = unchanged.get(k)
        same = (seen is not None and isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.data_ptr() == seen[0]
                and t._version == seen[1] and (t.dtype, tuple(t.shape)) == (seen[2].dtype, seen[2].shape))
        out[k] = seen[2] if same else t
    return out


# ---- the work folder ---------------------------------------------------------------------------------


# What a saved state holds, in the work folder's key: a work folder whose states another version of this code wrote
# (2: every decoder layer's own call arguments, where 1 held layer 0's) is never resumed.
STATE_FORMAT = 2


class WorkFolder:
    """``.OUT.llmquant-partial-KEY`` beside the output: the export's safetensors files, written a step at a time
    (:class:`ShardFiles`, in ``export/``), and for each finished step a small record written atomically once its
    tensors are in those files."""

    def __init__(self, out: Path, key: str):
        out = Path(out).absolute()
        self.path = out.parent / f".{out.name}.llmquant-partial-{key}"
        self.files: ShardFiles | None = None

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def open(self, files: ShardFiles | None = None) -> "WorkFolder":
        """Create the folder; with ``files`` (the process that writes), the export's files in it, unless a stopped
        run of the same recipe left them there (then its finished steps stand; files laid out otherwise, e.g. with
        another ``max_shard_size``, are started again)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.files = files
        if files is not None and not files.present(self.export_dir):
            for p in self.path.glob("*.done.json"):
                p.unlink()
            import shutil

            shutil.rmtree(self.export_dir, ignore_errors=True)
            self.export_dir.mkdir()
            files.create(self.export_dir, self.path.parent)
        return self

    def done(self, step: str) -> bool:
        return self._done(step).is_file()

    def _done(self, step: str) -> Path:
        return self.path / f"{step}.done.json"

    def save(self, step: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
        """The step's checkpoint tensors, written into the export's files, then what to remember of it, atomically."""
        self.files.put(self.export_dir, tensors)
        tmp = self.path / f"{step}.tmp.json"
        tmp.write_text(json.dumps({"tensors": list(tensors), "record": record}))
        os.replace(tmp, self._done(step))

    def record(self, step: str) -> dict:
        return json.loads(self._done(step).read_text())["record"]

    def written(self) -> set[str]:
        """The tensors of every finished step."""
        return {n for p in self.path.glob("*.done.json") for n in json.loads(p.read_text())["tensors"]}

    def link_export(self, folder: Path) -> list[str]:
        """The export's files, complete, into ``folder`` as hard links (copies where the filesystem cannot link): the
        work folder keeps them until the export is in place. Returns the files' names."""
        import shutil

        missing = set(self.files.places) - self.written()
        if missing:
            raise RuntimeError(f"the work folder {self.path} lacks tensor {sorted(missing)[0]} (of {len(missing)})")
        for name in self.files.heads:
            try:
                os.link(self.export_dir / name, folder / name)
            except OSError:
                shutil.copyfile(self.export_dir / name, folder / name)
        return self.files.write_index(folder)

    def save_state(self, layer: int, state: dict) -> None:
        """What the layer after ``layer`` starts from (calibration activations, the probe's hidden state)."""
        tmp = self.path / f"state{self._who()}.tmp.pt"
        torch.save(state, tmp)
        os.replace(tmp, self._state(layer))

    def saved_states(self) -> list[int]:
        """The layers whose state after them is saved (this process's)."""
        who = self._who()
        return sorted(int(p.name[len("state-after-"):len("state-after-") + 5])
                      for p in self.path.glob(f"state-after-?????{who}.pt"))

    def load_state(self, layer: int) -> dict:
        return torch.load(self._state(layer), weights_only=False)

    def drop_state(self, layer: int) -> None:
        self._state(layer).unlink(missing_ok=True)

    def _state(self, layer: int) -> Path:
        return self.path / f"state-after-{layer:05d}{self._who()}.pt"

    @staticmethod
    def _who() -> str:
        """Each process of a distributed run keeps its own share of the activations."""
        w = distributed.world_size()
        return f".rank{distributed.rank()}of{w}" if w > 1 else ""



# ---- the streamed run --------------------------------------------------------------------------------

# What a stopped run resumes from: the state after a layer (the calibration activations and the probe's hidden
# state). A small one (activations on disk are only pointed to) is saved after every layer; a large one (a 70B
# model's activations in memory: GBs) only while the time spent saving states stays within a tenth of the run's,
# so every few layers, and a resumed run makes the layers after the last one saved again.
STATE_ALWAYS_BYTES = 256 << 20
STATE_TIME_SHARE = 0.10


class StateWrites:
    """When to save the state after a layer (see :data:`STATE_TIME_SHARE`)."""

    def __init__(self, clock=time.perf_counter):
        self.clock, self.start, self.spent, self.last = clock, clock(), 0.0, 0.0

    def due(self, nbytes: int) -> bool:
        """Whether to save a state of ``nbytes`` now: small ones always, else when one more save (costing what the last
        did) keeps the saves within their share of the time so far (the first is always saved)."""
        return nbytes <= STATE_ALWAYS_BYTES or self.spent + self.last <= STATE_TIME_SHARE * (self.clock() - self.start)

    @contextmanager
    def timed(self):
        t = self.clock()
        yield
        self.last = self.clock() - t
        self.spent += self.last


def _state_bytes(state: dict) -> int:
    """Bytes of the tensors a saved state writes (activations on disk are written already: only pointed to)."""
    total = 0
    for v in state.values():
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _disk_generations(state: dict) -> list:
    return [w for w in (state.get("inputs"), state.get("float_inputs")) if isinstance(w, DiskWindows)]


class StreamedQuantizer:
    """Quantize a skeleton model layer by layer from ``reader`` into ``work``; see the module docstring."""

    def __init__(self, model: nn.Module, plan, reader: CheckpointReader, work: WorkFolder, device: torch.device,
                 probe_ids: torch.Tensor, calibrator=None, progress: bool = True, log=print):
        self.model, self.plan, self.reader, self.work = model, plan, reader, work
        self.device, self.probe_ids, self.calibrator = device, probe_ids, calibrator
        self.progress, self.log = progress, log
        self.entries = {e.name: e for e in plan.entries if e.scheme is not None}
        self.report: list[dict] = []
        self.resumed_from = 0
        self._chosen: dict = {}
        # without calibration: each quantized layer's checkpoint tensors, made as soon as it is chosen (its packed
        # codes take half the memory of the codes), until its decoder layer is written
        self._stored: dict[str, dict[str, torch.Tensor]] = {}
        # whether the probe ran without bitsandbytes' CPU repacking (see run), so the check can too
        self.lean_check = calibrator is None

    def run(self) -> torch.Tensor:
        """Quantize everything into the work folder; return the quantized model's logits on the probe input."""
        from .quantize import collect_tensors

        t0 = time.perf_counter()
        stack_name, layers = decoder_layers(self.model)
        n = len(layers)
        prefixes = [f"{stack_name}.{i}" for i in range(n)]
        start = 0
        if self.calibrator is not None:
            steady_heap()  # a calibrated layer's temporaries given back as they go (see memory.steady_heap)
        if self.calibrator is not None and self.calibrator.spec.activations == "disk":
            self.calibrator.activations_dir = self.work.path / f"activations{self.work._who()}"
            self._check_disk_space()
        while start < n and self.work.done(f"layer-{start:05d}"):
            start += 1
        # from the last saved state whose layers are all written (the layers after it are made again)
        start = max([j + 1 for j in self.work.saved_states() if j < start], default=0)
        if distributed.min_int(start) != start or distributed.min_int(-start) != -start:
            start = 0  # the processes of a distributed run resume together or not at all
        if start:
            state = self.work.load_state(start - 1)
            self.report = [r for r in (self.work.record(f"layer-{i:05d}").get("report") for i in range(start)) if r]
            self.resumed_from = start
            self.log(f"resuming from decoder layer {start} of {n} ({self.work.path})")
        else:
            start, state = 0, self._first_inputs(layers)
        if self.calibrator is not None:
            self.calibrator.calls = state["calib_calls"]
        saved = self.work.saved_states()  # (at most one: each save drops the one before)
        kept = _disk_generations(state) if start else []  # activations on disk the saved state points to
        writing = StateWrites()
        bar = tqdm(range(start, n), desc="quantizing", unit="layer", disable=not self.progress, initial=start, total=n)
        for i in bar:
            layer, prefix = layers[i], prefixes[i]
            blank = copy.deepcopy(layer)  # still on the meta device: what the layer goes back to once written
            # Tensors read from a file stay mapped, and the pages read stay counted in this process's memory, until
            # every tensor read through that opening of the file is freed. Without calibration each Linear weight is
            # read through its own opening just before it is quantized (_quantize_plain), so that its pages go
            # as soon as its bitsandbytes layer replaces it: the layer never sits in memory whole.
            linears = set() if self.calibrator is not None else {
                n[len(prefix) + 1:] + ".weight" for n in self.entries if n.startswith(prefix + ".")}
            materialize(layer, prefix, self.reader, self.device, skip=linears)
            self.reader.close()
            record: dict = {}
            t_layer = time.perf_counter()
            # activations on disk: this layer's inputs, dropped once it is done unless the saved state points to them
            previous = _disk_generations(state)
            if self.calibrator is not None:
                self.calibrator.store = torch.device("cpu")  # the device holds the layer and one window at a time
                self.calibrator.float_inputs = state.pop("float_inputs", None)
                rep = self.calibrator._layer(layer, i, prefix, state.pop("inputs"))
                state["inputs"] = rep.pop("_outputs")
                if self.calibrator.float_inputs is not None:
                    state["float_inputs"], self.calibrator.float_inputs = self.calibrator.float_inputs, None
                record["report"] = rep
                self.report.append(rep)
                bar.set_postfix_str(f"layer {i}: output error {rep['layer_rel_error']:.3%}")
            else:
                self._quantize_plain(prefix)
                # The probe is the quantized layer's first forward: it computes from the stored 4-bit layout, as the
                # check will compute the reloaded model, which then needs no repacked copy of its weights in memory.
                # (A calibrator has already run the layer, repacked on AVX512-BF16 CPUs: the check then repacks too.)
                without_cpu_repacking(layer)
            state["probe"] = call_layer(layer, state["probe"].to(self.device), state["probe_calls"].of(0, i), self.device).cpu()
            give_memory_back()  # the forward's temporaries (bitsandbytes dequantizes each weight to multiply)
            record["seconds"] = round(time.perf_counter() - t_layer, 2)
            if "report" in record:
                record["report"]["seconds"] = record["seconds"]
            chosen = self.chosen()
            tensors = collect_tensors(self.model, self.plan, chosen, under=prefix, stored=self._stored)
            for made in (chosen, self._stored):
                for name in [k for k in made if k.startswith(prefix + ".")]:
                    del made[name]  # written: the quantized model never accumulates in memory
            layers[i] = blank
            unlink(layer)
            del layer
            give_memory_back(self.device)
            due = writing.due(_state_bytes(state))
            if distributed.active():
                due = distributed.from_rank(due, 0)  # the processes save (and so resume) together
            if due:
                with writing.timed():
                    self.work.save_state(i, state)
            if distributed.rank() == 0:
                self.work.save(f"layer-{i:05d}", tensors, record)  # done; resumed from the last saved state before it
            del tensors  # written: not held while the next layer is calibrated
            if due:
                for j in saved:
                    self.work.drop_state(j)
                saved, gone, kept = [i], kept + previous, _disk_generations(state)
            else:
                gone = [w for w in previous if all(w.folder != k.folder for k in kept)]
            for w in gone:
                drop_windows(w)
        distributed.barrier()
        if distributed.rank() != 0:
            self.seconds = time.perf_counter() - t0
            return None  # process 0 writes and checks
        logits = self._rest(layers, prefixes, state["probe"])
        self.seconds = time.perf_counter() - t0
        return logits

    def _check_disk_space(self) -> None:
        """Refuse, before any work, activations on disk that the work folder's filesystem has no room for: each
        generation is this process's windows x seqlen x hidden size in the model's dtype, and up to three are on disk
        at once (five when tuning toward the float model carries its activations too), beside the export's files."""
        import shutil

        from .report import human_bytes

        c = self.calibrator
        windows = c.windows[distributed.share(len(c.windows))]
        generation = _nbytes(self.plan.model_dtype, (*windows.shape, getattr(self.model.config, "hidden_size", 0)))
        need = generation * (5 if c.tracks_float_model() else 3)
        export = self.work.files.nbytes if self.work.files is not None else 0  # its files' holes, still to be written
        free = shutil.disk_usage(self.work.path).free
        if need + export > free:
            raise UserError(f"calibration.activations: disk needs about {human_bytes(need)} in {self.work.path.parent} "
                            f"besides the export's {human_bytes(export)}, and {human_bytes(free)} are free; free some space, "
                            "or use fewer calibration windows or activations: memory")

    def chosen(self) -> dict:
        """The chosen weights not yet written (the calibrator keeps its own)."""
        return self.calibrator.chosen if self.calibrator is not None else self._chosen

    def _quantize_plain(self, prefix: str) -> None:
        from .backends.bnb import checkpoint_tensors
        from .quantize import install, quantize_layer
        from .quantized import KeptWeight

        for name, e in self.entries.items():
            if name.startswith(prefix + "."):
                materialize(self.model.get_submodule(name), name, self.reader, self.device, only={"weight"})
                self.reader.close()
                qw = quantize_layer(self.model.get_submodule(name), e, self.plan.model_dtype)
                install(self.model, e, qw, self.plan.model_dtype)
                if isinstance(qw, KeptWeight):
                    self._chosen[name] = qw  # (no smaller as checkpoint tensors, and GPT-2's Conv1D stores it transposed)
                else:
                    self._stored[name] = checkpoint_tensors(qw, "")
                del qw
                give_memory_back()  # the quantizer's temporaries, before the next module's

    def _materialize_outside(self, layers, unchanged: dict | None = None) -> list[str]:
        return materialize_outside(self.model, layers, self.reader, self.device, unchanged)

    def _first_inputs(self, layers) -> dict:
        """Embed the probe (and the calibration windows): the first decoder layer's inputs and call arguments."""
        outside = self._materialize_outside(layers)
        try:
            hidden, calls = capture(self.model, layers, [self.probe_ids], self.device, store="cpu")
            state = {"probe": hidden[0], "probe_calls": calls}
            if self.calibrator is not None:
                self.calibrator.store = torch.device("cpu")
                inputs, calls = self.calibrator._capture_inputs(layers)
                state.update(inputs=inputs, calib_calls=calls)
                if self.calibrator.tracks_float_model():
                    state["float_inputs"] = list(inputs) if isinstance(inputs, list) else inputs.copy(inputs.folder.parent / "float-inputs")
            return state
        finally:
            release(self.model, outside)

    def _rest(self, layers, prefixes, hidden) -> torch.Tensor:
        """Everything outside the decoder layers: quantized (head) or copied, written; and the probe's logits."""
        from .algorithms import ALGORITHMS
        from .quantize import collect_tensors
        from .quantize import install, layer_weight

        unchanged: dict = {}
        outside = self._materialize_outside(layers, unchanged)
        chosen = self.chosen()
        for name, e in self.entries.items():
            if any(name.startswith(p + ".") for p in prefixes):
                continue
            method = "rtn" if ALGORITHMS[e.method].calibrated else e.method
            if method != e.method:
                self.log(f"{name}: outside the decoder layers, quantized with {method}")
            qw = ALGORITHMS[method].quantize(layer_weight(self.model.get_submodule(name)).detach(), e.scheme, self.plan.model_dtype)
            install(self.model, e, qw, self.plan.model_dtype)
            chosen[name] = qw
        if self.lean_check:
            without_cpu_repacking(self.model)
        logits = logits_after_layers(self.model, layers, self.probe_ids.to(self.device), hidden.to(self.device))
        # the embeddings (and a head kept in float) are copied file to file: only the probe's rows were read
        self.work.save("rest", as_read(collect_tensors(self.model, self.plan, chosen, outside=prefixes), unchanged), {})
        release(self.model, outside)
        return logits


def outside_modules(model: nn.Module, layers) -> list[str]:
    """Modules holding tensors outside the decoder layers (embeddings, final norm, head), outermost names."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    names = []
    for n, m in model.named_modules():
        if not n or id(m) in inside or any(n.startswith(p + ".") for p in names):
            continue
        if any(True for _ in m.parameters(recurse=False)) or any(
                b not in m._non_persistent_buffers_set for b, _ in m.named_buffers(recurse=False)):
            names.append(n)
    return names


def materialize_outside(model: nn.Module, layers, reader: CheckpointReader, device, unchanged: dict | None = None) -> list[str]:
    """Read everything outside the decoder layers onto ``device`` (tied weights tied again); returns the modules'
    names, for :func:`release`."""
    outside = outside_modules(model, layers)
    for n in outside:
        materialize(model.get_submodule(n), n, reader, device, unchanged=unchanged)
    reader.close()
    model.tie_weights()
    return outside


def release(model: nn.Module, names: list[str]) -> None:
    """Give back the memory of the modules :func:`materialize_outside` read; tied weights stay one parameter (each
    module's given back on its own would leave a head and its embeddings two, and both would be written)."""
    for n in names:
        _release(model, n)
    model.tie_weights()


@contextmanager
def source_layer(model: nn.Module, stack: str, i: int, reader: CheckpointReader, device):
    """Decoder layer ``i`` of a skeleton read from the checkpoint while in use, then given back."""
    layers = model.get_submodule(stack)
    layer, blank = layers[i], copy.deepcopy(layers[i])
    materialize(layer, f"{stack}.{i}", reader, device)
    reader.close()
    try:
        yield layer
    finally:
        layers[i] = blank
        del layer
        give_memory_back(device)


def _release(model: nn.Module, name: str) -> None:
    """Give a module's memory back: parameters and persistent buffers to the meta device."""
    from accelerate.utils import set_module_tensor_to_device

    m = model.get_submodule(name)
    for n in state_names(m):
        set_module_tensor_to_device(m, n, "meta")


# ---- the written checkpoint, reloaded one layer at a time ---------------------------------------


class LayeredReload:
    """A written checkpoint reloaded as plain transformers loads it, but one decoder layer at a time.

    ``from_pretrained`` loads the model cut to its first decoder layer (config ``num_hidden_layers=1``): the
    config, the ``quantization_config``, the embeddings, the final norm, the head and layer 0 go through
    transformers' own loading, which must find every tensor it expects (the other layers' tensors are the only
    ones it may leave). Every other layer is built as transformers builds it (its quantizer turns a skeleton's
    Linear layers into the checkpoint's bitsandbytes modules) and filled from the files with the deserializers
    transformers calls (``Params4bit.from_prequantized``, ``Int8Params`` with ``SCB``), run, and freed.
    Memory: the model outside its decoder layers, plus one layer.
    """

    def __init__(self, folder: Path, dtype: torch.dtype, device, without_repacking: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from . import hf_integration  # noqa: F401  (registers the llmquant format)
        from .compat import internal

        self.folder, self.device, self.without_repacking = Path(folder), torch.device(device), without_repacking
        config = AutoConfig.from_pretrained(str(folder))
        self.skeleton = skeleton(config, dtype)  # with the checkpoint's quantization_config, as transformers builds it
        self.stack, self.layers = decoder_layers(self.skeleton)
        quantizer = internal("transformers.quantizers.auto:AutoHfQuantizer").from_config(config.quantization_config, pre_quantized=True)
        quantizer.preprocess_model(model=self.skeleton, dtype=dtype, device_map={"": str(self.device)},
                                   checkpoint_files=None, use_kernels=False)
        first = copy.deepcopy(config)
        first.num_hidden_layers = 1
        if isinstance(getattr(first, "layer_types", None), list):
            first.layer_types = first.layer_types[:1]
        others = tuple(f"{self.stack}.{i}." for i in range(1, len(self.layers)))
        qcfg = first.quantization_config
        if isinstance(qcfg, dict) and qcfg.get("quant_method") == LLMQUANT_METHOD:  # names only layers it has
            first.quantization_config = {**qcfg, "groups": [{**g, "modules": [m for m in g["modules"] if not m.startswith(others)]}
                                                            for g in qcfg.get("groups", [])]}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the other layers' tensors are reported as unexpected: they are
        try:
            self.model, info = AutoModelForCausalLM.from_pretrained(
                str(folder), config=first, dtype=dtype, device_map={"": str(self.device)}, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        problems = [f"missing {k}" for k in info.get("missing_keys", [])]
        problems += [f"wrong shape {k[0] if isinstance(k, tuple) else k}" for k in info.get("mismatched_keys", [])]
        problems += [f"unexpected {k}" for k in info.get("unexpected_keys", []) if not k.startswith(others)]
        if problems:
            raise ValueError(f"{len(problems)} tensor(s) not as the model expects, e.g. {', '.join(sorted(problems)[:3])}")
        self.model.eval()
        if without_repacking:
            without_cpu_repacking(self.model)
        # The skeleton becomes the whole model: the loaded modules outside the decoder layers and layer 0 in place of its
        # empty ones, the other layers filled while in use. Its forward is the model's own with every layer (so each
        # layer gets its own mask and rotary embeddings; the loaded model's config names one layer alone).
        for name in outside_modules(self.skeleton, self.layers):
            self.skeleton.set_submodule(name, self.model.get_submodule(name))
        self.layers[0] = self.model.get_submodule(self.stack)[0]
        self.reader = CheckpointReader(self.folder)
        give_memory_back()  # what loading left on the heap

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` (1 or more) built and filled as transformers would (on the meta device until now)."""
        import bitsandbytes as bnb

        prefix = f"{self.stack}.{i}"
        layer = self.layers[i]
        filled = set()
        for name, m in layer.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if isinstance(m, bnb.nn.Linear4bit):
                stats = {k[len(full) + 1:]: self.reader.get(k).to(self.device) for k in self._keys(full + ".weight.")}
                m._parameters["weight"] = bnb.nn.Params4bit.from_prequantized(
                    self.reader.get(full + ".weight").to(self.device), stats, requires_grad=False, device=self.device, module=m)
            elif isinstance(m, bnb.nn.Linear8bitLt):
                kw = dict(m.weight.__dict__)
                kw["SCB"] = self.reader.get(full + ".SCB").to(self.device)
                m._parameters["weight"] = bnb.nn.Int8Params(self.reader.get(full + ".weight").to(self.device), requires_grad=False,
                                                            **kw).to(self.device)  # sets CB, as in transformers
            else:
                continue
            filled.add(f"{name}.weight" if name else "weight")
        missing = [n for n in state_names(layer) if n not in filled and f"{prefix}.{n}" not in self.reader.where]
        if missing:
            raise ValueError(f"tensor {prefix}.{missing[0]} is not in the files")
        materialize(layer, prefix, self.reader, self.device, skip=filled)
        self.reader.close()
        layer.eval()
        if self.without_repacking:
            without_cpu_repacking(layer)
        return layer

    def _keys(self, start: str) -> list[str]:
        return [k for k in self.reader.where if k.startswith(start)]

    @contextmanager
    def layer(self, i: int, compare=None):
        """Decoder layer ``i`` in place while in use (``compare(model, prefix)`` sees it first), then given back."""
        if i == 0:  # loaded by from_pretrained with the model; compared before its forward, as every layer
            if compare is not None:
                compare(self.model, f"{self.stack}.0")
            yield self.model.get_submodule(self.stack)[0]
            return
        # what goes back in place once the layer has run (bitsandbytes' parameters cannot be deep-copied on meta)
        blank = [(m, store, k, v) for m in self.layers[i].modules() for store in ("_parameters", "_buffers")
                 for k, v in getattr(m, store).items() if v is not None]
        layer = self.load_layer(i)
        try:
            if compare is not None:
                compare(self.skeleton, f"{self.stack}.{i}")
            yield layer
        finally:
            for m, store, k, v in blank:
                getattr(m, store)[k] = v
            for m in layer.modules():  # what the loading and the forward attached to the modules
                if getattr(m, "quant_state", None) is not None:
                    m.quant_state = None  # Params4bit.from_prequantized: the layer's scales
                if getattr(getattr(m, "state", None), "CB", None) is not None:
                    m.state.CB = m.state.SCB = None  # Linear8bitLt's forward: the int8 weight and its scales
            del layer
            give_memory_back(self.device)

    def logits(self, batches: list[torch.Tensor], compare=None, desc: str | None = None):
        """The reloaded model's logits on each batch of token ids, computed one reloaded layer at a time (all
        batches through layer 0, then layer 1, ...). ``compare(model, prefix)``, when given, is called with each
        layer in place before its forward (which may repack a layer's weights on the CPU), and with ``prefix`` None for
        the model outside its decoder layers once all batches are through (the forward reads the embeddings' rows for
        its tokens alone, the comparison all of them: so they are not held in memory while the layers run)."""
        yield from logits_layer_by_layer(self.skeleton, self.stack, len(self.layers), batches,
                                         lambda i: self.layer(i, compare), self.device, desc)
        # the pages the forward read of tensors that are views of the file (the embeddings' rows for its tokens; a
        # head that maps the file gave its own back a slice at a time), before the comparison reads the embeddings
        give_file_pages_back([*self.model.parameters(), *self.model.buffers()])
        if compare is not None:
            compare(self.model, None)

    def run(self, ids: torch.Tensor, compare=None) -> torch.Tensor:
        """Logits on ``ids`` (see :meth:`logits`)."""
        return list(self.logits([ids], compare))[0]

    def close(self) -> None:
        self.reader.close()
