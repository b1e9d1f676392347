"""llmquant: quantize Hugging Face causal LMs into bitsandbytes formats that plain transformers loads.

``import llmquant`` registers llmquant's mixed-precision checkpoint format with
transformers, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads any llmquant
export. Uniform exports (one bitsandbytes format throughout) need no llmquant at all.
"""

__version__ = "0.1.0"

from . import hf_integration  # noqa: E402,F401  (registers the "llmquant" quant_method)
