"""The exact online delta rule (DeltaNet, Gated DeltaNet) on the linear memory's kernels.

``learner.chunk_size: 1`` with the L2 bias and plain GD on a linear memory, retention none or a head keep gate: every
token takes its gradient at the state the token before it left (miras/ops_delta.py; Yang et al. 2024, arXiv:2406.06484,
§3; gated: arXiv:2412.06464, Eq. 10). Row convention ``y = k A``:

    P_t = alpha_t A_{t-1} (grad_at decayed) | A_{t-1} (previous),   A_t = alpha_t A_{t-1} + k_t^T u_t,
    u_t = eta_t (v_t - k_t P_t),   o_t = q_t A_t

In blocks of BT tokens with start state A_0 (c_t = sum_{s<=t} log alpha_s inside the block), the WY form
(``ops_delta.wy_solve``) gives every write at once, ``U = U_v - W_k A_0``. Then

    A_t = e^{c_t} A_0 - sum_{j<=t} e^{c_t - c_j} k_j^T R_j,   R = W_k A_0 - U_v,   o_t = q_t A_t

which is the linear family's chunk (miras/kernels/linear.py) with grad_at previous, learning rate 1, keep alpha and
the L2 bias R = y - v, on predictions y = kp A_0 whose keys are the rows of W_k (``kp``) against the values U_v. So
the WY solve runs in PyTorch (batched triangular solves of [BT, BT] blocks, differentiated by autograd) and the
state passes, the reads and their backward on the kernels; the gradients of k, v, eta and alpha add up over both.
Every block size gives the same result up to rounding (``delta_chunk``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from miras.kernels.settings import env_int

DEFAULT_CHUNK = 64  # fla's chunk for chunk_delta_rule


def delta_chunk() -> int:
    """Tokens per WY block and kernel chunk: ``MIRAS_KERNEL_DELTA_CHUNK`` (1..64), default 64."""
    return env_int("MIRAS_KERNEL_DELTA_CHUNK", DEFAULT_CHUNK, lo=1, hi=64)


def _blocks(x: Tensor, n: int) -> Tensor:
    """[B, T, H, ...] -> [B, NB, H, n, ...] (fp32), the last block padded with zeros."""
    B, T = x.shape[:2]
    nb = -(-T // n)
    if nb * n != T:
        x = torch.cat([x, x.new_zeros(B, nb * n - T, *x.shape[2:])], dim=1)
    return x.float().reshape(B, nb, n, *x.shape[2:]).transpose(2, 3)


def _tokens(x: Tensor, T: int) -> Tensor:
    """The inverse of ``_blocks``: [B, NB, H, n, D] -> [B, T, H, D] (contiguous)."""
    B, nb, H, n, D = x.shape
    return x.transpose(2, 3).reshape(B, nb * n, H, D)[:, :T].contiguous()


def delta_scan(spec, q: Tensor, k: Tensor, v: Tensor, eta: Tensor, keep: Tensor | None,
               h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """(o [B, T, H, V] in q's dtype, final A [B, H, K, V] fp32) of the exact delta rule.

    q, k: [B, T, H, K]; v: [B, T, H, V]; eta, keep: fp32 [B, T, H] (keep None without retention); h0: fp32
    [B, H, K, V] or None."""
    from miras.kernels.linear import LinearConfig, LinearScanFunction
    from miras.ops_delta import block_decays, wy_solve

    T = q.shape[1]
    n = delta_chunk()
    etab = _blocks(eta, n)
    log_a = _blocks(torch.log(keep.clamp_min(torch.finfo(torch.float32).tiny)), n) if keep is not None else \
        torch.zeros_like(etab)
    c, d = block_decays(log_a, spec.retention.kind == "decay" and spec.retention.grad_at == "decayed")
    U_v, W_k = wy_solve(_blocks(k, n), _blocks(v, n), etab, c, d)
    cfg = dataclasses.replace(LinearConfig.from_spec(spec), chunk=n, decayed=False)
    ones = torch.ones_like(eta)
    # the keys W_k only feed dots: in the inputs' dtype, as k (the values U_v stay fp32: R = W_k A_0 - U_v)
    o, ht, _ = LinearScanFunction.apply(cfg, q, k, _tokens(U_v, T), ones, keep, None, None, h0, None,
                                        _tokens(W_k, T).to(q.dtype))
    return o, ht
