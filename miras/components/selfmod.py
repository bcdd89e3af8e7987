r"""Self-modifying Titans (Nested Learning §8.1-8.2, Eq. 83-88; arXiv:2512.24695): block kind ``selfmod``.

Every projection except q is a memory that learns in context and generates its own targets (NL Eq. 86-88):

    q_t = l2norm(SiLU(conv(x_t W_q)))                       the only static projection
    k_t = l2norm(M_k(x_t)),  v_t = [l2norm](M_v(x_t))        x_t: head-split, conv'd input (d_head per head)
    eta_t   = lo + (hi - lo) sigmoid(mean(M_eta(x_t)) + b_eta)      (memory.learner.lr: lo, hi, init)
    alpha_t = lo + (hi - lo) sigmoid(mean(M_alpha(x_t)) + b_alpha)  (memory.retention.gate; only with a keep gate)
    v_hat_{□,t} = M_□(v_t)                                   self-generated targets, □ in {k, v, eta, alpha, mem}
    M_□ <- memory_scan(keys k, values v_hat_□, lr eta, keep alpha)  learner of ``memory`` (NL: DGD + decay, Eq. 88)
    o_t = M_mem(q_t);  y = W_o(RMSNorm(o) * sigmoid(x W_g))

The memories are the ``memory`` section's architecture (NL Eq. 89: ``x + W_1 sigma(W_2 x)`` is ``mlp`` depth 2 with
a residual), bias, retention and learner; extra gates the learner/bias need (momentum, Huber delta, ...) are static
data-dependent gates as in :class:`~miras.components.mixer.MemoryMixer` (the paper's model has a momentum term that no
equation shows, papers.md §4.6).

Chunk-parallel form (NL §8.2, Eq. 90) with the paper's two chunk sizes: the sequence is cut into chunks of
``selfmod.chunk_size`` C. At each chunk start, k, v, eta, alpha of the whole chunk and every target v_hat are produced
in parallel by the memories at the state of the previous chunk end; then the four projection memories are written over
the chunk (one ``memory_scan`` chunk: gradients at the chunk-start state) and the output memory M_mem is written and
read with its own gradient chunk ``memory.learner.chunk_size`` (which may be smaller). The dependency between chunks
is sequential (k of chunk c needs M_k after chunk c - 1): the Python loop runs over chunks. The read o_t = M_mem(q_t)
follows ``memory_scan`` (read after the write of token t; the paper writes M_{mem,t-1}(q_t)). With C = 1 and a
gradient chunk of 1 this is the token-by-token recurrence of NL Eq. 86-88.

Decoding: the state carries the memories at the last chunk boundary plus the inputs of the unfinished chunk (and the
conv context); the unfinished chunk is replayed, so any split of a sequence into calls gives the one-call result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miras.components.gates import Gate, gate_param_count
from miras.components.memory import memory_param_shapes, state_shapes
from miras.components.mixer import GatedOutput, memory_params, mixer_gate_specs
from miras.registry import BLOCK
from miras.spec import GateSpec, MemorySpec, SelfModSpec

PROJECTIONS = ("k", "v", "eta", "alpha")


def projection_spec(spec: MemorySpec, sm: SelfModSpec) -> MemorySpec:
    """The spec of the projection memories M_k, M_v, M_eta (, M_alpha): the memory's, written in one gradient chunk
    of ``selfmod.chunk_size`` (NL Eq. 86-88; the output memory keeps ``memory.learner.chunk_size``)."""
    return spec.model_copy(update={"learner": spec.learner.model_copy(update={"chunk_size": sm.chunk_size})})


def memory_names(spec: MemorySpec) -> tuple[list[str], bool]:
    """The projection memories (k, v, eta and alpha when the retention has a keep gate) and whether alpha exists."""
    has_alpha = spec.retention.kind != "none"
    return [n for n in PROJECTIONS if n != "alpha" or has_alpha], has_alpha


def _extra_gates(spec: MemorySpec) -> dict[str, GateSpec]:
    """Gates memory_scan needs that no memory generates (momentum, huber_delta, ...): static, from x."""
    return {n: g for n, g in mixer_gate_specs(spec).items() if n not in ("lr", "keep")}


def selfmod_param_rows(spec: MemorySpec, *, d_model: int, n_heads: int, d_head: int) -> list[tuple[str, int]]:
    """Parameters of one :class:`SelfModMixer`, by component (mirrors its ``__init__``; used by ``miras.params``)."""
    inner = n_heads * d_head
    names, has_alpha = memory_names(spec)
    n_mem = len(names) + 1
    rows = [("q_projection", d_model * inner)]
    if spec.conv_size:
        rows.append(("conv", (inner + d_model) * spec.conv_size))
    gates = n_heads * (2 if has_alpha else 1)  # b_eta, b_alpha per head
    gates += sum(gate_param_count(g, d_model=d_model, n_heads=n_heads, d_key=d_head) for g in _extra_gates(spec).values())
    rows.append(("gates", gates))
    init = sum(math.prod(s) for k, s in state_shapes(spec, d_head, d_head).items() if k.startswith("W"))
    rows.append(("initial_states", n_mem * n_heads * init))
    mparams = sum(math.prod(s) for s in memory_param_shapes(spec, d_head, d_head).values())
    if mparams:
        rows.append(("memory_params", n_mem * n_heads * mparams))
    if spec.output_norm:
        rows.append(("output_norm", d_head))
    if spec.output_gate:
        rows.append(("output_gate", d_model * inner))
    rows.append(("out_projection", inner * d_model))
    return rows


def selfmod_state_bytes(spec: MemorySpec, d_head: int, n_heads: int, dtype_bytes: int = 2) -> int:
    """Recurrent state of one sequence: all five (or four) memories, W and S buffers, every head."""
    names, _ = memory_names(spec)
    per_head = sum(math.prod(s) for s in state_shapes(spec, d_head, d_head).values())
    return (len(names) + 1) * n_heads * per_head * dtype_bytes


def _logit(spec: GateSpec) -> float:
    frac = (spec.init - spec.lo) / (spec.hi - spec.lo)
    return math.log(frac / (1.0 - frac))


@BLOCK.register("selfmod")
class SelfModMixer(GatedOutput, nn.Module):
    """Self-modifying Titans token mixer: ``forward(x [B, T, D], state=None) -> (y [B, T, D], state)``.

    Args:
        spec: the memory spec shared by the five memories; sm: the ``selfmod`` options (chunk size C);
        d_model, n_heads, d_head (n_heads * d_head == d_model: the memories read the heads of x).
    """

    def __init__(self, spec: MemorySpec, sm: SelfModSpec, *, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.spec, self.sm, self.n_heads, self.d_head = spec, sm, n_heads, d_head
        self.names, self.has_alpha = memory_names(spec)
        P = len(self.names)
        self.proj_spec = projection_spec(spec, sm)
        self.mode = "auto"
        inner = n_heads * d_head
        self.w_q = nn.Linear(d_model, inner, bias=False)
        ks = spec.conv_size
        self.conv_q = nn.Conv1d(inner, inner, ks, groups=inner, bias=False) if ks else None
        self.conv_x = nn.Conv1d(d_model, d_model, ks, groups=d_model, bias=False) if ks else None
        self.b_eta = nn.Parameter(torch.full((n_heads,), _logit(spec.learner.lr)))
        self.b_alpha = nn.Parameter(torch.full((n_heads,), _logit(spec.retention.gate))) if self.has_alpha else None
        self.gates = nn.ModuleDict(
            {n: Gate(g, d_model=d_model, n_heads=n_heads, d_key=d_head, name=n) for n, g in _extra_gates(spec).items()}
        )
        self.state_shapes = state_shapes(spec, d_head, d_head)
        # initial states (outer loop) of the stacked projection memories [P*H, ...] and of the output memory [H, ...]
        self.init_proj, self.init_mem = nn.ParameterDict(), nn.ParameterDict()
        for name, shape in self.state_shapes.items():
            if name.startswith("W"):
                self.init_proj[name] = nn.Parameter(torch.randn(P * n_heads, *shape) / math.sqrt(shape[0]))
                self.init_mem[name] = nn.Parameter(torch.randn(n_heads, *shape) / math.sqrt(shape[0]))
        self.params_proj = memory_params(spec, d_head, d_head, P * n_heads)
        self.params_mem = memory_params(spec, d_head, d_head, n_heads)
        self.add_output(d_model=d_model, inner=inner, d_head=d_head)

    # ------------------------------------------------------------------------------------------------ pieces
    def _init(self, store: nn.ParameterDict) -> dict[str, Tensor]:
        out = {}
        for name, shape in self.state_shapes.items():
            if name.startswith("W"):
                w = store[name]
                if self.spec.retention.kind == "kl":
                    w = self.spec.retention.scale * torch.softmax(w, dim=-1)
                out[name] = w
            else:  # momentum buffers S_l, omega windows: zeros at the start of a sequence
                out[name] = store["W1"].new_zeros(store["W1"].shape[0], *shape)
        return out

    def initial_state(self) -> dict[str, dict[str, Tensor]]:
        """``{"proj": stacked k/v/eta/alpha memories [P*H, in, out], "mem": output memory [H, in, out]}``."""
        return {"proj": self._init(self.init_proj), "mem": self._init(self.init_mem)}

    @staticmethod
    def _params(store: nn.ParameterDict) -> dict[str, Tensor] | None:
        out = {k: v for k, v in store.items() if k != "log_threshold"}
        if "log_threshold" in store:
            out["threshold"] = store["log_threshold"].exp()
        return out or None

    def _conv(self, h: Tensor, conv: nn.Conv1d | None) -> Tensor:
        if conv is not None:
            h = conv(F.pad(h.transpose(1, 2), (self.conv_context, 0))).transpose(1, 2)
        return F.silu(h) if self.spec.qkv_activation == "silu" else h

    def _norm(self, h: Tensor) -> Tensor:
        return F.normalize(h, dim=-1, eps=1e-6) if self.spec.qk_norm else h

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """q and the memories' input ``[B, T, H, d]`` (both conv'd) and the static extra gates."""
        B, T, _ = x.shape
        q = self._norm(self._conv(self.w_q(x), self.conv_q).reshape(B, T, self.n_heads, self.d_head))
        xh = self._conv(x, self.conv_x).reshape(B, T, self.n_heads, self.d_head)
        return q, xh, {n: g(x) for n, g in self.gates.items()}

    def _squash(self, r: Tensor, bias: Tensor, g: GateSpec) -> Tensor:
        return g.lo + (g.hi - g.lo) * torch.sigmoid(r.mean(-1) + bias.to(r.dtype))  # [B, n, H]

    def scan(
        self, q: Tensor, xh: Tensor, extra: dict[str, Tensor], state: dict, mode: str | None = None
    ) -> tuple[Tensor, dict, list[dict]]:
        """Self-modifying recurrence over chunks of ``selfmod.chunk_size`` (NL Eq. 86-90).

        Returns (o ``[B, T, H, d]``, final state, the state at the end of every chunk).
        """
        from miras.ops import memory_read, memory_scan

        mode = mode or self.mode
        P, H = len(self.names), self.n_heads
        pp, pm = self._params(self.params_proj), self._params(self.params_mem)
        C, T = self.sm.chunk_size, q.shape[1]
        outs, ends = [], []
        for s in range(0, T, C):
            e = min(T, s + C)
            xc, qc = xh[:, s:e], q[:, s:e]
            # 1. read k, v, eta, alpha with the memories at the previous chunk end (all in one stacked read)
            r = memory_read(self.proj_spec, xc.repeat(1, 1, P, 1), state["proj"], params=pp).to(xc.dtype)
            r = dict(zip(self.names, r.split(H, dim=2)))  # each [B, n, H, d]
            k, v = self._norm(r["k"]), r["v"]
            if self.sm.v_norm:  # [R] keeps the self-generated targets M(v) bounded (see SelfModSpec.v_norm)
                v = F.normalize(v, dim=-1, eps=1e-6)
            gates = {"lr": self._squash(r["eta"], self.b_eta, self.spec.learner.lr)}
            if self.has_alpha:
                gates["keep"] = self._squash(r["alpha"], self.b_alpha, self.spec.retention.gate)
            gates.update({n: t[:, s:e] for n, t in extra.items()})
            # 2. self-generated targets v_hat = M(v) at the same boundary states (NL Eq. 84)
            vhat_p = memory_read(self.proj_spec, v.repeat(1, 1, P, 1), state["proj"], params=pp).to(xc.dtype)
            vhat_m = memory_read(self.spec, v, state["mem"], params=pm).to(xc.dtype)
            # 3. writes: the projection memories (one chunk) and the output memory (its own gradient chunk)
            gp = {n: g.repeat(1, 1, P) for n, g in gates.items()}
            kp = k.repeat(1, 1, P, 1)
            _, proj = memory_scan(self.proj_spec, kp, kp, vhat_p, gp, state["proj"], params=pp, mode=mode)
            o, mem = memory_scan(self.spec, qc, k, vhat_m, gates, state["mem"], params=pm, mode=mode)
            outs.append(o)
            state = {"proj": proj, "mem": mem}
            ends.append(state)
        return torch.cat(outs, 1), state, ends

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        """State: ``{"memory": memories at the last chunk boundary, "ctx": inputs still needed, "n_pending"}``."""
        C = self.sm.chunk_size
        if state is None:
            mem, ctx, n_pending = self.initial_state(), x[:, :0], 0
        else:
            mem, ctx, n_pending = state["memory"], state["ctx"], state["n_pending"]
        xs = torch.cat([ctx, x], 1)
        lead = ctx.shape[1] - n_pending
        q, xh, extra = self.features(xs)
        n = xs.shape[1] - lead
        o, final, ends = self.scan(q[:, lead:], xh[:, lead:], {k: t[:, lead:] for k, t in extra.items()}, mem)
        n_full = n // C
        boundary = mem if n_full == 0 else ends[n_full - 1]
        y = self.output(o[:, n - x.shape[1] :], x)
        keep = min(n - n_full * C + self.conv_context, xs.shape[1])
        return y, {"memory": boundary, "ctx": xs[:, xs.shape[1] - keep :], "n_pending": n - n_full * C}


__all__ = ["SelfModMixer", "memory_names", "selfmod_param_rows", "selfmod_state_bytes"]
