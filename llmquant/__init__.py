"""llmquant: quantize Hugging Face causal LMs into bitsandbytes formats that plain transformers loads.

``import llmquant`` registers llmquant's mixed-precision checkpoint format with
transformers (through its public quantizer-registration API), so
``AutoModelForCausalLM.from_pretrained(folder)`` loads any llmquant export. Uniform
exports (one bitsandbytes format throughout) need no llmquant at all. The transformers
internals the format needs are reached only when such a checkpoint is loaded
(:mod:`llmquant.compat`).
"""

__version__ = "0.1.0"

from .errors import UserError as _UserError

try:
    from . import hf_integration  # noqa: E402,F401  (registers the "llmquant" quant_method)
except _UserError as _e:  # a transformers whose quantizer API moved: everything but the llmquant format still works
    REGISTRATION_ERROR: str | None = str(_e)
else:
    REGISTRATION_ERROR = None
