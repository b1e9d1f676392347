"""Shared fixtures: tiny random models of several families, and the real SmolLM2 (offline asset)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

# Tests never reach the Hub; models come from configs or from llmquant's own assets.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """Hide the warnings llmquant's command line hides (``cli.NOISE``, the one list of them); show all others."""
    from llmquant.cli import NOISE

    for category, message, module in NOISE:
        config.addinivalue_line("filterwarnings", f"ignore:{re.escape(message)}:{category.__name__}:{module}")


def _simulate_cpu_without_avx512bf16() -> None:
    """LLMQUANT_SIMULATE_NO_AVX512BF16=1: bitsandbytes behaves as on a CPU without AVX512-BF16 (its native
    feature probe answers no before its CPU kernels are registered), to run the whole suite as such a CPU would."""
    import importlib.abc
    import importlib.util
    import sys

    class Patch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.cextension":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                module.lib.has_avx512bf16_cpu = lambda: False

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Patch())


if os.environ.get("LLMQUANT_SIMULATE_NO_AVX512BF16") == "1":
    _simulate_cpu_without_avx512bf16()

import llmquant  # noqa: E402,F401  (registers the llmquant checkpoint format)
import logging  # noqa: E402

from llmquant import assets  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # per-call notes of LLM.int8 (fp16 cast)

VOCAB = 512
TEXT = (
    "A quantized model stores each weight in fewer bits. The scale of each block is chosen so that the "
    "rounded weights stay close to the original ones, and the model's outputs change as little as possible. "
    "Evaluation compares the quantized model with the original on text it has not seen. "
) * 4


def tiny_tokenizer():
    """A 512-token byte-level BPE tokenizer trained on a few sentences (fast, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_config(arch: str):
    """Small configs whose widths fit every bitsandbytes block size up to 128."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "qwen2":  # q/k/v projections have biases
        return tf.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, tie_word_embeddings=False, **common)
    if arch == "gpt2":  # Conv1D layers, tied head
        return tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "opt":  # biases everywhere, tied head
        return tf.OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=128, max_position_embeddings=256, **common)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt"]


def family_config(arch: str):
    """The family matrix: tiny configs (hidden 64, 4 layers) of the architectures users bring, each with the pattern
    that makes it different: sliding-window layers beside full ones (Qwen2, Gemma 2/3, Cohere 2), a local rotary base
    beside a global one (Gemma 3), parallel residual blocks (Phi, GPT-NeoX, StableLM, Cohere, Falcon), post-norm
    blocks (OLMo 2), fused projections (Phi-3), norms of q and k (Qwen3, OLMo 2), scaled embeddings, residuals and
    logits (Granite, Gemma), Conv1D layers (GPT-2). Windows longer than the sliding window (8) show the masks."""
    import transformers as tf

    c = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    att = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256)
    return {
        "llama": lambda: tf.LlamaConfig(**att, tie_word_embeddings=False, **c),
        "mistral": lambda: tf.MistralConfig(**att, sliding_window=8, **c),
        "qwen2": lambda: tf.Qwen2Config(**att, use_sliding_window=True, sliding_window=8, max_window_layers=2,
                                        tie_word_embeddings=False, **c),
        "qwen3": lambda: tf.Qwen3Config(**att, head_dim=16, **c),
        "gemma2": lambda: tf.Gemma2Config(**att, head_dim=16, sliding_window=8, **c),
        "gemma3": lambda: tf.Gemma3TextConfig(**att, head_dim=16, sliding_window=8, sliding_window_pattern=2,
                                              rope_theta=10000.0, rope_local_base_freq=100.0, **c),
        "cohere": lambda: tf.CohereConfig(**att, **c),
        "cohere2": lambda: tf.Cohere2Config(**att, sliding_window=8, sliding_window_pattern=2, **c),
        "phi": lambda: tf.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    partial_rotary_factor=0.5, max_position_embeddings=256, **c),
        "phi3": lambda: tf.Phi3Config(**att, **c),
        "olmo2": lambda: tf.Olmo2Config(**att, **c),
        "stablelm": lambda: tf.StableLmConfig(**att, use_parallel_residual=True, **c),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                             use_parallel_residual=True, rotary_pct=0.5, max_position_embeddings=256, **c),
        "falcon": lambda: tf.FalconConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, parallel_attn=True,
                                          new_decoder_architecture=False, alibi=False, **c),
        "granite": lambda: tf.GraniteConfig(**att, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25,
                                            logits_scaling=4.0, **c),
        "starcoder2": lambda: tf.Starcoder2Config(**att, sliding_window=8, **c),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, **c),
        "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                                    word_embed_proj_dim=64, max_position_embeddings=256, **c),
    }[arch]()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "cohere", "cohere2", "phi", "phi3", "olmo2",
            "stablelm", "gpt_neox", "falcon", "granite", "starcoder2", "gpt2", "opt"]


