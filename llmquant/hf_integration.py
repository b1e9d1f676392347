"""Loading llmquant checkpoints with plain ``AutoModelForCausalLM.from_pretrained``.

Checkpoints that stock transformers understands (one bitsandbytes format for every
quantized layer, stock block size) carry the stock ``bitsandbytes``
``quantization_config`` and need nothing from us. Mixed checkpoints carry
``"quant_method": "llmquant"``; importing llmquant registers this config class and
quantizer with transformers so that ``from_pretrained`` builds each layer as the
bitsandbytes module the checkpoint says and fills it with transformers' own
bitsandbytes deserializers.

Every transformers internal used here is reached through :mod:`llmquant.compat`
(tested range there), bitsandbytes 0.50.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from .compat import internal
from .plan import FORMAT_VERSION, LLMQUANT_METHOD, linear_shape, quantizable
from .schemes import FourBit, Int8, Scheme

_SCHEME = TypeAdapter(Scheme)
# What loading an llmquant checkpoint reaches inside transformers (looked up before the load starts).
LOAD_INTERNALS = (
    "transformers.core_model_loading:ConversionOps",
    "transformers.core_model_loading:WeightConverter",
    "transformers.integrations.bitsandbytes:Bnb4bitDeserialize",
    "transformers.integrations.bitsandbytes:Bnb8bitDeserialize",
    "transformers.quantizers.quantizers_utils:get_module_from_name",
)
HfQuantizer = internal("transformers.quantizers.base:HfQuantizer")
QuantizationConfigMixin = internal("transformers.utils.quantization_config:QuantizationConfigMixin")


@internal("transformers.quantizers.auto:register_quantization_config")(LLMQUANT_METHOD)
class LlmquantConfig(QuantizationConfigMixin):
    """``quantization_config`` of a mixed-precision llmquant checkpoint.

    ``groups`` lists formats with the layers that have them, e.g.
    ``[{"format": "int8", "threshold": 6.0, "modules": ["model.layers.0.self_attn.q_proj", ...]},
    {"format": "nf4", "group_size": 32, "double_quant": false, "modules": [...]}]``.
    Layers in no group are ordinary float layers.
    """

    def __init__(self, groups: list[dict] | None = None, compute_dtype: str = "float32",
                 format_version: int = FORMAT_VERSION, **kwargs: Any):
        self.quant_method = LLMQUANT_METHOD
        self.format_version = format_version
        self.compute_dtype = compute_dtype
        self.groups = groups or []

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": LLMQUANT_METHOD,
            "format_version": self.format_version,
            "compute_dtype": self.compute_dtype,
            "groups": self.groups,
        }

    def schemes(self) -> dict[str, Scheme]:
        out: dict[str, Scheme] = {}
        for i, g in enumerate(self.groups):
            fields = {k: v for k, v in g.items() if k != "modules"}
            try:
                scheme = _SCHEME.validate_python(fields)
            except ValidationError as e:
                raise ValueError(f"quantization_config.groups[{i}] is not a valid llmquant format: {e.errors()[0]['msg']}") from None
            for name in g.get("modules", []):
                out[name] = scheme
        return out


@internal("transformers.quantizers.auto:register_quantizer")(LLMQUANT_METHOD)
class LlmquantHfQuantizer(HfQuantizer):
    """Loads llmquant's mixed bitsandbytes checkpoints (pre-quantized only)."""

    requires_calibration = True  # the weights were chosen by llmquant; nothing is quantized at load time

    def validate_environment(self, *args, **kwargs) -> None:
        for path in LOAD_INTERNALS:  # before loading starts: transformers turns errors during conversion into its own
            internal(path)
        if self.quantization_config.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses llmquant format version {self.quantization_config.format_version}; "
                f"this llmquant reads up to version {FORMAT_VERSION}: upgrade llmquant"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError("loading an llmquant checkpoint needs bitsandbytes: pip install 'bitsandbytes>=0.50'") from None
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise ValueError("llmquant checkpoints cannot be offloaded to disk; give more GPU or CPU memory")

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        import bitsandbytes as bnb

        schemes = self.quantization_config.schemes()
        self.modules_to_not_convert = [n for n, s in schemes.items() if not s.quantized]
        for name, scheme in schemes.items():
            if not scheme.quantized:
                continue
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"quantization_config names layer {name!r}, which {type(model).__name__} does not have") from None
            if not quantizable(module):
                raise ValueError(f"quantization_config quantizes {name!r}, a {type(module).__name__}, not a Linear layer")
            out_f, in_f = linear_shape(module)
            has_bias = module.bias is not None
            with torch.device("meta"):
                if isinstance(scheme, Int8):
                    new = bnb.nn.Linear8bitLt(in_f, out_f, has_bias, has_fp16_weights=False, threshold=scheme.threshold)
                    new.weight.data = new.weight.data.to(torch.int8)
                else:
                    assert isinstance(scheme, FourBit)
                    new = bnb.nn.Linear4bit(
                        in_f, out_f, has_bias, compute_dtype=getattr(torch, self.quantization_config.compute_dtype),
                        compress_statistics=scheme.double_quant, quant_type=scheme.format, quant_storage=torch.uint8,
                    )
                    new.weight.data = new.weight.data.to(torch.uint8)
            new.source_cls = type(module)
            new.requires_grad_(False)
            model.set_submodule(name, new)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        import bitsandbytes as bnb

        from .backends.bnb import remember_scales

        # save_pretrained reverses the conversions recorded at load time; ours has no reverse
        # (get_state_dict_and_metadata already returns checkpoint tensors), so keep only the model's own.
        recorded = getattr(model, "_weight_conversions", None)
        if recorded:
            model._weight_conversions = [
                c for c in recorded if not any(isinstance(op, _deserializer()) for op in getattr(c, "operations", ()))
            ]
        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                if getattr(m.weight, "quant_state", None) is None:
                    raise ValueError(f"checkpoint has no 4-bit scales for {name} (missing or truncated tensors)")
                remember_scales(m)
            elif isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8:
                if m.weight.SCB is None and m.state.SCB is None:
                    raise ValueError(f"checkpoint has no int8 row scales (SCB) for {name}")
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # Only consulted for pre-quantized checkpoints to let a packed 4-bit weight
        # ([n/2, 1] bytes) replace the [out, in] placeholder; nothing is quantized at load.
        import bitsandbytes as bnb

        module, name = internal("transformers.quantizers.quantizers_utils:get_module_from_name")(model, param_name)
        return isinstance(module, bnb.nn.Linear4bit) and name != "bias"

    def get_weight_conversions(self):
        from .backends.bnb import FOURBIT_SUFFIXES, INT8_SUFFIXES

        if not self.pre_quantized:
            return []
        return [
            internal("transformers.core_model_loading:WeightConverter")(
                source_patterns=[*FOURBIT_SUFFIXES, *INT8_SUFFIXES, "weight"],
                target_patterns="weight",
                operations=[_deserializer()(self)],
            )
        ]

    def get_state_dict_and_metadata(self, model):
        from .backends.bnb import safe_state_dict

        return safe_state_dict(model), {}

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


