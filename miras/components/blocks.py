"""Token-mixing blocks: lmm, attn, swa and the Titans hybrids MAC, MAG, MAL (Behrouz et al. 2024, arXiv:2501.00663).

Every block maps ``x [B, T, D] -> (y [B, T, D], state)``; the model wraps it as ``x + block(norm(x))``. Persistent
memory P (Titans Eq. 19, N_p learnable tokens ``[N_p, D]``) is prepended at the start of a sequence, ``[P || x]``, and
its output positions are dropped. A ``state`` (returned by the previous call) continues a sequence token by token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from miras.components.attention import Attention
from miras.components.mixer import MemoryMixer
from miras.registry import BLOCK


class _Persistent(nn.Module):
    """Holds the N_p persistent tokens and prepends them at the start of a sequence."""

    def __init__(self, *, d_model: int, n_persistent: int) -> None:
        super().__init__()
        self.n_persistent = n_persistent
        self.persistent = nn.Parameter(torch.randn(n_persistent, d_model) * 0.02) if n_persistent else None

    def prefix(self, x: Tensor, state: dict | None) -> tuple[Tensor, int]:
        """``[P || x]`` and N_p at the start of a sequence; ``x`` and 0 when continuing one."""
        if state is not None or self.persistent is None:
            return x, 0
        p = self.persistent.to(x.dtype).expand(x.shape[0], -1, -1)  # [B, Np, D]
        return torch.cat([p, x], 1), self.n_persistent


@BLOCK.register("lmm")
class LMMBlock(nn.Module):
    """Titans LMM / Miras layer alone: ``y = MemoryMixer(x)``."""

    def __init__(self, *, mixer: MemoryMixer) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        return self.mixer(x, state)


@BLOCK.register("attn")
class AttentionBlock(_Persistent):
    """Causal softmax attention (full for ``attn``, sliding window for ``swa``) over ``[P || x]``."""

    def __init__(self, *, attention: Attention, d_model: int, n_persistent: int = 0) -> None:
        super().__init__(d_model=d_model, n_persistent=n_persistent)
        self.attention = attention

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        xt, n_p = self.prefix(x, state)
        y, state = self.attention(xt, state, n_prefix=n_p)
        return y[:, n_p:], state


BLOCK.register("swa")(AttentionBlock)


@BLOCK.register("mag")
class MAGBlock(_Persistent):
    """Memory as a Gate (Titans Eq. 26-28).

        x~ = [P || x];  y = SW-Attn(x~);  m = LMM(x~);  o = RMSNorm_a(y) * sigmoid(RMSNorm_b(m))
    (the gate form is the paper's "normalise both with learnable vector-valued weights, then a non-linearity").
    """

    def __init__(self, *, mixer: MemoryMixer, attention: Attention, d_model: int, n_persistent: int = 0) -> None:
        super().__init__(d_model=d_model, n_persistent=n_persistent)
        self.mixer, self.attention = mixer, attention
        self.norm_a = nn.RMSNorm(d_model, eps=1e-6)
        self.norm_b = nn.RMSNorm(d_model, eps=1e-6)

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        xt, n_p = self.prefix(x, state)
        y, s_attn = self.attention(xt, None if state is None else state["attn"], n_prefix=n_p)
        m, s_mem = self.mixer(xt, None if state is None else state["mixer"])
        o = self.norm_a(y) * torch.sigmoid(self.norm_b(m))
        return o[:, n_p:], {"attn": s_attn, "mixer": s_mem}


@BLOCK.register("mal")
class MALBlock(_Persistent):
    """Memory as a Layer (Titans Eq. 29-31): ``x~ = [P || x];  y = LMM(x~);  o = SW-Attn(y)``."""

    def __init__(self, *, mixer: MemoryMixer, attention: Attention, d_model: int, n_persistent: int = 0) -> None:
        super().__init__(d_model=d_model, n_persistent=n_persistent)
        self.mixer, self.attention = mixer, attention

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        xt, n_p = self.prefix(x, state)
        y, s_mem = self.mixer(xt, None if state is None else state["mixer"])
        o, s_attn = self.attention(y, None if state is None else state["attn"], n_prefix=n_p)
        return o[:, n_p:], {"attn": s_attn, "mixer": s_mem}


@BLOCK.register("mac")
class MACBlock(_Persistent):
    """Memory as a Context (Titans Eq. 21-25), in the paper's order, segment by segment (length C):

        h_t = M*_{t-1}(q_t)                 read with the state left by the previous segments   (Eq. 21)
        S~  = [P || h_t || S_t]                                                                  (Eq. 22)
        y_t = Attn(S~)  at the segment positions                                                 (Eq. 23)
        M_t = M_{t-1}(y_t)                  write y_t into memory with the LMM rule              (Eq. 24)
        o_t = y_t * sigmoid(M*_t(y_t))      read with the updated memory                         (Eq. 25)

    Causality (an LM must not see the future): position i of a segment attends to P, to h_j and S_j for j <= i
    (h_j is built from token j), implemented by interleaving ``[h_0, s_0, h_1, s_1, ...]`` under a causal mask; and
    the read of Eq. 25 uses the per-token state of ``memory_scan`` (writes of y_1..y_i), not the end-of-segment state.
    h and the Eq. 25 read both pass through the mixer's output path (norm, gate, W_o) to get back to d_model.
    """

    def __init__(
        self, *, mixer: MemoryMixer, attention: Attention, d_model: int, segment_length: int, n_persistent: int = 0
    ) -> None:
        super().__init__(d_model=d_model, n_persistent=n_persistent)
        self.mixer, self.attention, self.segment_length = mixer, attention, segment_length

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        """State: ``{"memory": memory after the last full segment, "x_ctx"/"y_ctx": conv context (and the unfinished
        segment's inputs), "n_pending": tokens of the unfinished segment}``; the unfinished segment is recomputed."""
        C, mixer, ctx_len = self.segment_length, self.mixer, self.mixer.conv_context
        B = x.shape[0]
        if state is None:
            mem, x_ctx, y_ctx, n_pending = mixer.initial_state(), x[:, :0], x[:, :0], 0
        else:
            mem, x_ctx, y_ctx, n_pending = state["memory"], state["x_ctx"], state["y_ctx"], state["n_pending"]
        xs = torch.cat([x_ctx, x], 1)
        lead = x_ctx.shape[1] - n_pending
        q = mixer.queries(xs)[:, lead:]  # [B, n, H, d]
        n = xs.shape[1] - lead
        outs = []
        for s in range(0, n, C):
            seg = xs[:, lead + s : lead + s + C]  # [B, L, D]
            L = seg.shape[1]
            h = mixer.output(mixer.read(q[:, s : s + L], mem), seg)  # Eq. 21: [B, L, D]
            inter = torch.stack([h, seg], 2).reshape(B, 2 * L, -1)  # [h_0, s_0, h_1, s_1, ...]
            xt, n_p = self.prefix(inter, None)
            a, _ = self.attention(xt, None, n_prefix=n_p)  # Eq. 22-23, block-diagonal over segments
            y = a[:, n_p + 1 :: 2]  # outputs at the segment positions: [B, L, D]
            ys = torch.cat([y_ctx, y], 1)
            qy, ky, vy, gy = mixer.features(ys)
            ly = y_ctx.shape[1]
            o_mem, mem_next = mixer.scan(qy[:, ly:], ky[:, ly:], vy[:, ly:], {g: t[:, ly:] for g, t in gy.items()}, mem)
            m = mixer.output(o_mem, y)  # Eq. 24-25 (per-token reads after each write)
            outs.append(y * torch.sigmoid(m))
            if L == C:
                mem, y_ctx = mem_next, ys[:, ys.shape[1] - min(ctx_len, ys.shape[1]) :]
        out = torch.cat(outs, 1)[:, n - x.shape[1] :]
        n_left = n % C
        keep = min(n_left + ctx_len, xs.shape[1])
        return out, {"memory": mem, "x_ctx": xs[:, xs.shape[1] - keep :], "y_ctx": y_ctx, "n_pending": n_left}
