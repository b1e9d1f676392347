"""Codes and scales in bitsandbytes' terms: our representation is exactly what bitsandbytes stores and computes."""

import pytest
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F
from llmquant.algorithms.rtn import rtn_4bit, rtn_int8
from llmquant.backends.bnb import build_module, checkpoint_tensors, quant_state, read_weight
from llmquant.quantized import INT8_INV_127, double_quantize, pack_4bit, unpack_4bit
from llmquant.schemes import FourBit, Int8

pytestmark = pytest.mark.compat  # CI runs this module under the oldest and newest supported transformers


@pytest.mark.parametrize("shape", [(4, 6), (3, 5), (1, 1), (64, 96)])
def test_pack_unpack_round_trip(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.shape == ((codes.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(unpack_4bit(packed, shape), codes)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 31, 33, 48])
def test_packing_a_slice_at_a_time_gives_the_same_bytes(monkeypatch, n):
    import llmquant.quantized as q

    def expected(c):
        padded = torch.cat([c, c.new_zeros(c.numel() % 2)])
        return ((padded[0::2] << 4) | padded[1::2]).unsqueeze(1)  # first code in the high nibble

    codes = torch.randint(0, 16, (n + 1,), dtype=torch.uint8)
    monkeypatch.setattr(q, "PACK_CHUNK", 4)  # pairs per slice: several slices, a short last one
    assert torch.equal(pack_4bit(codes[:n]), expected(codes[:n]))
    assert torch.equal(pack_4bit(codes[1:]), expected(codes[1:]))  # not on a 16-bit boundary: packed byte by byte


def test_a_dropped_4bit_layer_is_freed_at_once_once_unlinked():
    import gc
    import weakref

    from llmquant.backends.bnb import unlink

    qw = rtn_4bit(_weight(), FourBit(format="nf4"), torch.float32)
    gc.disable()
    try:
        kept = build_module(qw, None, torch.float32, "cpu")
        ref = weakref.ref(kept)
        del kept
        assert ref() is not None  # bitsandbytes' parameter refers back to its layer: only the cycle collector frees it
        gc.collect()
        dropped = build_module(qw, None, torch.float32, "cpu")
        ref = weakref.ref(dropped)
        unlink(dropped)
        del dropped
        assert ref() is None
    finally:
        gc.enable()


def test_bitsandbytes_imported_without_the_compiler_still_dequantizes_through_its_fallback():
    """Imported through llmquant, bitsandbytes' pure-PyTorch fallbacks stay plain functions: Inductor is not imported,
    torch.compile is left as it was, and the fallback (taken for an odd number of columns) gives bitsandbytes' values."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "compile_ = torch.compile\n"
        "from llmquant.memory import import_bitsandbytes\n"
        "bnb = import_bitsandbytes()\n"
        "assert torch.compile is compile_\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules, 'inductor imported'\n"
        "import bitsandbytes.functional as F\n"
        "from llmquant.quantized import codebook, unpack_4bit\n"
        "w = torch.randn(6, 63)\n"
        "packed, qs = F.quantize_4bit(w, blocksize=64, quant_type='nf4')\n"
        "back = F.dequantize_4bit(packed, qs)\n"
        "codes = unpack_4bit(packed, (w.numel(),)).long()\n"
        "blocks = torch.arange(w.numel()) // 64\n"
        "ref = (codebook('nf4')[codes] * qs.absmax[blocks]).view(6, 63)\n"
        "assert torch.equal(back, ref), (back - ref).abs().max()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _weight(out=128, inp=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[3, 17] = 0.9  # an outlier, as real layers have
    return w


FOURBIT = [FourBit(format=f, group_size=g, double_quant=dq) for f in ("nf4", "fp4") for g in (32, 64, 256) for dq in (False, True)]


@pytest.mark.parametrize("scheme", FOURBIT, ids=lambda s: s.label())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rtn_4bit_is_bitsandbytes_quantize_4bit(scheme, dtype):
    w = _weight().to(dtype)
    qw = rtn_4bit(w, scheme, dtype)
    packed, qs = F.quantize_4bit(w, blocksize=scheme.group_size, compress_statistics=scheme.double_quant, quant_type=scheme.format)
    assert torch.equal(pack_4bit(qw.codes), packed)
    # our exact dequantization == bitsandbytes' dequantize_4bit, to the bit
    ours = qw.dequantize().to(dtype)
    theirs = F.dequantize_4bit(packed, qs)
    assert torch.equal(ours, theirs)
    # and the QuantState we build from our codes/scales dequantizes identically too
    assert torch.equal(F.dequantize_4bit(pack_4bit(qw.codes), quant_state(qw)), theirs)


def _ties(quant_type, dtype):
    """Blocks of absmax 1 whose weights sit exactly on every codebook midpoint and one float either side."""
    from llmquant.algorithms.rtn import _sorted_bounds

    mids = torch.tensor(_sorted_bounds(quant_type)[0])
    edges = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    block = torch.cat([torch.tensor([1.0]), edges, torch.zeros(63 - edges.numel())])
    return torch.cat([block, -block, _weight(8, 128).view(-1)]).view(-1, 128).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fast_cpu_codes_are_bitsandbytes_codes_at_ties(quant_type, dtype):
    """The comparison-count lookup picks bitsandbytes' code for weights on, just above and just below each midpoint."""
    from llmquant.algorithms.rtn import blockwise_codes

    for w in (_ties(quant_type, dtype), _weight(96, 512, seed=1).to(dtype)):
        for g in (64, 128) if w.shape[1] % 128 == 0 else (64,):
            packed, qs = F.quantize_4bit(w, blocksize=g, quant_type=quant_type)
            codes, absmax = blockwise_codes(w, quant_type, g)
            assert torch.equal(codes, unpack_4bit(packed, tuple(w.shape)))
            assert torch.equal(absmax, qs.absmax.float())


def test_fast_cpu_codes_step_aside_when_they_would_differ(monkeypatch):
    """A bitsandbytes that rounded ties the other way (simulated: midpoints one float higher) fails the probe, and
    RTN then uses bitsandbytes' own kernel; a weight with an infinite value is left to bitsandbytes too."""
    from llmquant.algorithms import rtn

    scheme = FourBit(format="nf4", group_size=64)
    mids, remap = rtn._sorted_bounds("nf4")
    shifted = tuple(torch.nextafter(torch.tensor(mids), torch.tensor(2.0)).tolist())
    rtn.matches_bitsandbytes_on_cpu.cache_clear()
    monkeypatch.setattr(rtn, "_sorted_bounds", lambda quant_type: (shifted, remap))
    try:
        assert not rtn.matches_bitsandbytes_on_cpu("nf4")
        w = _ties("nf4", torch.float32)
        assert not torch.equal(rtn.blockwise_codes(w, "nf4", 64)[0], rtn._bitsandbytes_codes(w, scheme)[0])
        assert torch.equal(rtn.rtn_4bit(w, scheme, torch.float32).codes, rtn._bitsandbytes_codes(w, scheme)[0])
    finally:
        rtn.matches_bitsandbytes_on_cpu.cache_clear()
    monkeypatch.undo()
    assert rtn.matches_bitsandbytes_on_cpu("nf4")
    w = _weight()
    w[5, 7] = float("inf")
    assert rtn.blockwise_codes(w, "nf4", 64) is None
    packed, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(pack_4bit(rtn.rtn_4bit(w, scheme, torch.float32).codes), packed)


def test_double_quantize_matches_bitsandbytes_nested_state():
    w = _weight()
    _, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, plain = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    nested = double_quantize(plain.absmax)
    assert torch.equal(nested.codes, qs.absmax) and torch.equal(nested.absmax, qs.state2.absmax)
    assert torch.allclose(nested.dequantize(), plain.absmax, rtol=0.02)


def test_rtn_int8_is_bitsandbytes_int8params():
    w = _weight()
    qw = rtn_int8(w, Int8(threshold=6.0))
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert torch.equal(qw.codes, p.CB) and torch.equal(qw.scb, p.SCB)
    assert torch.equal(qw.dequantize(), F.int8_vectorwise_dequant(p.CB, p.SCB))
    assert torch.allclose(qw.dequantize(), w, atol=w.abs().max().item() / 127)
    assert INT8_INV_127 == pytest.approx(1 / 127)


@pytest.mark.parametrize("scheme", [FourBit(format="nf4", group_size=64, double_quant=True), FourBit(format="fp4", group_size=32), Int8(threshold=0.0)], ids=lambda s: s.label())
def test_checkpoint_tensors_read_back_exactly(scheme):
    w = _weight()
    qw = rtn_4bit(w, scheme, torch.float32) if isinstance(scheme, FourBit) else rtn_int8(w, scheme)
    tensors = checkpoint_tensors(qw, "layer.")
    back = read_weight({k.removeprefix("layer."): v for k, v in tensors.items()}, torch.float32)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("scheme", [FourBit(format="nf4"), FourBit(format="fp4", double_quant=True), Int8(threshold=0.0)], ids=lambda s: s.label())
def test_built_module_computes_with_the_chosen_weights(scheme):
    torch.manual_seed(0)
    w, bias, x = _weight(), torch.randn(128) * 0.1, torch.randn(5, 256)
    qw = rtn_4bit(w, scheme, torch.float32) if isinstance(scheme, FourBit) else rtn_int8(w, scheme)
    m = build_module(qw, bias, torch.float32, "cpu")
    with torch.no_grad():
        y = m(x)
    ref = x @ qw.dequantize().t() + bias
    # bitsandbytes' CPU kernels compute in bf16 (4-bit) or quantize activations to int8 (LLM.int8):
    # close to the chosen weights' exact product, far closer than to a different weight.
    err = (y - ref).norm() / ref.norm()
    assert err < 0.02, err
    other = x @ (w + torch.randn_like(w) * 0.01).t() + bias
    assert (y - other).norm() / other.norm() > err
