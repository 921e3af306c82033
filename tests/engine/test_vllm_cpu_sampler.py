"""Top-p on CPU by `topk` (train/engine/vllm_cpu_sampler.py) keeps the tokens vLLM's full sort keeps."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import require


@pytest.fixture(scope="module")
def vllm_ops():
    require("vllm")
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C: vLLM's own CPU sampling kernel)
    from vllm.v1.sample.ops import topk_topp_sampler

    return topk_topp_sampler


def _lm_like(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Peaked rows, like a language model's logits at T=0.7: a few likely tokens over a long tail."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    logits[:, :40] += torch.linspace(12, 2, 40)  # the head of each row
    return logits[:, torch.randperm(vocab, generator=g)] / 0.7


def test_top_p_keeps_vllms_tokens_and_logits(vllm_ops):
    from train.engine.vllm_cpu_sampler import apply_top_k_top_p

    logits = _lm_like(64, 49152, 0)
    logits[:3] = torch.randn(3, 49152) * 0.01  # flat rows: their top 1024 hold < p, so they take vLLM's sort
    p = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.45
    ref = vllm_ops.apply_top_k_top_p_pytorch(logits.clone(), None, p, allow_cpu_sync=True)
    ours = apply_top_k_top_p(logits.clone(), None, p)
    kept_ref, kept = torch.isfinite(ref), torch.isfinite(ours)
    assert torch.equal(kept, kept_ref)
    assert torch.equal(ours[kept], logits[kept]), "kept tokens keep their logits"
    assert 1 <= kept[3:].sum(1).min() and kept[3:].sum(1).max() < 1024 and kept[:3].sum(1).min() > 1024


def test_every_tier_keeps_vllms_tokens(vllm_ops):
    """Rows decided by top 64, rows only top 1024 decide (a head of 300 near-equal tokens), flat rows (vLLM's sort),
    interleaved: each row's kept set is vLLM's, whichever tier decides it, and whatever the tiers are."""
    from train.engine.vllm_cpu_sampler import apply_top_k_top_p, top_p_from_top_k

    g = torch.Generator().manual_seed(3)
    logits = _lm_like(24, 49152, 4)
    logits[1::3] = torch.randn(8, 49152, generator=g)
    logits[1::3, :300] += 8.0  # the medium rows: about 95% of the mass in 300 tokens
    logits[2::6] = torch.randn(4, 49152, generator=g) * 0.01  # flat
    p = torch.rand(24, generator=g) * 0.4 + 0.5
    by_64, by_1024 = top_p_from_top_k(logits, p, 64)[1], top_p_from_top_k(logits, p, 1024)[1]
    assert by_64.any() and (by_1024 & ~by_64).any() and (~by_1024).any(), "each tier decides some row"
    kept_ref = torch.isfinite(vllm_ops.apply_top_k_top_p_pytorch(logits.clone(), None, p, allow_cpu_sync=True))
    for tiers in [(64, 1024), (64,), (1024,), (8, 64, 1024)]:
        ours = apply_top_k_top_p(logits.clone(), None, p, candidates=tiers)
        assert torch.equal(torch.isfinite(ours), kept_ref), tiers
        assert torch.equal(ours[kept_ref], logits[kept_ref])


def test_top_k_and_no_filter_are_vllms(vllm_ops):
    from train.engine.vllm_cpu_sampler import apply_top_k_top_p

    logits = _lm_like(8, 4096, 2)
    k, p = torch.full((8,), 5), torch.full((8,), 0.9)
    assert torch.equal(
        apply_top_k_top_p(logits.clone(), k, p),
        vllm_ops.apply_top_k_top_p_pytorch(logits.clone(), k, p, allow_cpu_sync=True),
    )
    assert torch.equal(apply_top_k_top_p(logits.clone(), None, None), logits)


def _sample(vllm_ops, logits, p, generators=None, k=None, mode="raw_logprobs"):
    from train.engine import vllm_cpu_sampler

    vllm_cpu_sampler.install()
    sampler = vllm_ops.TopKTopPSampler(mode)
    return sampler.forward_cpu(logits, generators or {}, k, p)


def test_sampling_draws_vllms_top_p_set_with_its_probabilities(vllm_ops, monkeypatch):
    """Rows each tier decides and a flat row (vLLM's own path), 3,000 draws each: every token is in the row's top-p
    set as vLLM's sort keeps it, and the frequencies are the softmax renormalised over that set."""
    from train.engine import vllm_cpu_sampler

    monkeypatch.setattr(vllm_cpu_sampler, "CANDIDATES", (4, 64))  # small tiers, so a 2,048-token vocabulary has all
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(4, 2048, generator=g)
    rows[0, :3] += torch.tensor([9.0, 8.5, 8.0])  # decided by the top 4
    rows[1, :30] += 7.0  # ~30 near-equal tokens hold the mass: the top 64 decide
    rows[2] *= 0.05  # flat: neither tier decides, vLLM's sort and Gumbel-max draw it
    rows[3, 0] += 30.0  # one token holds everything
    p = torch.tensor([0.9, 0.8, 0.9, 0.9])
    draws = 3000
    torch.manual_seed(0)
    tokens, processed = _sample(vllm_ops, rows.repeat_interleave(draws, 0), p.repeat_interleave(draws))
    assert processed is None and tokens.shape == (4 * draws,) and tokens.dtype == torch.int64
    kept = torch.isfinite(vllm_ops.apply_top_k_top_p_pytorch(rows.clone(), None, p, allow_cpu_sync=True))
    for r in range(4):
        drawn = tokens[r * draws : (r + 1) * draws]
        assert kept[r, drawn].all(), f"row {r}: a token outside vLLM's top-p set"
        want = torch.where(kept[r], rows[r], -float("inf")).softmax(-1)
        got = torch.bincount(drawn, minlength=2048).float() / draws
        assert (got - want).abs().max() < 0.04, f"row {r}: frequencies {(got - want).abs().max():.3f} off"
    assert (tokens[3 * draws :] == 0).all()
    assert kept[2].sum() > 64, "the flat row needs vLLM's path"


def test_temperature_alone_draws_the_whole_softmax(vllm_ops, monkeypatch):
    """No top-p: candidates or tail, each token keeps its softmax probability. Rows with much mass outside the top 4
    (the tail branch, vLLM's Gumbel-max), a peaked row, and a row allowed only 3 tokens (-inf elsewhere: the tail is
    never drawn), 4,000 draws each over a 64-token vocabulary."""
    from train.engine import vllm_cpu_sampler

    monkeypatch.setattr(vllm_cpu_sampler, "CANDIDATES", (4, 64))
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(4, 64, generator=g)
    rows[1] *= 3.0
    rows[2, :2] += 6.0  # peaked
    rows[3, 3:] = -float("inf")  # allowed tokens 0-2 only
    draws = 4000
    torch.manual_seed(1)
    tokens, processed = _sample(vllm_ops, rows.repeat_interleave(draws, 0), None)
    assert processed is None and tokens.dtype == torch.int64
    top4_share = []
    for r in range(4):
        drawn = tokens[r * draws : (r + 1) * draws]
        want = rows[r].softmax(-1)
        got = torch.bincount(drawn, minlength=64).float() / draws
        assert (got - want).abs().max() < 0.03, f"row {r}: frequencies {(got - want).abs().max():.3f} off"
        top4_share.append(float(got[want.topk(4).indices].sum()))
    assert top4_share[0] < 0.8, "row 0 drew from the tail often (vLLM's Gumbel-max on the other tokens)"
    assert set(tokens[3 * draws :].tolist()) <= {0, 1, 2}


def test_seeded_rows_top_k_and_processed_logprobs_keep_vllms_sampler(vllm_ops, monkeypatch):
    from train.engine import vllm_cpu_sampler

    vllm_cpu_sampler.install()
    calls = []
    vllm_forward = vllm_cpu_sampler._VLLM_FORWARD_CPU
    monkeypatch.setattr(vllm_cpu_sampler, "_VLLM_FORWARD_CPU", lambda *a: calls.append(a) or vllm_forward(*a))
    logits, p = _lm_like(4, 4096, 6), torch.full((4,), 0.9)
    torch.manual_seed(0)
    _sample(vllm_ops, logits.clone(), p)
    _sample(vllm_ops, logits.clone(), None)  # peaked rows: the top candidates hold all but ~1e-4 of the mass
    assert calls == [], "top-p alone or temperature alone, unseeded: ours"
    _sample(vllm_ops, logits.clone(), p, generators={0: torch.Generator().manual_seed(1)})
    _sample(vllm_ops, logits.clone(), p, k=torch.full((4,), 5))
    tokens, processed = _sample(vllm_ops, logits.clone(), p, mode="processed_logprobs")
    assert len(calls) == 3 and processed is not None and processed.shape == logits.shape


def test_install_replaces_vllms_cpu_top_p_unless_turned_off(vllm_ops, monkeypatch):
    from train.engine import vllm_cpu_sampler

    original = vllm_ops.apply_top_k_top_p
    original_forward = vllm_cpu_sampler._VLLM_FORWARD_CPU or vllm_ops.TopKTopPSampler.forward_cpu
    monkeypatch.setattr(vllm_ops, "apply_top_k_top_p", original)
    monkeypatch.setattr(vllm_ops.TopKTopPSampler, "forward_cpu", original_forward)
    monkeypatch.setenv("SELFREWARD_CPU_TOP_P_FASTPATH", "0")
    vllm_cpu_sampler.install()
    assert vllm_ops.apply_top_k_top_p is original
    assert vllm_ops.TopKTopPSampler.forward_cpu is original_forward
    monkeypatch.delenv("SELFREWARD_CPU_TOP_P_FASTPATH")
    vllm_cpu_sampler.install()
    assert vllm_ops.apply_top_k_top_p is vllm_cpu_sampler.apply_top_k_top_p
    assert vllm_ops.TopKTopPSampler.forward_cpu is vllm_cpu_sampler.forward_cpu
    assert vllm_cpu_sampler._VLLM_FORWARD_CPU is original_forward