@lru_cache(maxsize=1)
def _deserializer() -> type:
    """The conversion that builds a layer's bitsandbytes weight from its checkpoint tensors with transformers' own
    bitsandbytes deserializers (a subclass of an internal, so made when a checkpoint first loads)."""
    return type("LlmquantDeserialize", (internal("transformers.core_model_loading:ConversionOps"),),
                {"__init__": _init_deserialize, "convert": _convert, "__doc__": _deserializer.__doc__})


def _init_deserialize(self, hf_quantizer):
    self.hf_quantizer = hf_quantizer


def _convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
    Bnb4bitDeserialize = internal("transformers.integrations.bitsandbytes:Bnb4bitDeserialize")
    Bnb8bitDeserialize = internal("transformers.integrations.bitsandbytes:Bnb8bitDeserialize")
    if len(input_dict) == 1:  # a float tensor: cast it to the model's dtype, as transformers does without a quantizer
        (key, value), = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        target = model.get_parameter_or_buffer(full_layer_name) if model is not None and full_layer_name else None
        if target is not None and value.is_floating_point() and target.is_floating_point():
            value = value.to(target.dtype)
        return {key: value}
    if "SCB" in input_dict:
        return Bnb8bitDeserialize(self.hf_quantizer).convert(input_dict, model=model, full_layer_name=full_layer_name, **kwargs)
    _check_4bit_tensors(input_dict, full_layer_name)
    return Bnb4bitDeserialize(self.hf_quantizer).convert(input_dict, model=model, full_layer_name=full_layer_name, **kwargs)


def _check_4bit_tensors(input_dict: dict, layer: str | None) -> None:
    from bitsandbytes.functional import QuantState

    from .backends.bnb import check_absmax

    stats = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items() if k != "weight"}
    qs = QuantState.from_dict(dict(stats), device=torch.device("cpu"))
    check_absmax(qs, layer or "checkpoint")
