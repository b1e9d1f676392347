"""Calibrated methods on single layers: tests a wrong implementation would fail."""

import pytest
import torch

import bitsandbytes.functional as F
from llmquant.algorithms import ALGORITHMS
from llmquant.algorithms.awq import llm_int8_activations, llm_int8_output, search_scales
from llmquant.algorithms.grid import diagonal_blocks, round_4bit, search_block_scales
import llmquant.algorithms.gptq as gptq_module
from llmquant.algorithms.gptq import _permute_in_place, gptq, gptq_layers, inverse_cholesky_upper
from llmquant.algorithms.rtn import rtn_4bit, rtn_int8
from llmquant.algorithms.scale_search import LayerStats
from llmquant.backends.bnb import build_module, quant_state
from llmquant.quantized import FourBitWeight, codebook, pack_4bit
from llmquant.schemes import FourBit, Int8


def layer(out=192, n=256, seed=0):
    """A weight and correlated inputs with a few loud channels, as real layers see them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.05
    mix = torch.randn(n, n, generator=g) * 0.3 + torch.eye(n)
    loud = torch.ones(n)
    loud[:6] = 15.0

    def inputs(t, s):
        return (torch.randn(t, n, generator=torch.Generator().manual_seed(s)) @ mix) * loud

    calib, held = inputs(2048, seed + 1), inputs(2048, seed + 2)
    return w, calib.t() @ calib / len(calib), held


def out_err(w, qw, x):
    return ((x @ (w - qw.dequantize()).t()) ** 2).mean().item()


SCHEMES = [FourBit(format="nf4"), FourBit(format="fp4", group_size=32, double_quant=True), Int8(threshold=0.0)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_gptq_beats_rtn_on_held_out_inputs(scheme, act_order):
    w, h, held = layer()
    rtn = rtn_4bit(w, scheme, torch.float32) if isinstance(scheme, FourBit) else rtn_int8(w, scheme)
    q = gptq(w, h, scheme, torch.float32, act_order=act_order)
    assert out_err(w, q, held) < 0.6 * out_err(w, rtn, held)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_gptq_on_layers_sharing_inputs_equals_gptq_of_each(scheme):
    w, h, _ = layer(out=160)
    parts = [w[:64], w[64:96] * 3, w[96:]]  # different widths and magnitudes, as q/k/v have
    together = gptq_layers(parts, h, scheme, torch.float32, act_order=False)
    for part, q in zip(parts, together):
        alone = gptq(part, h, scheme, torch.float32, act_order=False)
        assert torch.equal(q.dequantize(), alone.dequantize())
        assert type(q) is type(alone) and q.dequantize().shape == part.shape


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_gptq_solved_a_chunk_of_rows_at_a_time_equals_all_rows_at_once(scheme, act_order, monkeypatch):
    w, h, _ = layer(out=200)
    h[:, 7] = h[7, :] = 0.0  # an input that was always zero
    whole = gptq_layers([w[:120], w[120:]], h, scheme, torch.float32, act_order=act_order, latent=True)
    monkeypatch.setattr(gptq_module, "GPTQ_CHUNK_WEIGHTS", 48 * w.shape[1])  # chunks of 48 rows: 120 = 48 + 48 + 24
    chunked = gptq_layers([w[:120], w[120:]], h, scheme, torch.float32, act_order=act_order, latent=True)
    for a, b in zip(whole, chunked):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.latent, b.latent)
        assert torch.equal(a.dequantize(), b.dequantize())
    assert (whole[0].codes[:, 7] == whole[0].codes[0, 7]).all()  # the dead input's weights were zeroed


def test_gptq_on_a_gpu_solves_all_rows_at_once_when_they_fit(monkeypatch):
    """The column loop runs once per chunk of rows: on a GPU, where each column costs kernel launches whatever the
    rows, one chunk when 4 float32 copies of the rows fit in half the free memory; on CPU, chunks of 64 MB."""
    from types import SimpleNamespace

    from llmquant import memory

    def weights(device, *outs):
        return [SimpleNamespace(shape=(o, 4096), device=torch.device(device)) for o in outs]

    need = gptq_module.SOLVE_COPIES * 4 * 14336 * 4096  # the widest layer's rows, 4 float32 copies: 0.9 GB
    monkeypatch.setattr(memory, "free_bytes", lambda device, all_gpus=False: 2 * need)
    assert gptq_module.row_chunk(weights("cuda", 4096, 14336), 4096) == 14336
    monkeypatch.setattr(memory, "free_bytes", lambda device, all_gpus=False: 2 * need - 1)
    assert gptq_module.row_chunk(weights("cuda", 4096, 14336), 4096) == gptq_module.GPTQ_CHUNK_WEIGHTS // 4096 == 4096
    monkeypatch.setattr(memory, "free_bytes", lambda device, all_gpus=False: 1 << 50)
    assert gptq_module.row_chunk(weights("cpu", 4096, 14336), 4096) == 4096


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=lambda s: s.label())
def test_gptq_reads_nothing_back_from_the_device_per_column(scheme, monkeypatch):
    """A read of a device value (``int(t)``, ``t.item()``, ``t.tolist()``) waits for the GPU to finish: the column
    loop reads none (the column order is read once), and the codebook is sorted once per layer, not per column."""
    w, h, _ = layer(out=64)
    n = w.shape[1]
    reads, sorts = [], []
    for name in ("__int__", "__index__", "item", "tolist", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: reads.append(_name) or _real(self, *a, **k))
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    gptq_layers([w], h, scheme, torch.float32, act_order=True)
    assert len(reads) < n / 4, sorted(set(reads))  # a few per factoring block and per layer, not per column
    assert len(sorts) <= 4


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_gptq_output_error_is_the_error_of_its_weights(scheme, act_order, monkeypatch):
    """The output error GPTQ reports from its own solve (no Hessian kept for it) is tr(E H Eᵀ) of the weights it
    stored, whatever the scales (static or chosen block by block), the chunking and a dead input."""

    from llmquant.algorithms.grid import quadratic_error

    w, h, _ = layer(out=150)
    h[:, 5] = h[5, :] = 0.0
    monkeypatch.setattr(gptq_module, "GPTQ_CHUNK_WEIGHTS", 64 * w.shape[1])
    for part, q in zip([w[:100], w[100:] * 4], gptq_layers([w[:100], w[100:] * 4], h, scheme, torch.float32, act_order=act_order)):
        e = part.double() - q.dequantize().double()
        direct = quadratic_error(e, h.double()).sum().item()
        rtn_error = quadratic_error(part.double() - (rtn_4bit(part, scheme, torch.float32) if isinstance(scheme, FourBit)
                                                    else rtn_int8(part, scheme)).dequantize().double(), h.double()).sum().item()
        assert q.output_error == pytest.approx(direct, rel=1e-4)
        assert q.output_error < rtn_error  # and not some other error of the same size


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=lambda s: s.label())
def test_scale_search_never_increases_its_objective(scheme):
    w, h, held = layer()
    g, cb = scheme.group_size, codebook(scheme.format)
    chosen = search_block_scales(w, h, g, scheme.format)
    blocks = w.reshape(w.shape[0], -1, g)
    absmax = blocks.abs().amax(-1)
    hb = diagonal_blocks(h, g)

    def objective(scales):
        e = (blocks - round_4bit(blocks, scales, cb)[1]).transpose(0, 1)
        return (torch.bmm(e, hb) * e).sum(-1).t()

    assert (objective(chosen) <= objective(absmax) + 1e-12).all()  # block by block
    assert objective(chosen).sum() < 0.8 * objective(absmax).sum()  # and it does find better scales
    qw = ALGORITHMS["scale_search"].quantize(w, scheme, torch.float32, LayerStats(h))
    rtn = rtn_4bit(w, scheme, torch.float32)
    assert out_err(w, qw, held) < out_err(w, rtn, held)


@pytest.mark.parametrize("scheme", [FourBit(format="nf4"), FourBit(format="fp4", group_size=128, double_quant=True)], ids=lambda s: s.label())
@pytest.mark.parametrize("method", ["gptq", "scale_search"])
def test_stored_codes_and_scales_dequantize_exactly_to_the_chosen_weights(scheme, method):
    w, h, _ = layer()
    qw = ALGORITHMS[method].quantize(w, scheme, torch.float32, LayerStats(h, options={"act_order": True}))
    assert isinstance(qw, FourBitWeight)
    packed, qs = pack_4bit(qw.codes), quant_state(qw)
    # bitsandbytes' own dequantization of what would be stored == what the algorithm chose
    assert torch.equal(F.dequantize_4bit(packed, qs), qw.dequantize())
    if scheme.double_quant:  # the scales are exactly representable as bitsandbytes stores them
        assert torch.equal(qw.nested.dequantize(), qw.scales)
    m = build_module(qw, None, torch.float32, "cpu")
    assert torch.equal(F.dequantize_4bit(m.weight.data, m.weight.quant_state), qw.dequantize())


def test_int8_gptq_codes_are_valid_rows():
    w, h, held = layer()
    q = gptq(w, h, Int8(threshold=6.0), torch.float32)
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() <= 127
    assert torch.equal(q.dequantize(), F.int8_vectorwise_dequant(q.codes, q.scb))
    assert out_err(w, q, held) < out_err(w, rtn_int8(w, Int8()), held)


def test_awq_search_never_loses_to_no_scaling_and_folding_is_exact():
    from torch import nn

    from llmquant.algorithms.awq import ScalingGroup, apply_scales

    w, h, held = layer()
    absmean = held.abs().mean(0)
    s, alpha, ratio = search_scales([w], [FourBit(format="nf4")], h, absmean, None)
    assert ratio <= 1.0 and (alpha == 0) == bool(torch.all(s == 1))
    # folding the scales into a norm and the Linear that reads it leaves the float function unchanged
    norm = nn.Module()
    norm.weight = nn.Parameter(torch.rand(256) + 0.5)
    lin = nn.Linear(256, 192, bias=False)
    lin.weight.data = w.clone()
    model = nn.ModuleDict({"norm": norm, "lin": lin})
    x = torch.randn(7, 256)
    before = lin(x * norm.weight)
    apply_scales(model, ScalingGroup("norm", ["lin"]), torch.rand(256) + 0.5)
    assert torch.allclose(lin(x * norm.weight), before, atol=1e-5)


def test_llm_int8_simulation_matches_bitsandbytes():
    w, _, held = layer()
    x = held[:300].clone()
    x[:5, 40] = 9.0  # a few outliers above the threshold
    for t in (0.0, 6.0):
        qw = rtn_int8(w, Int8(threshold=t))
        with torch.no_grad():
            y = build_module(qw, None, torch.float32, "cpu")(x)
        ref = x @ w.t()
        sim = llm_int8_output(x, qw.codes, qw.scb, t)
        assert (sim - y).norm() / ref.norm() < 0.05 * (y - ref).norm() / ref.norm()
        # the same product as the activations it uses times the dequantized weight (what tuning computes with)
        sim2 = llm_int8_activations(x, t) @ qw.dequantize().float().t()
        assert (sim2 - y).norm() / ref.norm() < 0.05 * (y - ref).norm() / ref.norm()
        if not t:  # every column rounded to int8 per token: without that rounding the simulation would be far off
            assert (x @ qw.dequantize().float().t() - y).norm() > 100 * (sim2 - y).norm()


@pytest.mark.parametrize("int_mm", [True, False], ids=["integer-product", "float-product"])
def test_awq_int8_search_predicts_the_error_of_bitsandbytes_int8_layers(monkeypatch, int_mm):
    """The INT8 scaling search (layers sharing one input, the LLM.int8 split computed once per candidate) scores a
    scaling as real bitsandbytes INT8 layers on the scaled input err, on either product (CPUs with or without
    AVX-512 take different ones)."""
    from llmquant.algorithms import awq

    monkeypatch.setattr(awq, "_INT_MM_CPU", int_mm)
    w1, _, x = layer(out=192, seed=3)
    w2 = layer(out=64, seed=4)[0]
    x = x[:512] * 0.1
    x[::7, 3] = 9.0  # an outlier column above the threshold
    schemes = [Int8(threshold=6.0), Int8(threshold=6.0)]
    s, alpha, ratio = search_scales([w1, w2], schemes, x.t() @ x / len(x), x.abs().mean(0), x, 10, x.abs().amax(0))

    def real_error(scales):
        err = 0.0
        for w in (w1, w2):
            with torch.no_grad():
                y = build_module(rtn_int8(w * scales, schemes[0]), None, torch.float32, "cpu")(x / scales)
            err += ((y - x @ w.t()) ** 2).sum().item() / len(x)
        return err

    assert alpha > 0 and ratio < 0.7  # loud channels: scaling them down is worth it
    assert ratio == pytest.approx(real_error(s) / real_error(torch.ones_like(s)), rel=0.02)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_rtn_by_row_chunks_is_bitsandbytes_quantization(monkeypatch, fmt, double_quant):
    """RTN quantizes a few rows at a time (less memory); the result is bitsandbytes' own, bit for bit."""
    from bitsandbytes.functional import quantize_4bit

    from llmquant.algorithms import rtn
    from llmquant.quantized import unpack_4bit
    from llmquant.schemes import FourBit

    monkeypatch.setattr(rtn, "CHUNK_WEIGHTS", 1 << 14)
    torch.manual_seed(0)
    for shape, g in (((512, 1024), 64), ((300, 256), 32), ((64, 4096), 128)):
        w = torch.randn(shape, dtype=torch.bfloat16)
        qw = rtn.rtn_4bit(w, FourBit(format=fmt, group_size=g, double_quant=double_quant), torch.bfloat16)
        packed, qs = quantize_4bit(w, blocksize=g, compress_statistics=double_quant, quant_type=fmt)
        assert torch.equal(qw.codes, unpack_4bit(packed, shape))
        if double_quant:
            assert torch.equal(qw.nested.codes, qs.absmax) and torch.equal(qw.nested.absmax, qs.state2.absmax)
            assert torch.equal(qw.nested.offset, qs.offset)
        else:
            assert torch.equal(qw.scales, qs.absmax.float())


