"""Perplexity and divergence against independent, straightforward implementations of the same protocols."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny
from llmquant.evaluate.perplexity import LogprobStore, evaluate, make_windows


@pytest.mark.parametrize("n,seqlen", [(1000, 100), (1000, 128), (37, 8)])
def test_windows_protocol_layout(n, seqlen):
    ws = make_windows(n, seqlen, "windows")
    assert len(ws) == n // seqlen
    assert all(w.end - w.begin == seqlen and w.first_target == w.begin + 1 for w in ws)
    assert all(a.end == b.begin for a, b in zip(ws, ws[1:]))


@pytest.mark.parametrize("n,seqlen,stride", [(1000, 100, 50), (1001, 64, 17), (50, 64, 32), (1000, 128, 127)])
def test_sliding_protocol_predicts_every_token_once_with_bounded_context(n, seqlen, stride):
    ws = make_windows(n, seqlen, "sliding", stride)
    predicted = [t for w in ws for t in range(w.first_target, w.end)]
    assert predicted == list(range(1, n))  # every token but the first, once, in order
    assert all(w.end - w.begin <= seqlen and w.first_target > w.begin for w in ws)
    assert all(b.begin - a.begin == stride for a, b in zip(ws, ws[1:]))


def test_sliding_with_stride_equal_to_seqlen_is_the_windows_protocol_plus_the_tail():
    # no overlap: the first token of each window has no context, as in the transformers guide
    ws = make_windows(1000, 128, "sliding", 128)
    assert ws[:-1] == make_windows(1000, 128, "windows")
    assert (ws[-1].begin, ws[-1].end) == (896, 1000)


# ---- independent reference implementations (they use transformers' own label shifting) -------


def reference_windows(model, ids, seqlen):
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ids) // seqlen):
            x = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            nll += model(x, labels=x).loss.double().item() * (seqlen - 1)
            count += seqlen - 1
    return math.exp(nll / count)


def reference_sliding(model, ids, seqlen, stride):
    """The transformers perplexity guide's loop, with exact token counting."""
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + seqlen, len(ids))
            trg = end - prev_end
            x = ids[begin:end].unsqueeze(0)
            labels = x.clone()
            labels[:, :-trg] = -100
            n_valid = (labels[:, 1:] != -100).sum().item()
            nll += model(x, labels=labels).loss.double().item() * n_valid
            count += n_valid
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll / count)


# ---- the same numbers, and a threshold that a buggy implementation would miss ---------------


@pytest.fixture(scope="module")
def real(smollm2_dir, botchan_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tok(botchan_text[int(len(botchan_text) * 0.6) :], return_tensors="pt").input_ids[0][:1536]
    return model, ids


@pytest.mark.slow
def test_windows_perplexity_matches_reference_and_bugs_would_not(real):
    model, ids = real
    seqlen = 256
    ref = reference_windows(model, ids, seqlen)
    windows = make_windows(len(ids), seqlen, "windows")
    ours = {b: evaluate(model, ids, windows, batch_size=b, progress=False) for b in (1, 4)}
    for b, r in ours.items():
        assert r.tokens == 6 * 255 and r.windows == 6
        assert abs(r.perplexity / ref - 1) < 1e-3, (b, r.perplexity, ref)

    def rel(x):
        return abs(x / ref - 1)

    # a window off by one token
    shifted = evaluate(model, ids[1:], make_windows(len(ids) - 1, seqlen, "windows"), progress=False).perplexity
    assert rel(shifted) > 1e-3
    # labels shifted by one position too many (predicting the token after next)
    nll, cnt = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = ids[w.begin : w.end]
            logits = model(x.unsqueeze(0)).logits[0].float()
            nll += F.cross_entropy(logits[:-2], x[2:], reduction="sum").item()
            cnt += len(x) - 2
    assert rel(math.exp(nll / cnt)) > 1e-3
    # the mean of window perplexities instead of the mean token NLL
    per_window = ours[1].token_nll.reshape(6, 255).mean(1)
    assert rel(float(sum(math.exp(v) for v in per_window) / 6)) > 1e-3


@pytest.mark.slow
def test_sliding_perplexity_matches_reference_and_overlap_counting_would_not(real):
    model, ids = real
    seqlen, stride = 256, 128
    ref = reference_sliding(model, ids, seqlen, stride)
    r = evaluate(model, ids, make_windows(len(ids), seqlen, "sliding", stride), batch_size=3, progress=False)
    assert r.tokens == len(ids) - 1
    assert abs(r.perplexity / ref - 1) < 1e-3, (r.perplexity, ref)
    # counting every window's tokens (overlaps scored twice, short contexts included) is a different number
    naive = [w for w in make_windows(len(ids), seqlen, "sliding", stride)]
    from llmquant.evaluate.perplexity import Window

    overlapping = [Window(w.begin, w.end, w.begin + 1) for w in naive]
    wrong = evaluate(model, ids, overlapping, progress=False).perplexity
    assert abs(wrong / ref - 1) > 1e-3
    # and the sliding protocol gives lower perplexity than windows (more context per token)
    assert r.perplexity < reference_windows(model, ids, seqlen)


def test_divergence_matches_a_direct_computation(tmp_path):
    a = build_tiny("llama")
    b = build_tiny("llama")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(0, 512, (400,), generator=torch.Generator().manual_seed(1))
    windows = make_windows(len(ids), 64, "windows")
    store = LogprobStore(tmp_path / "ref.npy", 250, 512, "w+")
    evaluate(a, ids, windows, write_logprobs=store, progress=False)
    r = evaluate(b, ids, windows, reference=store, progress=False)
    # direct: full fp32 logits of both models at the first 250 scored positions
    with torch.no_grad():
        la = torch.cat([torch.log_softmax(a(ids[w.begin : w.end].unsqueeze(0)).logits[0, :-1].float(), -1) for w in windows])[:250]
        lb = torch.cat([torch.log_softmax(b(ids[w.begin : w.end].unsqueeze(0)).logits[0, :-1].float(), -1) for w in windows])[:250]
    kl = (la.exp() * (la - lb)).sum(-1)
    d = r.divergence
    assert d["tokens"] == 250
    assert d["kl_divergence"]["mean"] == pytest.approx(kl.mean().item(), rel=0.01)
    assert d["kl_divergence"]["p99"] == pytest.approx(torch.quantile(kl, 0.99).item(), rel=0.02)
    assert d["top1_agreement"] == pytest.approx((la.argmax(-1) == lb.argmax(-1)).float().mean().item(), abs=0.01)
    assert 0 < d["kl_divergence"]["mean"] and d["top1_agreement"] < 1
    # a model compared with itself: no divergence (up to the fp16 storage of the reference)
    same = evaluate(a, ids, windows, reference=store, progress=False).divergence
    assert same["kl_divergence"]["mean"] < 1e-4 and same["top1_agreement"] == 1.0
    store.close()


def test_a_batch_out_of_memory_backs_off_to_smaller_batches():
    model = build_tiny("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (8 * 24,))
    windows = make_windows(len(ids), 24, "windows")
    seen = []

    class SmallGpu(torch.nn.Module):  # runs out of memory above 2 windows at once
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            seen.append(len(x))
            if len(x) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return self.inner(x)

    one = evaluate(model, ids, windows, batch_size=1)
    backed = evaluate(SmallGpu(), ids, windows, batch_size=8)
    assert backed.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert seen[:4] == [8, 4, 2, 2] and max(seen[1:]) <= 4
