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
`SELFREWARD_CPU_TOP_P_FASTPATH=0` turns it off.
"""

from __future__ import annotations

import torch

from train.engine.vllm_cpu_lora import cpu_fastpath_enabled

# K per tier: the top-p=0.9 set of a language model at T=0.7-1.0 is a few tokens for most rows and rarely more than a
# few hundred; topk's cost grows with K (measured in scripts/bench_top_p.py).
CANDIDATES = (64, 1024)


def top_p_from_top_k(
    logits: torch.Tensor, p: torch.Tensor, k: int = CANDIDATES[-1]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, decided): `logits` with every token outside its row's top-p set at -inf (a new tensor), valid where
    `decided[b]`: row b's k most probable tokens hold at least p[b] of its probability mass."""
    k = min(k, logits.shape[-1])
    logits = logits.float()
    top_logits, idx = logits.topk(k, dim=-1)  # descending
    top = (top_logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()  # their probabilities
    above = top.cumsum(dim=-1) - top  # mass ranked strictly above each candidate
    p = p.to(torch.float32).unsqueeze(1)
    kept = above < p
    kept[:, 0] = True  # at least one token, as vLLM keeps
    decided = top.sum(dim=-1) >= p.squeeze(1)
    masked = torch.full_like(logits, -float("inf")).scatter_(1, idx, top_logits.masked_fill_(~kept, -float("inf")))
    return masked, decided


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


def install() -> None:
    """Use `apply_top_k_top_p` in vLLM's CPU sampler (CPU platform only)."""
    if not cpu_fastpath_enabled("SELFREWARD_CPU_TOP_P_FASTPATH"):
        return
    try:
        from vllm.v1.sample.ops import topk_topp_sampler
    except ImportError:  # another vLLM layout: keep vLLM's own sampler
        return
    if getattr(topk_topp_sampler, "HAS_TRITON", False) or not hasattr(topk_topp_sampler, "apply_top_k_top_p_pytorch"):
        return  # a Triton CPU build has its own kernel
    topk_topp_sampler.apply_top_k_top_p = apply_top_k_top_p
