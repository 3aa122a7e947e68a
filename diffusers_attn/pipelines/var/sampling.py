"""VAR's token sampler: top-k / top-p filtering and the generator-driven Gumbel softmax (reference semantics)."""

from __future__ import annotations

import torch


def top_k_top_p_filter_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Filter ``logits`` (..., V) in place, as VAR's ``sample_with_top_k_top_p_``.

    * top-k (k > 0): logits strictly below the k-th largest become -inf, so ties with the k-th survive.
    * top-p (0 < p): sort ascending and drop tokens whose cumulative softmax is <= 1 - p; the largest is always
      kept.
    """
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits.masked_fill_(drop_sorted.scatter(-1, sorted_idx, drop_sorted), -torch.inf)
    return logits


def sample_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per position: filter (in place), then ONE ``multinomial`` over all (B*l) rows. Returns (B, l)."""
    B, l, V = logits.shape
    top_k_top_p_filter_(logits, top_k, top_p)
    idx = torch.multinomial(logits.softmax(dim=-1).view(-1, V), num_samples=1, replacement=True, generator=generator)
    return idx.view(B, l)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft Gumbel softmax whose noise is one exponential draw from ``generator`` (VAR's ``more_smooth``)."""
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(
        generator=generator
    ).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)
