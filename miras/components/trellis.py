"""Trellis: a fixed-size key/value slot memory written by two-pass online gradient descent with a forget gate.

Karami, Behrouz, Kacham, Mirrokni 2025, "Trellis: Learning to Compress Key-Value Memory in Attention Models",
arXiv:2512.23852. The paper's equations were not available to us: this is the RECONSTRUCTION [R] of
shared/reference/papers.md §8.1, consistent with the abstract ("two-pass recurrent compression ... online gradient
descent with a forget gate") and with TNT App. B (slot memory read through a softmax over slots). Per head, with
m slots, slot keys ``K_t`` and slot values ``V_t`` in ``R^{m x d}``, keep gate ``alpha_t`` (Miras convention: the
fraction kept) and inner learning rate ``theta_t``, both data-dependent and in (0, 1):

    pass 1 (keys):    phi_t  = softmax(s K_{t-1} k_t)                                 slot assignment of the key
                      K_t    = alpha_t K_{t-1} - theta_t phi_t (phi_t^T K_{t-1} - k_t^T)
                               (one GD step on 1/2 ||K^T phi_t - k_t||^2, phi_t held fixed)
    pass 2 (values):  phi'_t = softmax(s K_t k_t)                                     recomputed with the new keys
                      V_t    = alpha_t V_{t-1} - theta_t phi'_t (phi'_t^T V_{t-1} - v_t^T)
    read:             y_t    = V_t^T softmax(s K_t q_t)

``s`` is a learned per-head inverse temperature (initialised to ``TrellisSpec.score_scale``); q and k are
l2-normalised. The slot assignment is a softmax of the state itself, so the recurrence is non-linear in the state and
has no exact chunk-parallel form: :func:`trellis_scan` runs the exact token-by-token recurrence, vectorised over batch,
heads and slots. Swapping the reconstruction means replacing :func:`trellis_step` (and keeping the oracle test).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miras.components.gates import Gate, gate_param_count
from miras.components.mixer import GatedOutput, add_qkv_projections
from miras.registry import BLOCK
from miras.spec import TrellisSpec


def trellis_read(q: Tensor, K: Tensor, V: Tensor, scale: Tensor) -> Tensor:
    """``y = V^T softmax(s K q)`` for queries ``q [B, T, H, d]`` and slots ``K, V [B, H, m, d]`` -> ``[B, T, H, d]``."""
    att = torch.softmax(scale[:, None] * torch.einsum("bthd,bhmd->bthm", q, K), dim=-1)  # [B, T, H, m]
    return torch.einsum("bthm,bhmd->bthd", att, V)


def trellis_step(
    k: Tensor, v: Tensor, lr: Tensor, keep: Tensor, K: Tensor, V: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """One token of the two-pass write (papers.md §8.1 [R]): ``k, v [B, H, d]``, ``lr, keep [B, H]``, ``K, V [B, H, m, d]``,
    ``scale [H]``. Returns the new ``(K, V)``."""
    a, th, s = keep[..., None, None], lr[..., None, None], scale[:, None]  # s: [H, 1]
    phi = torch.softmax(s * torch.einsum("bhmd,bhd->bhm", K, k), dim=-1)  # pass 1: [B, H, m]
    err = torch.einsum("bhm,bhmd->bhd", phi, K) - k  # K^T phi - k: [B, H, d]
    K = a * K - th * phi[..., None] * err[..., None, :]
    phi = torch.softmax(s * torch.einsum("bhmd,bhd->bhm", K, k), dim=-1)  # pass 2, with the new keys
    err = torch.einsum("bhm,bhmd->bhd", phi, V) - v
    V = a * V - th * phi[..., None] * err[..., None, :]
    return K, V


def trellis_scan(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, keep: Tensor, K0: Tensor, V0: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Write every token, then read with the updated slots (the read of token t sees the write of token t).

    ``q, k, v [B, T, H, d]``; ``lr, keep [B, T, H]``; ``K0, V0 [B, H, m, d]`` (or ``[H, m, d]``, shared by the batch);
    ``scale [H]``. Returns ``(y [B, T, H, d], K_T, V_T)``.
    """
    B = q.shape[0]
    K = K0.expand(B, *K0.shape[-3:]) if K0.dim() == 3 else K0
    V = V0.expand(B, *V0.shape[-3:]) if V0.dim() == 3 else V0
    s = scale[:, None]  # [H, 1]
    ys = []
    for q_t, k_t, v_t, lr_t, keep_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), lr.unbind(1), keep.unbind(1),
                                           strict=True):  # unbind, not q[:, t]: one gradient buffer instead of T
        K, V = trellis_step(k_t, v_t, lr_t, keep_t, K, V, scale)
        att = torch.softmax(s * torch.einsum("bhmd,bhd->bhm", K, q_t), dim=-1)  # [B, H, m]
        ys.append(torch.einsum("bhm,bhmd->bhd", att, V))
    y = torch.stack(ys, 1) if ys else q.new_zeros(q.shape)
    return y, K, V


def trellis_param_count(spec: TrellisSpec, *, d_model: int, n_heads: int, d_head: int) -> int:
    """Parameters of :class:`TrellisMixer` (mirrored by miras/params.py)."""
    inner = n_heads * d_head
    n = 3 * d_model * inner + (3 * inner * spec.conv_size if spec.conv_size else 0)
    n += sum(gate_param_count(g, d_model=d_model, n_heads=n_heads, d_key=d_head) for g in (spec.lr, spec.keep))
    n += n_heads + 2 * n_heads * spec.slots * d_head  # log scale, K_0, V_0
    n += d_head if spec.output_norm else 0
    n += d_model * inner if spec.output_gate else 0
    return n + inner * d_model


