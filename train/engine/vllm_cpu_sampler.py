"""Top-p sampling on CPU without sorting the whole vocabulary, loaded into vLLM by our general plugin.

vLLM-CPU applies top-p (`apply_top_k_top_p_pytorch`) by sorting every row of the logits, [running sequences x
vocab], at every decode step. For SmolLM2's 49,152-token vocabulary and 256 sequences that sort alone took 0.45-0.9 s
per step on the 2-core box, more than the model's forward: it is why the demo (top_p 0.9) sampled at 40% of the
bench's rate (top_p 1.0, no sort), issue 15.

The top-p set of a row is the smallest prefix of its tokens, by descending probability, whose mass reaches p: vLLM
keeps a token when the mass of the tokens ranked above it is below p. Those tokens are all among the row's K most
probable whenever the K together hold at least p of the mass, so `torch.topk(K)` decides the row exactly. K grows
in tiers (`CANDIDATES`): a small K first, since at top-p 0.9 a language model's row keeps a handful of tokens, then
a large K for the rows the small one did not decide, and vLLM's own sort for the rows whose top 1,024 still hold
less (flat distributions). A row's kept set does not depend on the tier that decided it (the cumulative sums of
its first tokens are the same), so the tiers only change the cost. The kept set is the same as vLLM's up to the
order of equal probabilities and floating-point rounding of the cumulative sum at the boundary.
Sampling itself (`forward_cpu`) then draws each row's token from its kept candidates instead of building the
masked [rows x vocab] logits and running vLLM's Gumbel-max over the whole vocabulary: the exponential race
argmax(prob / Exp(1)) over the kept set is the same categorical distribution (probabilities proportional to
exp(logit), renormalised over the kept tokens) that Gumbel-max over the masked logits draws from. The full-vocabulary
work left per step is `topk` and one sum of exp(logit - max), taken in blocks of rows that stay in cache. At the
demo's 768 sequences this cut the sampler from ~0.3 s to ~0.07 s per step (docs/results.md). Rows with their own
seed (`SamplingParams(seed=)`), top-k, a processed-logprobs mode or fp64 Gumbel noise keep vLLM's path. Without
top-p (temperature alone: the eval's sampled answers, the judges) a row draws from its top candidates with their
total probability, else from the other tokens by vLLM's Gumbel-max (`sample_from_top_k_or_tail`): exact, and 1.9x
cheaper per step than Gumbel-max over the vocabulary.
`SELFREWARD_CPU_TOP_P_FASTPATH=0` turns both off.
"""

from __future__ import annotations

from typing import Any

import torch

from train.engine.vllm_cpu_lora import cpu_fastpath_enabled

# K per tier: the top-p=0.9 set of a language model at T=0.7-1.0 is a few tokens for most rows and rarely more than a
# few hundred; topk's cost grows with K (measured in scripts/bench_top_p.py).
CANDIDATES = (64, 1024)


# Rows per block when summing exp(logit - max): a block of [32 x 49,152] float32 (6 MB) stays in cache between the
# subtraction, the exp and the sum, 3x faster than three passes over [768 x 49,152] (measured on the 2-core box).
_ROWS_PER_BLOCK = 32


def _exp_sums(logits: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """sum_v exp(logits[b, v] - row_max[b]) per row (a row's probability mass relative to its top token)."""
    sums = torch.empty(logits.shape[0], dtype=torch.float32)
    block = torch.empty(min(_ROWS_PER_BLOCK, logits.shape[0]), logits.shape[1], dtype=torch.float32)
    for start in range(0, logits.shape[0], _ROWS_PER_BLOCK):
        rows = slice(start, start + _ROWS_PER_BLOCK)
        buf = block[: logits[rows].shape[0]]
        torch.sub(logits[rows], row_max[rows].unsqueeze(1), out=buf)
        torch.sum(buf.exp_(), dim=-1, out=sums[rows])
    return sums


def _top_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A row's k most probable tokens, descending: (logits, ids, probabilities over the whole vocabulary)."""
    top_logits, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)
    top = (top_logits - top_logits[:, :1]).exp_().div_(_exp_sums(logits, top_logits[:, 0]).unsqueeze(1))
    return top_logits, idx, top