def build_tiny(arch: str, dtype=torch.float32, config=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config or tiny_config(arch), dtype=dtype).eval()
    # Random init has tiny weights; widen them so quantization error is visible in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def _saved_models(root: Path, build):
    """arch -> folder holding ``build(arch)`` saved with the tiny tokenizer (made on first use)."""
    made: dict[str, Path] = {}
    tok = tiny_tokenizer()

    def get(arch: str) -> Path:
        if arch not in made:
            d = root / arch
            build(arch).save_pretrained(d)
            tok.save_pretrained(d)
            made[arch] = d
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> folder holding a saved tiny model with a tokenizer (made on first use)."""
    return _saved_models(tmp_path_factory.mktemp("tiny"), build_tiny)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """arch -> folder holding a saved model of the family matrix (:func:`family_config`) with a tokenizer."""
    return _saved_models(tmp_path_factory.mktemp("families"), lambda arch: build_tiny(arch, config=family_config(arch)))


def converted(asset: str) -> Path:
    """A GGUF model asset as a float32 transformers folder (converted once, into the asset cache)."""
    from llmquant.models import load_model, resolve_source

    gguf = assets.fetch(asset, quiet=True)
    dest = assets.cache_dir() / "converted" / f"{asset}-float32"
    if not (dest / "model.safetensors").is_file():
        model, tok = load_model(resolve_source(str(gguf)), "float32", "cpu")
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a float32 transformers folder (converted once from the GGUF asset)."""
    return converted("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_dir():
    """The real Qwen2.5-Coder-0.5B-Instruct as a float32 transformers folder (converted once from the GGUF asset)."""
    return converted("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def botchan_text() -> str:
    return assets.fetch("botchan", quiet=True).read_text(encoding="utf-8")


# ---- bitsandbytes' two CPU branches, on any CPU ---------------------------------------------------
# On CPUs with AVX512-BF16, the first forward of a Linear4bit repacks its weight for bitsandbytes' CPU
# kernel and rewrites its quant_state; elsewhere it computes from the stored layout. Tests take each
# branch explicitly: `no_cpu_repacking` turns the repacking off (as on a CPU without the instruction),
# and `repack_like_avx512bf16` applies bitsandbytes' own repacking without a forward pass (a repacked
# layer must then not run forward where the kernel for it is missing).


@pytest.fixture(autouse=True)
def _no_baseline_cache(request, monkeypatch):
    """Every test evaluates its baselines afresh (a run reusing another run's cached baseline would make comparisons
    of the two trivially equal); tests marked ``baseline_cache`` test the cache itself."""
    if request.node.get_closest_marker("baseline_cache") is None:
        from llmquant.evaluate import Evaluation

        monkeypatch.setattr(Evaluation, "cache_key", lambda self, *a, **k: None)


@pytest.fixture
def no_cpu_repacking(monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)


def repack_like_avx512bf16(model) -> int:
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and not getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            m.weight.data, _ = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
            n += 1
    return n


def assert_same_logits(got, expected):
    """Equal up to the run-to-run noise of a CPU forward pass (thread scheduling changes the order of
    floating-point sums, more so on a busy machine); a wrong scale or format changes logits far more."""
    assert got.shape == expected.shape
    diff = (got.float() - expected.float()).abs().max().item()
    assert diff <= 1e-4 * max(1.0, expected.abs().max().item()), diff
