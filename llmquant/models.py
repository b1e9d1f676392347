"""Loading models and tokenizers: a Hub id, a local folder, a GGUF file, or ``asset:NAME``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import assets
from .errors import UserError

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "folder" | "gguf"
    location: str  # Hub id or local folder
    gguf_file: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        where = self.location if self.gguf_file is None else f"{self.location}/{self.gguf_file}"
        return f"{where}@{self.revision}" if self.revision else where

    def short_name(self) -> str:
        if self.kind == "hub":
            return self.location
        return Path(self.gguf_file).stem if self.gguf_file else Path(self.location).name

    def from_pretrained_kwargs(self) -> dict:
        kw: dict = {}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if self.revision:
            kw["revision"] = self.revision
        return kw


def resolve_source(source: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    """Decide what kind of location ``source`` is, without loading anything."""
    source = assets.resolve(source)
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"model {source!r} is a file but not a .gguf file; give a folder, a Hub id or a .gguf file")
        if gguf_file:
            raise UserError("model.gguf_file names a file inside model.source, which is already a .gguf file")
        return ModelSource("gguf", str(p.parent), p.name, None)
    if p.is_dir():
        if gguf_file and not (p / gguf_file).is_file():
            raise UserError(f"model.gguf_file {gguf_file!r} not found in folder {source!r}")
        if not gguf_file and not (p / "config.json").is_file():
            raise UserError(f"model folder {source!r} has no config.json (is it a transformers checkpoint?)")
        return ModelSource("gguf" if gguf_file else "folder", str(p), gguf_file, None)
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(".gguf")
    if looks_like_path or not HUB_ID_RE.match(source):
        raise UserError(f"model {source!r} does not exist as a file or folder and is not a Hub id (org/name)")
    return ModelSource("hub", source, gguf_file, revision)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but no CUDA GPU is visible; use device: cpu or auto")
    return d


def resolve_dtype(name: str, src: ModelSource, config, device: torch.device | None = None) -> torch.dtype:
    """``auto``: the checkpoint's own dtype; where it has none (a GGUF file, which transformers dequantizes), float32
    on CPU and bfloat16 on a GPU that computes in it."""
    if name != "auto":
        return TORCH_DTYPES[name]
    d = None if src.kind == "gguf" else getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = TORCH_DTYPES.get(d)
    if d in TORCH_DTYPES.values():
        return d
    gpu = device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if gpu else torch.float32


def load_config(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.location, trust_remote_code=trust_remote_code, **src.from_pretrained_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the config of {src.describe()}: {_first_line(e)}") from None


def load_model(src: ModelSource, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               quantization_config=None, allow_quantized: bool = False, allow_pickle: bool = False,
               max_memory: dict | None = None, offload_folder: Path | None = None):
    """Load a causal LM and its tokenizer (eval mode, no grad).

    Returns ``(model, tokenizer)``. A GGUF file is dequantized to float by transformers;
    the GGUF quantization marker is removed so the model is an ordinary float model.
    A checkpoint that is already quantized is refused unless ``allow_quantized``
    (evaluation loads llmquant and stock bitsandbytes checkpoints alike);
    ``quantization_config`` quantizes while loading (stock ``load_in_4bit``). ``max_memory`` (accelerate's: device ->
    bytes) spreads the model with ``device_map="auto"``, what does not fit going to ``offload_folder`` on disk.
    """
    from transformers import AutoModelForCausalLM

    from . import hf_integration  # noqa: F401  (llmquant checkpoints load too)

    config = load_config(src, trust_remote_code)
    dev = pick_device(device)
    torch_dtype = resolve_dtype(dtype, src, config, dev)
    kw = src.from_pretrained_kwargs()
    if src.kind == "folder" and not allow_pickle and not list(Path(src.location).glob("*.safetensors")):
        if list(Path(src.location).glob("*.bin")) or list(Path(src.location).glob("*.pt")):
            raise UserError(
                f"model folder {src.location!r} has only pickle weights (.bin), which can run code when loaded; "
                "convert them to safetensors or set model.allow_pickle: true"
            )
    if src.kind != "gguf" and not allow_pickle:
        kw["use_safetensors"] = True  # never unpickle weights unless asked
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
        kw.setdefault("device_map", {"": str(dev)})
    if dev.type == "cuda":
        kw["device_map"] = "auto" if device == "auto" and torch.cuda.device_count() > 1 else {"": str(dev)}
    if max_memory is not None:
        kw.update(device_map="auto", max_memory=max_memory, offload_folder=str(offload_folder))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.location, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kw
        )
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {src.describe()}: {_first_line(e)}") from None
    except Exception as e:
        if type(e).__name__ == "SafetensorError":  # a truncated or corrupted weights file
            raise UserError(f"could not load model {src.describe()}: {_damaged_file(src)}{_first_line(e)}; "
                            "download or save the checkpoint again") from None
        raise
    if dev.type != "cuda" and dev.type != "cpu":
        model.to(dev)
    if src.kind == "gguf":
        _forget_gguf(model)
    if getattr(model, "hf_quantizer", None) is not None and not allow_quantized and quantization_config is None:
        method = model.hf_quantizer.quantization_config.quant_method
        raise UserError(f"model {src.describe()} is already quantized ({method}); give a float checkpoint")
    model.eval().requires_grad_(False)
    return model, load_tokenizer(src, trust_remote_code)


def _damaged_file(src: ModelSource) -> str:
    """'file X is damaged: ' for the first local safetensors file whose header cannot be read."""
    from safetensors import safe_open

    if src.kind != "folder":
        return ""
    for f in sorted(Path(src.location).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception:
            return f"{f.name} is damaged: "
    return ""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(src: ModelSource) -> bool:
    """False for a local folder with no tokenizer files (Hub repos and GGUF files are assumed to have one)."""
    return src.kind != "folder" or any((Path(src.location) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    """The model's tokenizer, or None for a local folder that has none (quantization alone needs none)."""
    from transformers import AutoTokenizer

    if not has_tokenizer(src):
        return None
    try:
        return AutoTokenizer.from_pretrained(src.location, trust_remote_code=trust_remote_code, **src.from_pretrained_kwargs())
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"could not load the tokenizer of {src.describe()}: {_first_line(e)}") from None


def _forget_gguf(model) -> None:
    """A GGUF file loads as a float model still marked as GGUF-quantized; drop the marker."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def fingerprint(src: ModelSource, config=None) -> str | None:
    """A short hash identifying a checkpoint's weights (None when it cannot be told, e.g. a Hub
    model without a known commit). Local files are sampled (size, first and last MiB), not read whole."""
    import hashlib

    h = hashlib.sha256()
    if src.kind == "hub":
        commit = getattr(config, "_commit_hash", None) if config is not None else None
        if not commit:
            return None
        h.update(f"hub:{src.location}:{commit}:{src.gguf_file}".encode())
        return h.hexdigest()[:16]
    folder = Path(src.location)
    if src.gguf_file:
        files = [folder / src.gguf_file]
    else:
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]
    for f in files:
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
