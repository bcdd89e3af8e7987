"""Softmax attention for attn/swa blocks and the Titans hybrids: causal SDPA, sliding window, RoPE, global prefix.

    o_i = sum_{j in N(i)} softmax_j(q_i . k_j / sqrt(d)) v_j ,
    N(i) = {prefix tokens} U {j <= i, i - j < window}          (window = None: full causal attention)

Persistent memory (Titans Eq. 19): the N_p learnable tokens P are prepended to the block input, ``[P || x]``, by
the block that owns them and passed here as a *global prefix* (``n_prefix``): every query sees them, and they carry no
rotary position (they are position-free; the sequence tokens get RoPE positions 0, 1, ...).

Decoding: :meth:`Attention.forward` takes and returns a KV cache ``{"k", "v", "pk", "pv", "pos"}``; sliding-window
layers keep only the last ``window`` keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miras.spec import AttentionSpec


def rope_tables(positions: Tensor, d_head: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[T, d_head/2]`` for rotary embeddings (Su et al. 2021, arXiv:2104.09864)."""
    half = d_head // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=torch.float64) / half)
    ang = positions.double()[:, None] * inv_freq[None, :]  # [T, half], float64 so long positions stay exact
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + d/2) of ``x [B, T, H, d]``; an odd last channel is left as is."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)  # [1, T, 1, half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


def attention_param_count(*, d_model: int, n_heads: int, d_head: int) -> int:
    """W_q, W_k, W_v: d_model -> H*d_head and W_o: H*d_head -> d_model, no biases."""
    return 4 * d_model * n_heads * d_head


class Attention(nn.Module):
    """Multi-head causal softmax attention with optional sliding window, RoPE and a global prefix."""

    def __init__(self, spec: AttentionSpec, *, d_model: int, n_heads: int, d_head: int, window: int | None) -> None:
        super().__init__()
        self.spec, self.n_heads, self.d_head, self.window = spec, n_heads, d_head, window
        inner = n_heads * d_head
        self.w_q = nn.Linear(d_model, inner, bias=False)
        self.w_k = nn.Linear(d_model, inner, bias=False)
        self.w_v = nn.Linear(d_model, inner, bias=False)
        self.w_o = nn.Linear(inner, d_model, bias=False)

    def _heads(self, x: Tensor, proj: nn.Linear) -> Tensor:
        B, T, _ = x.shape
        return proj(x).view(B, T, self.n_heads, self.d_head)  # [B, T, H, d]

    def forward(self, x: Tensor, state: dict | None = None, *, n_prefix: int = 0) -> tuple[Tensor, dict]:
        """Attend causally over ``x [B, T, D]``; its first ``n_prefix`` positions form the global prefix.

        The prefix is only read from ``x`` when ``state`` is None (the start of a sequence); afterwards it lives
        in the cache. Returns the outputs at all T positions (prefix included) and the new cache.
        """
        B = x.shape[0]
        pos0 = 0 if state is None else state["pos"]
        pre, seq = x[:, :n_prefix], x[:, n_prefix:]
        T = seq.shape[1]
        q, k, v = self._heads(seq, self.w_q), self._heads(seq, self.w_k), self._heads(seq, self.w_v)
        if self.spec.rope:
            cos, sin = rope_tables(torch.arange(pos0, pos0 + T, device=x.device), self.d_head, self.spec.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is None:
            pk, pv = self._heads(pre, self.w_k), self._heads(pre, self.w_v)  # [B, Np, H, d], no rotation
            ck, cv = k, v
        else:
            pk, pv = state["pk"], state["pv"]
            ck, cv = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
        n_cached = ck.shape[1] - T
        kpos = torch.arange(pos0 - n_cached, pos0 + T, device=x.device)  # positions of ck
        qpos = torch.arange(pos0, pos0 + T, device=x.device)
        keep = kpos[None, :] <= qpos[:, None]
        if self.window is not None:
            keep = keep & (kpos[None, :] > qpos[:, None] - self.window)
        n_pre = pk.shape[1]
        # queries: prefix positions (they see the prefix and nothing else) then sequence positions
        qp = self._heads(pre, self.w_q) if state is None else q[:, :0]
        allq = torch.cat([qp, q], 1)  # [B, Np' + T, H, d]
        allk, allv = torch.cat([pk, ck], 1), torch.cat([pv, cv], 1)
        if n_pre == 0 and n_cached == 0 and self.window is None:  # plain causal: let SDPA pick a fused kernel
            mask, causal = None, True
        else:
            mask, causal = torch.zeros(allq.shape[1], allk.shape[1], dtype=torch.bool, device=x.device), False
            n_qp = qp.shape[1]
            mask[:n_qp, :n_pre] = torch.ones(n_qp, n_pre, dtype=torch.bool, device=x.device).tril()  # causal prefix
            mask[n_qp:, :n_pre] = True
            mask[n_qp:, n_pre:] = keep
        o = F.scaled_dot_product_attention(
            allq.transpose(1, 2), allk.transpose(1, 2), allv.transpose(1, 2), attn_mask=mask, is_causal=causal
        )  # [B, H, Np' + T, d]
        o = self.w_o(o.transpose(1, 2).reshape(B, allq.shape[1], -1))  # [B, Np' + T, D]
        if self.window is not None:
            ck, cv = ck[:, -self.window :], cv[:, -self.window :]
        return o, {"k": ck, "v": cv, "pk": pk, "pv": pv, "pos": pos0 + T}
