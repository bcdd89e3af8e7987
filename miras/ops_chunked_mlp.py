"""The chunk loop of a depth-2 GELU MLP memory with an l2 bias as one autograd node with a hand-written backward.

:func:`miras.ops_chunked._stacked_scan` runs this case (Titans' default memory) with dozens of autograd nodes per
chunk, each saving its inputs; here the whole loop is one :class:`torch.autograd.Function` (:class:`_MLP2Scan`) that
keeps seven small tensors per chunk and recomputes the cheap rest in the backward. Per chunk, on the stacked states
``X_l = [A_l; S_l]`` (``[A_l]`` for gd) in the ``[B * H, ...]`` layout (every product one bmm), phi the exact GELU:

    z1 = g ⊙ (k A1) ,  h = phi(z1) ,  z2 = g ⊙ (h A2)                              (forward at the gradient point)
    d2 = rstd P(xhat) u ,  u = (v~ - xhat ⊙ w) ⊙ w      (no norm: d2 = v~ - z2)     (negated l2 rows, LN backward)
    eg = (g ⊙ d2) A2^T ,  d1 = eg ⊙ phi'(z1)                                       (hand backprop: rank-one factors)
    P1 = [q beta, q f] X1 + ((q k^T) ⊙ G) d1 ,  r = phi(P1)                         (dual-form read, layer 1)
    P2 = beta ⊙ (r A2) + f ⊙ (r S2) + ((r h^T) ⊙ G) d2 ,  o = q~ + LN(P2) ⊙ w       (layer 2 and the head)
    X1' = D X1 + [k G_e, k N_e]^T d1 ,  X2' = D X2 + [h G_e, h N_e]^T d2     (end of chunk, D = [[beta_e, f_e], [0, m_e]])

(papers.md §1.4.1, deep-memory-dual-form.md steps 1-4; the same equations as ``_stacked_scan``, which states them
for any depth.) g = gamma (``grad_at: decayed``) or 1; ``v~ = v - x - b`` and ``q~ = q + b`` (the head's offset:
residual input, LN bias); xhat and rstd the LayerNorm of z2 without affine, ``P = I - 11^T/V - xhat xhat^T/V`` (so
that ``rstd P`` is the LN Jacobian, symmetric); beta, f, G the read coefficients and G_e, N_e, beta_e, f_e, m_e the
end-of-chunk rows (``Learner.coefficients``). Row scales are applied on the narrow side of each product, and the
factors of q and k (``[q beta, q f]``, ``(q k^T) ⊙ G``, ``[k G_e, k N_e]``) are formed per chunk inside the loop:
no tensor of size NC x b x b or NC x b x 2K is formed besides G.

The backward (reverse chunk order) is the chain rule of these lines written out. Its only non-obvious piece is the
second derivative of the LayerNorm in ``d2 = rstd P(xhat) u``: with ``m_u = mean(u ⊙ xhat)``,

    dL/du = rstd P dd2 ,  dL/drstd = <dd2, d2> / rstd ,  dL/dxhat = -rstd (m_u dd2 + u mean(dd2 ⊙ xhat)) - dL/du ⊙ w ⊙ w
    dL/dz2 = rstd P dL/dxhat - dL/drstd rstd^2 xhat / V                  (xhat and rstd as functions of z2)

and GELU's ``phi''(z) = pdf(z) (2 - z^2)``. The Function is differentiable once.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from miras.components.learner import ChunkCoefficients
from miras.components.memory import LN_EPS, MLPMemory, gelu_grad
from miras.ops_common import stacked_decay, stacked_rows
from miras.spec import MemorySpec

_LN_MASK = [True, False, False]
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def mlp2_applies(spec: MemorySpec, mem: MLPMemory, co: ChunkCoefficients) -> bool:
    """Whether :func:`mlp2_scan` computes this chunked scan: a depth-2 GELU MLP memory (norm and residual either way),
    an l2 bias, retention none / decay with one keep per head (R = 1), learner gd / momentum, on CPU tensors.

    CPU only by default: it wins there by not page-faulting (benchmarks/RESULTS.md), while on an H200 the chunked mlp2
    row of bench_kernels.py measured 132 ms with a pre-final version of this path against 104 ms with the generic
    loop (one run, not yet repeated), so CUDA keeps the generic loop until this path is measured faster there.
    ``MIRAS_MLP2_ONE_NODE=1`` takes it on any device (to measure that), ``=0`` never."""
    choice = os.environ.get("MIRAS_MLP2_ONE_NODE", "auto")
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"MIRAS_MLP2_ONE_NODE must be auto, 0 or 1, but got {choice!r}")
    return (
        choice != "0"
        and getattr(spec.memory, "kind", None) == "mlp"
        and mem.depth == 2
        and mem.activation == "gelu"
        and spec.bias.kind == "l2"
        and spec.retention.kind in ("none", "decay")
        and spec.learner.kind in ("gd", "momentum")
        and co.beta_e.shape[-1] == 1
        and (co.beta_e.device.type == "cpu" or choice == "1")
    )


def _gelu_curvature(z: Tensor) -> Tensor:
    """``sqrt(2 pi) phi''(z) = exp(-z^2 / 2) (2 - z^2)`` (the caller multiplies by ``1 / sqrt(2 pi)``)."""
    zz = z * z
    return zz.mul(-0.5).exp_().mul_(zz.neg_().add_(2.0))


def _ln_backward(grad: Tensor, z: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """``rstd P grad`` (the LayerNorm backward without affine, torch's fused kernel)."""
    return torch.ops.aten.native_layer_norm_backward(grad, z, z.shape[-1:], mean, rstd, None, None, _LN_MASK)[0]


def _chunks(x: Tensor | None, n: int) -> tuple[Tensor, ...] | list[None]:
    """The n chunks of a chunk-major tensor (one unbind instead of n indexing ops), or n Nones."""
    return [None] * n if x is None else x.unbind(0)


def _mul_(x: Tensor, s: Tensor | None) -> Tensor:
    """``x ⊙ s`` in place (row scale), or x when s is None."""
    return x if s is None else x.mul_(s)


class _MLP2Scan(torch.autograd.Function):
    """The chunk loop (module docstring) over all NC chunks.

    Inputs, chunk-major ``[NC, BH, ...]`` (BH = B * H): X1 ``[BH, mK, Hd]``, X2 ``[BH, mHd, V]`` (the initial stacked
    states, m = 2 with momentum, 1 for gd); q ``[.., b, K]`` (None: no reads), k ``[.., b, K]``; g ``[.., b, 1]`` | None;
    nv = v~ ``[.., b, V]``; w ``[BH, 1, V]`` | None (no norm); Ge, Ne ``[.., b, 1]`` (Ne None for gd); D ``[.., m, m]``;
    the read coefficients (None without reads) G ``[.., b, b]``, beta, f ``[.., b, 1]`` (f None for gd) and q_off = q~
    ``[.., b, V]`` | None (no residual, no norm); keep: whether to keep the chunks' tensors for the backward.
    Returns (o ``[BH, NC * b, V]`` (empty without reads), X1', X2' after the last chunk).
    Kept per chunk: the chunk-start states, z1, eg, d1, P1 (b x Hd) and z2, d2, P2 (b x V).
    """

    @staticmethod
    def forward(
        ctx,
        X1: Tensor,
        X2: Tensor,
        q: Tensor | None,
        k: Tensor,
        g: Tensor | None,
        nv: Tensor,
        w: Tensor | None,
        Ge: Tensor,
        Ne: Tensor | None,
        D: Tensor,
        G: Tensor | None,
        beta: Tensor | None,
        f: Tensor | None,
        q_off: Tensor | None,
        keep: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        NC, BH, b, K = k.shape
        Hd, V, m = X1.shape[-1], X2.shape[-1], D.shape[-1]
        reads = q is not None
        o = X1.new_empty(BH, NC * b, V) if reads else X1.new_empty(0)
        ks, gs, nvs, Ges, Nes, Ds = (_chunks(x, NC) for x in (k, g, nv, Ge, Ne, D))
        qs, Gs, betas, fs, q_offs = (_chunks(x, NC) for x in (q, G, beta, f, q_off))
        Xs1, Xs2, saved = [X1], [X2], []
        for c in range(NC):
            A1, A2, S2 = X1[:, :K], X2[:, :Hd], X2[:, Hd:]
            kc, gc, Gec, Nc = ks[c], gs[c], Ges[c], Nes[c]
            z1 = _mul_(torch.bmm(kc, A1), gc)
            h, slope = torch.nn.functional.gelu(z1), gelu_grad(z1)
            z2 = _mul_(torch.bmm(h, A2), gc)
            if w is None:
                d2 = nvs[c] - z2
            else:
                xhat, mean, rstd = torch.native_layer_norm(z2, (V,), None, None, LN_EPS)
                d2 = _ln_backward(torch.addcmul(nvs[c], xhat, w, value=-1.0).mul_(w), z2, mean, rstd)
            eg = torch.bmm(d2 if gc is None else d2 * gc, A2.transpose(-1, -2))  # e ⊙ g
            d1 = slope.mul_(eg)
            P1 = P2 = None
            if reads:
                qc, Gc, bc, fc = qs[c], Gs[c], betas[c], fs[c]
                P1 = torch.bmm(stacked_rows(qc, bc, fc), X1).baddbmm_(torch.bmm(qc, kc.transpose(-1, -2)).mul_(Gc), d1)
                r = torch.nn.functional.gelu(P1)
                P2 = torch.bmm(r, A2).mul_(bc)
                if fc is not None:
                    P2.addcmul_(torch.bmm(r, S2), fc)
                P2.baddbmm_(torch.bmm(r, h.transpose(-1, -2)).mul_(Gc), d2)
                oc = o[:, c * b : (c + 1) * b]
                if w is not None:
                    torch.addcmul(q_offs[c], torch.native_layer_norm(P2, (V,), None, None, LN_EPS)[0], w, out=oc)
                elif q_off is not None:
                    torch.add(q_offs[c], P2, out=oc)
                else:
                    oc.copy_(P2)
            X1 = torch.bmm(Ds[c], X1.view(BH, m, -1)).view(X1.shape).baddbmm_(stacked_rows(kc, Gec, Nc).transpose(-1, -2), d1)
            X2 = torch.bmm(Ds[c], X2.view(BH, m, -1)).view(X2.shape)
            ht = h.transpose(-1, -2)
            X2[:, :Hd].add_(torch.bmm(ht, d2 * Gec))  # (baddbmm_ into a slice would loop over the batch)
            if Nc is not None:
                X2[:, Hd:].add_(torch.bmm(ht, d2 * Nc))
            if keep:
                saved.append((z1, eg, d1, P1, z2, d2, P2))
                Xs1.append(X1)
                Xs2.append(X2)
        if keep:  # (the initial states through save_for_backward: autograd checks that they are not modified)
            ctx.save_for_backward(Xs1[0], Xs2[0], q, k, g, nv, w, Ge, Ne, D, G, beta, f)
            ctx.chunks = (Xs1[1:-1], Xs2[1:-1], saved)
        ctx.has_q_off = q_off is not None
        return o, X1, X2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_o: Tensor | None, g_X1: Tensor | None, g_X2: Tensor | None) -> tuple[Tensor | None, ...]:
        X1_0, X2_0, q, k, g, nv, w, Ge, Ne, D, G, beta, f = ctx.saved_tensors
        Xs1, Xs2, saved = [X1_0, *ctx.chunks[0]], [X2_0, *ctx.chunks[1]], ctx.chunks[2]
        NC, BH, b, K = k.shape
        Hd, V, m = Xs1[0].shape[-1], Xs2[0].shape[-1], D.shape[-1]
        reads = q is not None and g_o is not None
        g_X1 = torch.zeros_like(Xs1[0]) if g_X1 is None else g_X1
        g_X2 = torch.zeros_like(Xs2[0]) if g_X2 is None else g_X2
        new = k.new_empty
        g_k, g_nv, g_Ge, g_D = new(k.shape), new(nv.shape), new(Ge.shape), new(D.shape)
        g_g = None if g is None else new(g.shape)
        g_Ne = None if Ne is None else new(Ne.shape)
        g_w = None if w is None else torch.zeros_like(w)
        g_q = g_G = g_beta = g_f = None
        if reads:
            g_q, g_G, g_beta = new(q.shape), new(G.shape), new(beta.shape)
            g_f = None if f is None else new(f.shape)
            g_os = g_o.reshape(BH, NC, b, V).unbind(1)
        ks, gs, nvs, Ges, Nes, Ds = (_chunks(x, NC) for x in (k, g, nv, Ge, Ne, D))
        qs, Gs, betas, fs = (_chunks(x, NC) for x in (q, G, beta, f))
        Dts = _chunks(D.transpose(-1, -2), NC)
        g_ks, g_nvs, g_Ges, g_Nes, g_Ds, g_gs = (_chunks(x, NC) for x in (g_k, g_nv, g_Ge, g_Ne, g_D, g_g))
        g_qs, g_Gs, g_betas, g_fs = (_chunks(x, NC) for x in (g_q, g_G, g_beta, g_f))
        for c in range(NC - 1, -1, -1):
            X1, X2, (z1, eg, d1, P1, z2, d2, P2) = Xs1[c], Xs2[c], saved[c]
            A1, A2, S2 = X1[:, :K], X2[:, :Hd], X2[:, Hd:]
            gA2n, gS2n = g_X2[:, :Hd], g_X2[:, Hd:]  # the gradient of the end-of-chunk state X2'
            kc, gc, Gec, Nc, g_kc, g_gc = ks[c], gs[c], Ges[c], Nes[c], g_ks[c], g_gs[c]
            h, slope = torch.nn.functional.gelu(z1), gelu_grad(z1)
            # end of chunk: X1' = D X1 + [k G_e, k N_e]^T d1, X2' = D X2 + [h G_e, h N_e]^T d2
            torch.bmm(g_X1.view(BH, m, -1), X1.view(BH, m, -1).transpose(-1, -2), out=g_Ds[c])
            g_Ds[c].baddbmm_(g_X2.view(BH, m, -1), X2.view(BH, m, -1).transpose(-1, -2))
            g_d1 = torch.bmm(stacked_rows(kc, Gec, Nc), g_X1)
            g_kw = torch.bmm(d1, g_X1.transpose(-1, -2))  # [BH, b, mK]: the gradient of [k G_e, k N_e]
            torch.mul(g_kw[..., :K], Gec, out=g_kc)
            torch.sum(g_kw[..., :K] * kc, -1, keepdim=True, out=g_Ges[c])
            hA = torch.bmm(h, gA2n)  # [BH, b, V]
            g_Ges[c].add_((hA * d2).sum(-1, keepdim=True))
            g_d2 = hA.mul_(Gec)
            g_h = torch.bmm(d2 * Gec, gA2n.transpose(-1, -2))
            if Nc is not None:
                g_kc.addcmul_(g_kw[..., K:], Nc)
                torch.sum(g_kw[..., K:] * kc, -1, keepdim=True, out=g_Nes[c])
                hS = torch.bmm(h, gS2n)
                g_Nes[c].add_((hS * d2).sum(-1, keepdim=True))
                g_d2.addcmul_(hS, Nc)
                g_h.baddbmm_(d2 * Nc, gS2n.transpose(-1, -2))
            g_X1 = torch.bmm(Dts[c], g_X1.view(BH, m, -1)).view(X1.shape)
            g_X2 = torch.bmm(Dts[c], g_X2.view(BH, m, -1)).view(X2.shape)
            # reads: P2 = beta ⊙ r A2 + f ⊙ r S2 + ((r h^T) ⊙ G) d2, o = q~ + LN(P2) w; r = phi(P1),
            #        P1 = [q beta, q f] X1 + ((q k^T) ⊙ G) d1
            if reads:
                go, qc, Gc, bc, fc, g_qc, g_Gc = g_os[c], qs[c], Gs[c], betas[c], fs[c], g_qs[c], g_Gs[c]
                if w is not None:
                    xo, mo, ro = torch.native_layer_norm(P2, (V,), None, None, LN_EPS)
                    g_w.add_((go * xo).sum(1, keepdim=True))
                    g_P2 = _ln_backward(go * w, P2, mo, ro)
                else:
                    g_P2 = go
                r = torch.nn.functional.gelu(P1)
                gPb = g_P2 * bc
                torch.sum(torch.bmm(r, A2).mul_(g_P2), -1, keepdim=True, out=g_betas[c])
                g_X2[:, :Hd].add_(torch.bmm(r.transpose(-1, -2), gPb))
                g_r = torch.bmm(gPb, A2.transpose(-1, -2))
                if fc is not None:
                    gPf = g_P2 * fc
                    torch.sum(torch.bmm(r, S2).mul_(g_P2), -1, keepdim=True, out=g_fs[c])
                    g_X2[:, Hd:].add_(torch.bmm(r.transpose(-1, -2), gPf))
                    g_r.baddbmm_(gPf, S2.transpose(-1, -2))
                sc = torch.bmm(r, h.transpose(-1, -2))  # r h^T, then (r h^T) ⊙ G
                g_sc = torch.bmm(g_P2, d2.transpose(-1, -2))
                torch.mul(g_sc, sc, out=g_Gc)
                g_d2.baddbmm_(sc.mul_(Gc).transpose(-1, -2), g_P2)
                g_sc.mul_(Gc)
                g_h.baddbmm_(g_sc.transpose(-1, -2), r)
                g_r.baddbmm_(g_sc, h)
                g_P1 = torch.ops.aten.gelu_backward(g_r, P1)
                g_qw = torch.bmm(g_P1, X1.transpose(-1, -2))  # the gradient of [q beta, q f]
                g_X1.baddbmm_(stacked_rows(qc, bc, fc).transpose(-1, -2), g_P1)
                torch.mul(g_qw[..., :K], bc, out=g_qc)
                g_betas[c].add_((g_qw[..., :K] * qc).sum(-1, keepdim=True))
                if fc is not None:
                    g_qc.addcmul_(g_qw[..., K:], fc)
                    g_fs[c].add_((g_qw[..., K:] * qc).sum(-1, keepdim=True))
                sc = torch.bmm(qc, kc.transpose(-1, -2))  # q k^T, then (q k^T) ⊙ G
                g_sc = torch.bmm(g_P1, d1.transpose(-1, -2))
                g_Gc.addcmul_(g_sc, sc)
                g_d1.baddbmm_(sc.mul_(Gc).transpose(-1, -2), g_P1)
                g_sc.mul_(Gc)
                g_qc.baddbmm_(g_sc, kc)
                g_kc.baddbmm_(g_sc.transpose(-1, -2), qc)
            # d1 = eg ⊙ phi'(z1), eg = (g ⊙ d2) A2^T
            g_slope = g_d1 * eg
            g_eg = g_d1.mul_(slope)
            tA = torch.bmm(g_eg, A2)  # [BH, b, V]
            g_A2 = torch.bmm(g_eg.transpose(-1, -2), d2 if gc is None else d2 * gc)
            if gc is None:
                g_d2.add_(tA)
            else:
                torch.sum(tA * d2, -1, keepdim=True, out=g_gc)
                g_d2.addcmul_(tA, gc)
            # d2 = rstd P(xhat) u, u = (v~ - xhat w) w  (no norm: d2 = v~ - z2)
            if w is None:
                g_nvs[c].copy_(g_d2)
                g_z2 = g_d2.neg_()
            else:
                xhat, mean, rstd = torch.native_layer_norm(z2, (V,), None, None, LN_EPS)
                nR = torch.addcmul(nvs[c], xhat, w, value=-1.0)
                u = nR * w
                g_u = _ln_backward(g_d2, z2, mean, rstd)
                g_nR = torch.mul(g_u, w, out=g_nvs[c])  # (nR = v~ - xhat w: also dL/dv~)
                g_w.add_(torch.sum(g_u.mul_(nR).sub_(g_nR * xhat), 1, keepdim=True))
                mu = (u * xhat).mean(-1, keepdim=True)
                mg = (g_d2 * xhat).mean(-1, keepdim=True)
                g_xhat = torch.addcmul(g_d2 * mu, u, mg).mul_(-rstd).addcmul_(g_nR, w, value=-1.0)
                g_rstd = (g_d2 * d2).sum(-1, keepdim=True).div_(rstd)
                g_z2 = _ln_backward(g_xhat, z2, mean, rstd).addcmul_(xhat, g_rstd * rstd * rstd, value=-1.0 / V)
            # z2 = g ⊙ (h A2), h = phi(z1), z1 = g ⊙ (k A1)
            if gc is not None:
                g_gc.add_(torch.bmm(h, A2).mul_(g_z2).sum(-1, keepdim=True))
                g_z2 = g_z2.mul_(gc)
            g_A2.baddbmm_(h.transpose(-1, -2), g_z2)
            g_h.baddbmm_(g_z2, A2.transpose(-1, -2))
            g_z1 = g_h.mul_(slope).addcmul_(g_slope, _gelu_curvature(z1), value=_INV_SQRT_2PI)
            g_kz = torch.bmm(g_z1, A1.transpose(-1, -2))  # [BH, b, K]
            if gc is None:
                g_kc.add_(g_kz)
            else:
                g_gc.add_((g_kz * kc).sum(-1, keepdim=True))
                g_kc.addcmul_(g_kz, gc)
            g_X1[:, :K].add_(torch.bmm((kc if gc is None else kc * gc).transpose(-1, -2), g_z1))
            g_X2[:, :Hd].add_(g_A2)
        g_q_off = g_o.reshape(BH, NC, b, V).transpose(0, 1) if reads and ctx.has_q_off else None
        grads = (g_X1, g_X2, g_q, g_k, g_g, g_nv, g_w, g_Ge, g_Ne, g_D, g_G, g_beta, g_f, g_q_off, None)
        return tuple(x if n else None for x, n in zip(grads, ctx.needs_input_grad))


def mlp2_scan(
    mem: MLPMemory,
    kc: Tensor,
    vc: Tensor,
    qc: Tensor | None,
    co: ChunkCoefficients,
    gamma: Tensor | None,
    X: list[Tensor],
    params: dict[str, Tensor] | None,
    T: int,
) -> tuple[Tensor | None, list[Tensor]]:
    """:func:`miras.ops_chunked._stacked_scan` for the case of :func:`mlp2_applies`, through :class:`_MLP2Scan`: the
    same args (less the bias and Huber deltas: the bias is l2) and results, (o ``[B, H, T, V]`` | None, the final
    stacked states ``[X1, X2]`` ``[B, H, m in, out]``). Forms D, v~, q~ and the ``[NC, B * H, ...]`` views here."""
    NC, B, H, b, K = kc.shape
    BH, momentum = B * H, co.f is not None

    def flat(x: Tensor | None) -> Tensor | None:  # [NC, B, H, ...] -> [NC, B * H, ...]
        return None if x is None else x.reshape(NC, BH, *x.shape[3:])

    D = stacked_decay(co)  # [NC, B, H, m, m]
    w = params["norm_weight"][None].expand(B, -1, -1).reshape(BH, 1, -1) if mem.norm else None  # [B * H, 1, V]
    k_off = mem.head_offset(kc, params)  # [NC, B, H, b, V] | None
    nv = vc if k_off is None else vc - k_off
    N_e = co.N_e[..., None] if momentum else None  # [NC, B, H, b, 1]
    args = [flat(kc), flat(gamma), flat(nv), w, flat(co.G_e), flat(N_e), flat(D)]
    if qc is not None:
        reads = [flat(co.G.squeeze(-1)), flat(co.beta), flat(co.f), flat(mem.head_offset(qc, params))]
    else:
        reads = [None] * 4
    X1, X2 = (x.reshape(BH, *x.shape[-2:]) for x in X)
    inputs = [X1, X2, flat(qc), *args, *reads]
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    o, X1, X2 = _MLP2Scan.apply(*inputs, keep)
    Xe = [X1.view(B, H, *X1.shape[1:]), X2.view(B, H, *X2.shape[1:])]
    if qc is None:
        return None, Xe
    return o.view(B, H, NC * b, -1)[:, :, :T], Xe