def _race(weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One id per row, weights[j] / sum(weights) the chance of idx[j]: argmax(weight / Exp(1)), the exponential race
    (vLLM's `random_sample` draws the same way over the whole vocabulary). Overwrites `weights`."""
    race = torch.empty_like(weights).exponential_().clamp_min_(torch.finfo(torch.float32).tiny)  # 0 would give 0/0
    return idx.gather(1, weights.div_(race).argmax(dim=-1, keepdim=True)).squeeze(1)


def _candidates(
    logits: torch.Tensor, p: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A row's k most probable tokens: (logits, ids, probabilities, kept, decided), descending. `kept`: the mass
    ranked strictly above the token is below p (vLLM's rule); `decided`: the k together hold at least p."""
    top_logits, idx, top = _top_probs(logits, k)
    above = top.cumsum(dim=-1).sub_(top)
    p = p.to(torch.float32)
    kept = above < p.unsqueeze(1)
    kept[:, 0] = True  # at least one token, as vLLM keeps
    return top_logits, idx, top, kept, top.sum(dim=-1) >= p


def top_p_from_top_k(
    logits: torch.Tensor, p: torch.Tensor, k: int = CANDIDATES[-1]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, decided): `logits` with every token outside its row's top-p set at -inf (a new tensor), valid where
    `decided[b]`: row b's k most probable tokens hold at least p[b] of its probability mass."""
    logits = logits.float()
    top_logits, idx, _, kept, decided = _candidates(logits, p, k)
    masked = torch.full_like(logits, -float("inf")).scatter_(1, idx, top_logits.masked_fill_(~kept, -float("inf")))
    return masked, decided


def sample_top_p_from_top_k(logits: torch.Tensor, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, decided): one token per row drawn from its top-p set with probability proportional to exp(logit),
    valid where `decided[b]` (as `top_p_from_top_k`). The exponential race over the kept candidates: vLLM's
    `random_sample` draws the same way over the whole vocabulary."""
    _, idx, top, kept, decided = _candidates(logits.float(), p, k)
    return _race(top.masked_fill_(~kept, 0.0), idx), decided


def apply_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None, candidates: tuple[int, ...] = CANDIDATES
) -> torch.Tensor:
    """vLLM's `apply_top_k_top_p` (same arguments and result), top-p by `topk` instead of a sort of every row:
    each tier of `candidates` takes the rows the smaller ones left undecided, vLLM's sort the rest."""
    from vllm.v1.sample.ops import topk_topp_sampler as vllm_ops

    if p is None or k is not None:  # top-k alone already avoids the sort; top-k with top-p stays vLLM's
        return vllm_ops.apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)
    masked, decided = top_p_from_top_k(logits, p, candidates[0])
    rest = (~decided).nonzero().squeeze(1)  # rows still undecided, as indices into the batch
    for k_tier in candidates[1:]:
        if rest.numel() == 0:
            break
        masked[rest], decided = top_p_from_top_k(logits[rest], p[rest], k_tier)
        rest = rest[~decided]
    if rest.numel():  # flat rows: vLLM's sort, for those rows only
        masked[rest] = vllm_ops.apply_top_k_top_p_pytorch(logits[rest].float(), None, p[rest], allow_cpu_sync=True)
    return masked.to(logits.dtype)


def sample_from_top_k_or_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, tail rows, their tail logits): a draw from softmax(logits) over the whole vocabulary, no top-p, as a
    mixture. With probability `covered` (the mass of the row's k most probable tokens) the token is drawn among those
    k by the exponential race, else from the other tokens: the rows in `tail` drew that branch and still need their
    token from the returned logits (the row with its k candidates at -inf), in proportion to exp(logit), as vLLM's
    Gumbel-max draws. A row whose other tokens are all -inf (allowed_token_ids, bad words) never needs it. Exact:
    a candidate keeps probability covered · p/covered = p, any other token (1 - covered) · p/(1 - covered) = p."""
    logits = logits.float()
    _, idx, top = _top_probs(logits, k)
    covered = top.sum(dim=-1)
    tokens = _race(top, idx)
    tail = (torch.rand_like(covered) >= covered).nonzero().squeeze(1)
    rest = logits[tail].scatter_(1, idx[tail], -float("inf"))
    some = torch.isfinite(rest).any(dim=-1)
    return tokens, tail[some], rest[some]


_VLLM_FORWARD_CPU: Any = None  # vLLM's own TopKTopPSampler.forward_cpu, kept for the rows and modes we leave to it


def forward_cpu(
    self: Any,
    logits: torch.Tensor,
    generators: dict[int, torch.Generator],
    k: torch.Tensor | None,
    p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`TopKTopPSampler.forward_cpu` without top-k. Top-p: each tier of `CANDIDATES` samples the rows the smaller ones
    left undecided from their candidates; vLLM's own path (sort, masked logits, Gumbel-max) takes the rest. No top-p
    (temperature alone): `sample_from_top_k_or_tail`, vLLM's Gumbel-max for the rows that drew the tail."""
    from vllm.v1.sample.ops.topk_topp_sampler import PROCESSED_LOGPROBS_MODES

    if generators or k is not None or self.use_fp64_gumbel or self.logprobs_mode in PROCESSED_LOGPROBS_MODES:
        return _VLLM_FORWARD_CPU(self, logits, generators, k, p)
    if p is None:  # temperature alone: the whole vocabulary, as a mixture of the top candidates and the tail
        tokens, tail, tail_logits = sample_from_top_k_or_tail(logits, CANDIDATES[0])
        if tail.numel():
            tokens[tail] = _VLLM_FORWARD_CPU(self, tail_logits, {}, None, None)[0].to(tokens.dtype)
        return tokens, None
    tokens, decided = sample_top_p_from_top_k(logits, p, CANDIDATES[0])
    rest = (~decided).nonzero().squeeze(1)
    for k_tier in CANDIDATES[1:]:
        if rest.numel() == 0:
            break
        tokens[rest], decided = sample_top_p_from_top_k(logits[rest], p[rest], k_tier)
        rest = rest[~decided]
    if rest.numel():  # flat rows: vLLM's sort and Gumbel-max, for those rows only
        tokens[rest] = _VLLM_FORWARD_CPU(self, logits[rest].contiguous(), {}, None, p[rest])[0].to(tokens.dtype)
    return tokens, None


def install() -> None:
    """Use `apply_top_k_top_p` and `forward_cpu` in vLLM's CPU sampler (CPU platform only)."""
    global _VLLM_FORWARD_CPU
    if not cpu_fastpath_enabled("SELFREWARD_CPU_TOP_P_FASTPATH"):
        return
    try:
        from vllm.v1.sample.ops import topk_topp_sampler
    except ImportError:  # another vLLM layout: keep vLLM's own sampler
        return
    if getattr(topk_topp_sampler, "HAS_TRITON", False) or not hasattr(topk_topp_sampler, "apply_top_k_top_p_pytorch"):
        return  # a Triton CPU build has its own kernel
    topk_topp_sampler.apply_top_k_top_p = apply_top_k_top_p
    sampler = topk_topp_sampler.TopKTopPSampler
    if sampler.forward_cpu is not forward_cpu and hasattr(topk_topp_sampler, "PROCESSED_LOGPROBS_MODES"):
        _VLLM_FORWARD_CPU = sampler.forward_cpu
        sampler.forward_cpu = forward_cpu  # bound per instance in __init__: samplers built from now on use it
