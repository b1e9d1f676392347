"""The YAML recipe: a strict schema, loading with one-line errors, and dumping.

A recipe round-trips: ``Recipe.from_yaml(r.to_yaml()) == r``. Every key is a field
name below; an unknown key, a bad value or a duplicate key is a :class:`UserError`
naming the key path and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .data import TextSpec
from .errors import UserError, read_utf8
from .schemes import FORMAT_NAMES, FourBit, Int8, Keep, Scheme, StrictModel, parse_scheme

RECIPE_VERSION = 1
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|xpu|xpu:\d+|mps)$")
MODEL_DTYPES = ("auto", "float32", "float16", "bfloat16")


def parse_size(value: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``1000`` -> bytes (decimal units, as the Hub uses)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB)?\s*", str(value), re.I)
    if not m:
        raise ValueError(f"{value!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(m.group(1)) * units[(m.group(2) or "B").lower()])


class ModelSpec(StrictModel):
    # A Hub id ("org/name"), a local folder, a .gguf file, or "asset:NAME" (a model
    # llmquant fetches and caches itself, see `llmquant assets`).
    source: str
    # A GGUF file inside `source` (a Hub repo or folder) to load instead of safetensors.
    gguf_file: str | None = None
    # Hub branch, tag or commit.
    revision: str | None = None
    # Floating type the model is loaded and computed in; "auto" takes the checkpoint's own.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # Run Python code shipped with the checkpoint. Off unless you trust its author.
    trust_remote_code: bool = False
    # Also read pickle weight files (.bin/.pt), which can run code when loaded. Off: safetensors only.
    allow_pickle: bool = False

    @field_validator("source")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a Hub id, a local folder, a .gguf file or asset:NAME")
        return v


class Rule(StrictModel):
    """One `quantization.rules` entry: module-name patterns and the format they get."""

    # Module-name patterns: shell-style globs on the full name ("*.mlp.*"), or "re:REGEX"
    # (matched against the whole name). A string or a list of strings.
    match: list[str]
    # How weights are chosen for these modules; defaults to `quantization.method`.
    method: str | None = None
    scheme: Scheme

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("a rule is a mapping with 'match' and 'format' keys")
        if "scheme" in data:  # already in internal form (model_validate of a dumped rule)
            return data
        data = dict(data)
        if "match" not in data:
            raise ValueError("missing key 'match' (the module-name patterns this rule applies to)")
        if "format" not in data:
            raise ValueError(f"missing key 'format'; allowed formats: {', '.join(FORMAT_NAMES)}")
        match = data.pop("match")
        out: dict[str, Any] = {"match": [match] if isinstance(match, str) else match}
        if "method" in data:
            out["method"] = data.pop("method")
        fmt = data.get("format")
        scheme_cls = {"int8": Int8, "nf4": FourBit, "fp4": FourBit}.get(fmt, Keep)
        unknown = [k for k in data if k not in scheme_cls.model_fields]
        if unknown and fmt in FORMAT_NAMES:
            allowed = ", ".join(["match", "method", *scheme_cls.model_fields])
            raise ValueError(f"unknown key {unknown[0]!r} for format {fmt}; allowed keys: {allowed}")
        out["scheme"] = data
        return out

    @field_validator("match")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one pattern")
        for p in v:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"bad regular expression {p!r}: {e}") from None
        return v

    def to_yaml_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"match": self.match[0] if len(self.match) == 1 else list(self.match)}
        if self.method is not None:
            d["method"] = self.method
        d.update(self.scheme.model_dump())
        return d


class AutoSpec(StrictModel):
    """Let llmquant choose the format of every layer no rule pins, for a size budget (see llmquant.auto)."""

    # The budget, one of: average stored bits per weight over the formatted Linear layers (scales
    # included, as llmquant reports it), the checkpoint's size ("4GB"), or a quality target: the
    # smallest mix whose mean KL divergence from the float model (nats per token, measured on the
    # sensitivity windows of calibration text) is at most this.
    bits_per_weight: float | None = Field(None, gt=0, le=32)
    max_size: str | None = None
    kl: float | None = Field(None, gt=0)
    # Formats to choose from (default: NF4 at block 32/64/128/256 with and without double
    # quantization, INT8, and the layer kept in the model's dtype).
    candidates: list[Scheme] | None = None
    # "transformers": only mixes stock transformers loads without llmquant (4-bit formats and
    # float layers in the model's dtype; INT8 candidates are dropped beside 4-bit ones).
    loadable_by: Literal["any", "transformers"] = "any"
    # Calibration windows (the first of calibration's) run forward and backward to measure sensitivity.
    windows: int = Field(32, ge=1)

    @field_validator("candidates", mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return [parse_scheme(x) for x in v] if isinstance(v, list) else v

    @field_validator("max_size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None and parse_size(v) <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> "AutoSpec":
        if sum(x is not None for x in (self.bits_per_weight, self.max_size, self.kl)) != 1:
            raise ValueError("give one budget: bits_per_weight (e.g. 4.5), max_size (e.g. 4GB) or kl (e.g. 0.02)")
        if self.candidates is not None and not self.candidates:
            raise ValueError("candidates: give at least one format")
        return self


class Quantization(StrictModel):
    # Format of every Linear layer no rule matches.
    default: Scheme = Field(default_factory=lambda: FourBit(format="nf4"))
    # Ordered (first match wins): module-name patterns -> format.
    rules: list[Rule] = Field(default_factory=list)
    # Patterns of layers left exactly as they are (in the model's dtype). Empty list:
    # ignore nothing. Not given: the output head (lm_head), which is the usual choice.
    ignore: list[str] | None = None
    # How weights are chosen: "rtn" (round to nearest, what bitsandbytes itself does), or a
    # calibrated method (scale_search, gptq, awq, awq+gptq, tune, gptq+tune; needs a calibration section).
    method: str = "rtn"
    # Choose the formats of the layers no rule pins for a budget (needs a calibration section).
    auto: AutoSpec | None = None

    @field_validator("default", mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return parse_scheme(v)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return check_method(v)

    @model_validator(mode="after")
    def _rule_methods(self) -> "Quantization":
        for r in self.rules:
            if r.method is not None:
                check_method(r.method)
        return self


def check_method(name: str) -> str:
    from .algorithms import ALGORITHMS

    if name not in ALGORITHMS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(ALGORITHMS)}")
    return name


class Output(StrictModel):
    # Folder the quantized checkpoint is written to (relative to the current directory).
    dir: str
    # Replace a non-empty `dir`. Without it, llmquant refuses and touches nothing.
    overwrite: bool = False
    # Largest safetensors shard; bigger checkpoints are split with an index file.
    max_shard_size: str = "5GB"

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        if parse_size(v) <= 0:
            raise ValueError("must be positive")
        return str(v)


class GPTQOptions(StrictModel):
    # Added to H's diagonal, as a fraction of its mean (numerical stability).
    damp: float = Field(0.01, gt=0, le=1)
    # Quantize inputs in decreasing order of their energy (block scales then fixed up front).
    act_order: bool = True


class SearchOptions(StrictModel):
    # Scales tried per block (4-bit) or row (int8): absmax * [min_ratio, 1], at least as finely
    # as `grid` even steps (4-bit blocks: a coarse grid, then refined around each block's best).
    grid: int = Field(20, ge=1, le=200)
    min_ratio: float = Field(0.5, gt=0, le=1)


class AWQOptions(StrictModel):
    # Exponents alpha tried for s = mean|x|^alpha (0 = no scaling, always a candidate).
    grid: int = Field(20, ge=1, le=200)
    # Calibration tokens kept per layer for the int8 (LLM.int8 simulation) objective.
    tokens: int = Field(4096, ge=64)


class TuneOptions(StrictModel):
    # Signed-gradient steps per decoder layer (methods tune and gptq+tune).
    steps: int = Field(100, ge=1, le=100000)
    # Step size of the rounding offsets, decaying linearly to 0 (scale factors take a tenth of it);
    # default 0.25 / steps (an offset then moves at most an eighth of a code in all: larger steps fit
    # the calibration windows better and held-out text worse, measured on SmolLM2).
    lr: float | None = Field(None, gt=0, le=1)
    # Calibration windows per step (drawn in a shuffled order fixed by calibration.seed).
    batch: int = Field(1, ge=1)
    # What a tuned layer's outputs are brought to: "model", the float model's own outputs at that
    # layer (so tuning also corrects the error the previous layers left; one more copy of the
    # activations is kept); or "layer", the float layer's outputs on the same inputs (the quantized
    # previous layers' outputs). "model" measured 15% less KL on SmolLM2 at equal perplexity.
    target: Literal["layer", "model"] = "model"
    # What is tuned at once: "layer", every quantized Linear layer of a decoder layer together; "group", one group of
    # Linear layers reading the same inputs after the other (q/k/v, o, gate/up, down in a Llama layer), each for all
    # the steps, the others computing with their weights as chosen so far: only that group's tuning state is held
    # (about 42 bytes per weight), the others' 20 bytes per weight; groups-times the steps, each cheaper (about 1.5 times
    # the time on SmolLM2; there a lower KL, but a higher perplexity on part of the held-out text: docs/methods.md).
    # For layers whose state does not fit in memory.
    scope: Literal["layer", "group"] = "layer"
    # Steps of an end-to-end stage after the last decoder layer (0: none; any calibrated method): the stored scales
    # of every quantized layer of the decoder layers (codes fixed) tuned together, by Adam, so that the quantized
    # model's next-token distribution on the calibration windows matches the float model's (KL over its 64 most
    # likely tokens and the rest), `batch` windows per step. Each step is a forward and backward pass of the whole
    # model, so the model is loaded whole (not streamed) for it.
    model_steps: int = Field(0, ge=0, le=100000)
    # Adam's step size for the end-to-end stage's scale factors (decaying to 0 on a cosine).
    model_lr: float = Field(5e-4, gt=0, le=1)


class CalibrationSpec(StrictModel):
    """Data for calibrated methods (scale_search, gptq, awq, awq+gptq, tune, gptq+tune)."""

    # Calibration text; by default it must not overlap the evaluation text (a warning says when it does).
    text: TextSpec = Field(default_factory=lambda: TextSpec(source="wikitext2"))
    # Random windows of `seqlen` tokens (fixed seed), as the GPTQ paper samples them.
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=8)
    seed: int = 0
    # How many of the nsamples windows are sampled from the float model itself instead of drawn from the text (as
    # LLM-QAT makes data-free training data): they carry what the model knows beyond the calibration text. All of
    # them: no text is read (data-free). The model is loaded whole for it (not streamed).
    generated: int = Field(0, ge=0)
    # Re-measure each group of layers' inputs after the layers before it in the same
    # decoder layer are quantized. Slower, and it has not been shown to help here, so it is
    # off unless asked for (scripts/bench_quality.py --true-sequential compares).
    true_sequential: bool = False
    # Where the windows' activations wait between decoder layers of a streamed run: "memory" (the CPU's RAM), or
    # "disk" (one file per window in the work folder beside the output, read back one window at a time), for when
    # they do not fit: nsamples x seqlen x hidden size x 2 bytes, two to three such copies (a 70B model, 128 windows
    # of 2048 tokens: 4.3 GB each). A model loaded whole keeps them in memory.
    activations: Literal["memory", "disk"] = "memory"
    gptq: GPTQOptions = Field(default_factory=GPTQOptions)
    scale_search: SearchOptions = Field(default_factory=SearchOptions)
    awq: AWQOptions = Field(default_factory=AWQOptions)
    tune: TuneOptions = Field(default_factory=TuneOptions)

    @model_validator(mode="after")
    def _generated_within_nsamples(self) -> "CalibrationSpec":
        if self.generated > self.nsamples:
            raise ValueError(f"calibration.generated {self.generated} is more than calibration.nsamples {self.nsamples}: "
                             "allowed 0 to nsamples (all: no text is read)")
        return self


class EvalSpec(StrictModel):
    """How models are evaluated: the same protocol for the baseline and every quantized model."""

    # What perplexity and divergence are measured on (see llmquant.data).
    text: TextSpec = Field(default_factory=lambda: TextSpec(source="wikitext2"))
    # "windows": non-overlapping windows (the GPTQ/AWQ papers); "sliding": the transformers guide.
    protocol: Literal["windows", "sliding"] = "windows"
    # Tokens per window.
    seqlen: int = Field(2048, ge=8)
    # Sliding protocol: tokens between window starts (default seqlen / 2).
    stride: int | None = Field(None, ge=1)
    # Evaluate only the first max_tokens tokens of the text (all when not given).
    max_tokens: int | None = Field(None, ge=8)
    # Windows per forward pass; auto: 1 on a CPU (batching does not help there), 8 on a GPU.
    batch_size: int | Literal["auto"] = "auto"
    # KL divergence and top-1 agreement of the quantized model against the baseline.
    divergence: bool = True
    # Tokens the divergence is measured on (the baseline's log-probabilities are kept
    # on disk for these: tokens x vocabulary x 2 bytes).
    divergence_tokens: int = Field(8192, ge=1)
    # lm-evaluation-harness tasks (any lm-eval name, or llmquant's offline botchan_* tasks).
    tasks: list[str] = Field(default_factory=list)
    # Examples per task (all when not given).
    task_limit: int | None = Field(None, ge=1)
    task_batch_size: int = Field(8, ge=1)
    num_fewshot: int = Field(0, ge=0)
    # When the model is streamed (never whole in memory), lm-eval tasks load it whole: a float
    # baseline that does not fit in this much of the device's memory ("40GB", "500MB"; default:
    # what is free there) has the rest offloaded by accelerate, to CPU memory, then disk.
    tasks_max_memory: str | int | None = None
    # Evaluate the unquantized model too (needed for deltas and divergence).
    baseline: bool = True

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be a positive number of windows or auto")
        return v

    @field_validator("tasks_max_memory")
    @classmethod
    def _memory(cls, v):
        if v is not None and parse_size(v) <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _stride(self) -> "EvalSpec":
        if self.stride is not None and self.protocol != "sliding":
            raise ValueError("stride goes with protocol: sliding")
        if self.stride is not None and self.stride > self.seqlen:
            raise ValueError(f"stride {self.stride} is larger than seqlen {self.seqlen}")
        return self


REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubSpec(StrictModel):
    """Push the export to the Hugging Face Hub when the run succeeds (token: HF_TOKEN or `hf auth login`)."""

    # The model repository, "user/name" or "org/name" (created when missing).
    repo: str
    private: bool = False
    # Branch to commit to (created when missing); the default branch when not given.
    revision: str | None = None
    commit_message: str | None = None

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        if not REPO_ID_RE.match(v):
            raise ValueError(f"{v!r} is not a Hub repository id; write user/name")
        return v


class BenchSpec(StrictModel):
    """Speed of the export where it runs (see llmquant.bench), measured at the end of the run."""

    # Rows per batch; each batch size is measured separately.
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1], min_length=1)
    # Prompt length in tokens (prefilled), and tokens generated greedily after it (KV cache on).
    prompt_tokens: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=2)
    # Timed runs per batch size (median and min-max reported), after untimed warm-up runs.
    repeats: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    # Bench the unquantized model too, the same way (it is loaded whole).
    baseline: bool = True


class Recipe(StrictModel):
    version: Literal[1] = RECIPE_VERSION
    model: ModelSpec
    # Where quantization and evaluation run: auto (a GPU when there is one), cpu, cuda, cuda:N.
    device: str = "auto"
    quantization: Quantization = Field(default_factory=Quantization)
    # Calibration data, needed by the calibrated methods.
    calibration: CalibrationSpec | None = None
    # Evaluate baseline and quantized model (perplexity, divergence, tasks); none when absent.
    eval: EvalSpec | None = None
    output: Output
    # Push the checked export to the Hub at the end; none when absent.
    hub: HubSpec | None = None
    # Measure load time, memory and prefill/decode speed of the export (and the baseline); none when absent.
    bench: BenchSpec | None = None

    @model_validator(mode="after")
    def _calibrated_methods_need_data(self) -> "Recipe":
        from .algorithms import ALGORITHMS

        q = self.quantization
        methods = {q.method, *(r.method for r in q.rules if r.method)}
        calibrated = sorted(m for m in methods if ALGORITHMS[m].calibrated)
        if calibrated and self.calibration is None:
            raise ValueError(f"method {calibrated[0]} needs calibration data: add a calibration section (text, nsamples, seqlen)")
        if self.calibration is not None and self.calibration.tune.model_steps and not calibrated:
            raise ValueError("calibration.tune.model_steps tunes the scales a calibrated method chose; this recipe's methods "
                             f"({', '.join(sorted(m for m in methods if m))}) calibrate nothing: choose gptq, gptq+tune, ... or set it to 0")
        if q.auto is not None and self.calibration is not None and self.calibration.tune.model_steps:
            raise ValueError("calibration.tune.model_steps does not work with quantization.auto: set it to 0")
        if q.auto is not None and self.calibration is not None and self.calibration.generated:
            raise ValueError("calibration.generated does not work with quantization.auto (its measurements stream the "
                             "checkpoint; generating needs the whole model): set it to 0")
        if q.auto is not None:
            if self.calibration is None:
                raise ValueError("quantization.auto measures sensitivity on calibration text: add a calibration section")
            algo = ALGORITHMS[q.method]
            if algo.scales_inputs or algo.tunes:
                why = "its gain depends on the formats of the whole decoder layer" if algo.tunes else "its scales depend on the format chosen"
                raise ValueError(f"quantization.auto works with methods rtn, scale_search and gptq, not {q.method} ({why})")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError(f"{v!r} is not a device; allowed: auto, cpu, cuda, cuda:N")
        return v

    # ---- YAML ---------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> "Recipe":
        data = load_yaml(text, source)
        if not isinstance(data, dict):
            raise UserError(f"{source}: a recipe is a YAML mapping with keys model, quantization, output")
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> "Recipe":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise UserError(f"{source}: {describe_validation_error(e)}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"recipe {str(path)!r} not found (expected a YAML file)")
        return cls.from_yaml(read_utf8(p, "recipe"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude_none=False)
        q = d["quantization"]
        q["rules"] = [r.to_yaml_dict() for r in self.quantization.rules]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def with_overrides(self, changes: dict[str, Any]) -> "Recipe":
        """Apply command-line overrides (dotted keys: ``{"output.dir": "x"}``) and revalidate."""
        d = self.to_dict()
        for dotted, value in changes.items():
            node = d
            *parents, leaf = dotted.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = value
        return Recipe.from_dict(d, "command line")


# ---- helpers ---------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML loading that refuses a key given twice in one mapping."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{source}:{where}: invalid YAML: {problem}") from None


def _loc_to_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part in ("scheme",) or (isinstance(part, str) and part in FORMAT_NAMES):
            continue  # internal nesting of a rule, and the discriminated-union tag
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def describe_validation_error(err: ValidationError) -> str:
    """The first problem of a pydantic error as one readable line."""
    e = err.errors(include_url=False)[0]
    path = _loc_to_path(tuple(e["loc"]))
    kind, msg = e["type"], e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "missing":
        msg = "missing required key"
    elif kind == "union_tag_not_found":
        msg = f"missing key 'format'; allowed formats: {', '.join(FORMAT_NAMES)}"
    elif kind == "union_tag_invalid":
        msg = f"unknown format {e['ctx']['tag']!r}; allowed: {', '.join(FORMAT_NAMES)}"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = f"expected a mapping, got {type(e.get('input')).__name__}"
    if "input" in e and kind not in ("missing", "union_tag_not_found", "model_type", "dict_type") and "got" not in msg:
        given = e["input"]
        if not isinstance(given, (dict, list)) and repr(given) not in msg:
            msg = f"{msg} (got {given!r})"
    return f"{path}: {msg}" if path else msg
