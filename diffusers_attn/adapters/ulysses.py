"""The Ulysses exchange inside an accelerated processor (diffusers' context parallelism, video-only sharding).

Only the video tokens are split across ranks (and the video RoPE tables with them); text stays replicated. Inside
each accelerated processor the video q/k/v go through one all-to-all from (local sequence, all heads) to (full
sequence, local heads); the local-head slice of the replicated text is appended, so the method sees the canonical
token order ``[text, video (t, h, w)]`` / ``[video, text]`` of the whole sequence for its heads, exactly as on one
GPU. Afterwards the video output goes back with the inverse all-to-all and the text output is all-gathered over
heads. Ring attention is refused: sparse patterns need every key of a query block on one rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def _wait(x: torch.Tensor) -> torch.Tensor:
    funcol = _funcol()
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


class UlyssesExchange:
    """Collectives of one Ulysses group (built from a diffusers ``ParallelConfig``)."""

    def __init__(self, parallel_config: Any) -> None:
        cp = getattr(parallel_config, "context_parallel_config", parallel_config)
        if cp is None:
            raise ValueError("diffusers-attn: parallel config has no context_parallel_config")
        if (cp.ring_degree or 1) > 1:
            raise ValueError(
                "diffusers-attn: ring attention (ring_degree > 1) is not supported by the accelerated processors: "
                "sparse patterns need all keys of a query block on one rank. Use ulysses_degree instead."
            )
        self.mesh = cp._ulysses_mesh
        if self.mesh is None:
            raise ValueError("diffusers-attn: the context parallel config is not set up (no Ulysses mesh)")
        self.group = self.mesh.get_group()
        self.size = self.mesh.size()
        self.rank = dist.get_rank(self.group)

    def _a2a(self, x: torch.Tensor) -> torch.Tensor:
        return _wait(_funcol().all_to_all_single(x.contiguous(), None, None, self.group))

    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S/P, H, D) local sequence, all heads -> (B, S, H/P, D) full sequence, local heads."""
        B, s, H, D = x.shape
        P = self.size
        if H % P:
            raise ValueError(f"diffusers-attn: {H} heads are not divisible by the Ulysses degree {P}")
        y = self._a2a(x.reshape(B, s, P, H // P, D).permute(2, 0, 1, 3, 4))  # chunk i -> rank i
        return y.reshape(P, B, s, H // P, D).permute(1, 0, 2, 3, 4).reshape(B, P * s, H // P, D)

    def heads_to_seq(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`seq_to_heads`."""
        B, S, h, D = y.shape
        P = self.size
        x = self._a2a(y.reshape(B, P, S // P, h, D).permute(1, 0, 2, 3, 4))  # (P, B, s, h, D)
        return x.reshape(P, B, S // P, h, D).permute(1, 2, 0, 3, 4).reshape(B, S // P, P * h, D)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H/P, D) -> (B, N, H, D): all-gather over heads."""
        g = _wait(_funcol().all_gather_tensor(x.permute(2, 0, 1, 3).contiguous(), 0, self.group))
        return g.permute(1, 2, 0, 3)

    def head_slice(self, heads: int) -> slice:
        h = heads // self.size
        return slice(self.rank * h, (self.rank + 1) * h)


def joint_to_global(ex: UlyssesExchange, x: torch.Tensor, text_len: int, text_first: bool) -> torch.Tensor:
    """(B, text + local video, H, D) -> (B, text + all video, H/P, D) in canonical order, local heads."""
    H = x.shape[2]
    if text_first:
        txt, vid = x[:, :text_len], x[:, text_len:]
    else:
        vid, txt = x[:, : x.shape[1] - text_len], x[:, x.shape[1] - text_len :]
    vid = ex.seq_to_heads(vid)
    txt = txt[:, :, ex.head_slice(H)]
    return torch.cat([txt, vid], dim=1) if text_first else torch.cat([vid, txt], dim=1)


def global_to_joint(ex: UlyssesExchange, o: torch.Tensor, text_len: int, text_first: bool) -> torch.Tensor:
    """Inverse of :func:`joint_to_global` for the attention output: (B, N, H/P, D) -> (B, text + local video, H, D)."""
    if text_first:
        txt, vid = o[:, :text_len], o[:, text_len:]
    else:
        vid, txt = o[:, : o.shape[1] - text_len], o[:, o.shape[1] - text_len :]
    vid = ex.heads_to_seq(vid)
    txt = ex.gather_heads(txt)
    return torch.cat([txt, vid], dim=1) if text_first else torch.cat([vid, txt], dim=1)