def trellis_state_numel(spec: TrellisSpec, *, n_heads: int, d_head: int) -> int:
    """Elements of the decoding state per sequence: K and V slots of every head."""
    return 2 * n_heads * spec.slots * d_head


class TrellisMixer(GatedOutput, nn.Module):
    """Token mixer: projections -> short conv -> SiLU -> l2norm(q, k) -> two-pass slot memory -> norm * gate -> W_o.

    Same interface as :class:`miras.components.mixer.MemoryMixer` (``forward``, ``features``, ``scan``, ``read``,
    ``queries``, ``output``, ``initial_state``, ``conv_context``), so the Titans hybrids MAC/MAG/MAL take it as their
    memory. The state is ``{"memory": {"K", "V"}, "ctx": last conv_size - 1 inputs, "n_pending": 0}``.
    """

    def __init__(self, spec: TrellisSpec, *, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.spec, self.n_heads, self.d_head = spec, n_heads, d_head
        inner = n_heads * d_head
        add_qkv_projections(self, d_model=d_model, inner=inner, conv_size=spec.conv_size)
        self.gates = nn.ModuleDict({
            "lr": Gate(spec.lr, d_model=d_model, n_heads=n_heads, d_key=d_head, name="trellis.lr"),
            "keep": Gate(spec.keep, d_model=d_model, n_heads=n_heads, d_key=d_head, name="trellis.keep"),
        })
        self.log_scale = nn.Parameter(torch.full((n_heads,), math.log(spec.score_scale)))
        # learned initial slots: unit-norm keys spread over the sphere, small values
        self.K0 = nn.Parameter(F.normalize(torch.randn(n_heads, spec.slots, d_head), dim=-1))
        self.V0 = nn.Parameter(torch.randn(n_heads, spec.slots, d_head) * 0.02)
        self.add_output(d_model=d_model, inner=inner, d_head=d_head)

    def initial_state(self) -> dict[str, Tensor]:
        """Learned slots ``{"K": [H, m, d], "V": [H, m, d]}`` (broadcast over the batch by :meth:`scan`)."""
        return {"K": self.K0, "V": self.V0}

    def _branch(self, x: Tensor, proj: nn.Linear, conv: nn.Conv1d | None) -> Tensor:
        B, T, _ = x.shape
        h = proj(x)  # [B, T, H*d]
        if conv is not None:
            h = conv(F.pad(h.transpose(1, 2), (self.conv_context, 0))).transpose(1, 2)
        return F.silu(h).reshape(B, T, self.n_heads, self.d_head)

    def queries(self, x: Tensor) -> Tensor:
        """l2-normalised q ``[B, T, H, d]``."""
        return F.normalize(self._branch(x, self.w_q, self.conv_q), dim=-1, eps=1e-6)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """q, k (l2-normalised), v ``[B, T, H, d]`` and the gates ``{"lr", "keep"}: [B, T, H]``."""
        q = self.queries(x)
        k = F.normalize(self._branch(x, self.w_k, self.conv_k), dim=-1, eps=1e-6)
        v = self._branch(x, self.w_v, self.conv_v)
        return q, k, v, {name: gate(x) for name, gate in self.gates.items()}

    def scan(self, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor], state: dict[str, Tensor]):
        """The two-pass recurrence over a sequence: returns (y [B, T, H, d], final slots ``{"K", "V"}``)."""
        dt = torch.promote_types(q.dtype, torch.float32)
        y, K, V = trellis_scan(q.to(dt), k.to(dt), v.to(dt), gates["lr"].to(dt), gates["keep"].to(dt),
                               state["K"].to(dt), state["V"].to(dt), self.log_scale.exp().to(dt))
        return y, {"K": K, "V": V}

    def read(self, q: Tensor, state: dict[str, Tensor]) -> Tensor:
        """``y = V^T softmax(s K q)`` with fixed slots (no write)."""
        K, V = state["K"], state["V"]
        if K.dim() == 3:
            K, V = K.expand(q.shape[0], *K.shape), V.expand(q.shape[0], *V.shape)
        return trellis_read(q, K.to(q.dtype), V.to(q.dtype), self.log_scale.exp().to(q.dtype))

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        """Mix ``x [B, T, D]``; ``state`` continues a sequence (None: a fresh one). Returns (y [B, T, D], state)."""
        if state is None:
            mem, ctx = self.initial_state(), x[:, :0]
        else:
            mem, ctx = state["memory"], state["ctx"]
        xs = torch.cat([ctx, x], 1)
        lead = ctx.shape[1]
        q, k, v, gates = self.features(xs)
        o, mem = self.scan(q[:, lead:], k[:, lead:], v[:, lead:], {g: t[:, lead:] for g, t in gates.items()}, mem)
        keep = min(self.conv_context, xs.shape[1])
        return self.output(o, x), {"memory": mem, "ctx": xs[:, xs.shape[1] - keep :], "n_pending": 0}


@BLOCK.register("trellis")
class TrellisBlock(nn.Module):
    """The ``trellis`` block: ``y = TrellisMixer(x)`` alone (the model adds the residual and the channel MLP)."""

    def __init__(self, *, mixer: TrellisMixer) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        return self.mixer(x, state)