@pytest.mark.parametrize("n,block", [(1, 512), (7, 512), (130, 16), (300, 64), (1100, 512)])
def test_the_in_place_factoring_is_the_inverse_hessians_upper_cholesky_factor(n, block):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n + 3, n, generator=g) * torch.linspace(0.1, 3.0, n)  # inputs of different loudness
    h = x.t() @ x / len(x) + 0.01 * torch.eye(n)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # as GPTQ did it
    a = h.clone()
    u = inverse_cholesky_upper(a, block=block)
    assert u.data_ptr() == a.data_ptr()  # in the matrix's own memory
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    assert torch.allclose(u, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert torch.allclose(u.t() @ u @ h, torch.eye(n), atol=1e-3)


def test_permuting_in_place_equals_indexing():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(301, 301, generator=g)
    a = a + a.t()
    for perm in (torch.randperm(301, generator=g), torch.arange(301), torch.arange(300, -1, -1)):
        assert torch.equal(_permute_in_place(a.clone(), perm, rows=64), a[perm.unsqueeze(1), perm.unsqueeze(0)])


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_gptq_handed_its_hessian_consumes_it_and_chooses_the_same_weights(scheme, act_order, monkeypatch):
    monkeypatch.setattr(gptq_module, "FACTOR_BLOCK", 96)  # several blocks of the in-place factoring
    w, h, _ = layer()
    kept = h.clone()
    mine = gptq_layers([w], h, scheme, torch.float32, act_order=act_order)[0]
    assert torch.equal(h, kept)  # the caller's Hessian is left as it was
    handed = gptq_layers([w], h, scheme, torch.float32, act_order=act_order, owned=True)[0]
    dynamic = not act_order and isinstance(scheme, FourBit) and not scheme.double_quant  # block scales read h later
    assert torch.equal(h, kept) == dynamic  # else permuted and factored in place
    assert torch.equal(handed.dequantize(), mine.dequantize())
    assert handed.output_error == pytest.approx(mine.output_error, rel=1e-6)


def test_a_hessian_that_is_not_positive_definite_gets_more_damping_and_non_finite_statistics_one_error():
    """Inputs that are nearly dependent (here: 8 directions in 128 columns, and a float32 sum that leaves the
    Hessian indefinite) make torch's Cholesky factoring fail; GPTQ damps the failing blocks more until it factors,
    says how much, and still beats rounding to nearest. Statistics that are not finite give one clear error."""
    from llmquant.algorithms.gptq import FactoringError

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g) @ torch.randn(8, 128, generator=g)
    h = x.t() @ x / len(x)
    h -= 0.05 * torch.eye(128) * h.diagonal().mean()  # indefinite: damp 0.01 alone does not make it definite
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h + 0.01 * h.diagonal().mean() * torch.eye(128))
    w = torch.randn(64, 128, generator=g) * 0.05
    scheme = FourBit(format="nf4", group_size=32)
    q = gptq_layers([w], h.clone(), scheme, torch.float32, damp=0.01, act_order=False)[0]
    assert q.damping > 0.06 and torch.isfinite(q.dequantize()).all()
    def err(qw):
        e = w - qw.dequantize().float()
        return float(((e @ (x.t() @ x)) * e).sum())
    assert err(q) < err(rtn_4bit(w, scheme, torch.float32))
    bad = h.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(FactoringError, match="could not be factored"):
        gptq_layers([w], bad, scheme, torch.float32, damp=0.01, act_order=False)
