r"""TNT: hierarchical memory, one global memory with a large chunk plus N local memories (Li et al. 2025, arXiv:2511.07343).

With ``memory.local`` set, the memory token mixer reads (TNT Eq. 5-7, App. E Eq. 13-15; papers.md §5.2, §12.6):

    o_t = M(q_t; V_{xi(t, C_G)}) + sum_i M(Pi_t^(i) q_t; W_t^(i))                                 xi(t, C) = t - t mod C

* global memory V: the layer's memory/bias/retention/learner axes with chunk ``C_G = learner.chunk_size``; it is
  written chunk by chunk (``memory_scan`` over one chunk of C_G tokens) and *read with the chunk-start state*, so a
  token never sees the writes of its own global chunk (TNT Eq. 5);
* local memory i: the same axes with its own chunk C_L^(i) and shard length S_L^(i); at every shard boundary it is
  reset to its learned initial state W_init^(i) (and its momentum to zero), inside a shard it is ``memory_scan`` with
  chunk C_L (TNT Eq. 6, chunk-start gradient base). Shards are independent, so all full shards of a call are folded
  into the batch axis and scanned at once;
* Q-K projection (TNT Eq. 7, App. C): local reads use ``Pi_t q_t`` with ``Pi_t = sum_{s in shard, s <= t} k^_s k^_s^T``
  (k^ = k / ||k||), computed without forming any [T, K, K] tensor: ``Pi_t q_t = sum_s k^_s (k^_s . q_t)`` as a causal
  masked matmul inside blocks of 64 tokens plus the exclusive prefix sum of the blocks' ``K^T K`` (one [K, K] per block).

The q/k/v projections, short convs, output norm, gate and W_o are shared by all memories (``MemoryMixer``'s); every
memory has its own gates, learned initial state and memory norm parameters (a :class:`MemoryCore`).

Decoding: the state carries the absolute position, each memory's state at its last chunk boundary (local memories
also their Pi there) and the inputs since the earliest such boundary, so any split of a sequence into calls gives the
outputs of one call. ``mode`` (``auto | chunked | recurrent``) picks the ``memory_scan`` implementation; with
``recurrent`` every scan is the token-by-token oracle and Pi is a running sum, the reference of the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miras.components.mixer import MemoryMixer
from miras.errors import MirasError, SpecError
from miras.spec import MemorySpec, ModelSpec

PROJECTION_BLOCK = 64

# ------------------------------------------------------------------------------------------------------ spec helpers


def plain_memory_spec(spec: MemorySpec, chunk_size: int) -> MemorySpec:
    """The single-memory spec of one TNT memory: ``spec`` without ``local`` and with ``learner.chunk_size = chunk_size``."""
    learner = spec.learner.model_copy(update={"chunk_size": chunk_size})
    return spec.model_copy(update={"local": None, "learner": learner})


# the MemoryMixer parameter rows shared by every memory of a TNT layer (the rest belongs to one memory)
_SHARED_ROWS = ("memory.projections", "memory.conv", "memory.feature_map", "memory.output_norm", "memory.output_gate",
                "memory.out_projection", "memory.caching_connector")


def tnt_mixer_rows(mem: MemorySpec, rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``count_params`` rows of a TNT mixer from the rows of a plain ``MemoryMixer`` of the same spec.

    The shared rows stay; the per-memory rows (gates, initial state, memory norm/threshold) appear once for the global
    memory (when ``global_memory``) and once per local memory, named ``memory.local[i].<part>``.
    """
    loc = mem.local
    shared = [r for r in rows if r[0] in _SHARED_ROWS]
    own = [r for r in rows if r[0] not in _SHARED_ROWS]
    out = list(shared)
    if loc.global_memory:
        out += [(f"memory.global.{name[len('memory.'):]}", n) for name, n in own]
    for i in range(len(loc.chunk_sizes)):
        out += [(f"memory.local[{i}].{name[len('memory.'):]}", n) for name, n in own]
    return out


def tnt_state_bytes(mem: MemorySpec, d_head: int, n_heads: int, dtype_bytes: int) -> int:
    """Decoding state of a TNT layer per sequence: every memory's W (and S), plus a [K, K] Pi per head for each local
    memory with the Q-K projection."""
    from miras.components.memory import state_bytes

    loc = mem.local
    one = state_bytes(plain_memory_spec(mem, mem.learner.chunk_size), d_head, d_head, n_heads, dtype_bytes)
    n_mem = len(loc.chunk_sizes) + (1 if loc.global_memory else 0)
    pi = len(loc.chunk_sizes) * n_heads * d_head * d_head * dtype_bytes if loc.qk_projection else 0
    return n_mem * one + pi


# ------------------------------------------------------------------------------------------------ Q-K projection


def qk_project(q: Tensor, k: Tensor, pi0: Tensor | None = None, *, block: int = PROJECTION_BLOCK) -> Tensor:
    """``Pi_t q_t`` with ``Pi_t = Pi_0 + sum_{s <= t} k^_s k^_s^T``, k^ = k / ||k|| (TNT Eq. 7, App. C), causal.

    q, k ``[B, T, H, K]``; pi0 ``[B, H, K, K]`` (None: zero, a shard start). Blocks of ``block`` tokens: inside a block a
    masked matmul ``(q k^T ⊙ tril) k``, across blocks the exclusive prefix sum of ``K_b^T K_b``.
    """
    B, T, H, K = q.shape
    kn = F.normalize(k, dim=-1)
    blk = max(1, min(block, T))
    nb = -(-T // blk)
    pad = nb * blk - T
    if pad:
        q = torch.cat([q, q.new_zeros(B, pad, H, K)], 1)
        kn = torch.cat([kn, kn.new_zeros(B, pad, H, K)], 1)
    qc = q.reshape(B, nb, blk, H, K).permute(0, 3, 1, 2, 4)  # [B, H, nb, blk, K]
    kc = kn.reshape(B, nb, blk, H, K).permute(0, 3, 1, 2, 4)
    mask = torch.ones(blk, blk, dtype=torch.bool, device=q.device).tril()
    intra = ((qc @ kc.transpose(-1, -2)) * mask) @ kc  # [B, H, nb, blk, K]
    kk = kc.transpose(-1, -2) @ kc  # [B, H, nb, K, K]
    prev = torch.cumsum(torch.cat([torch.zeros_like(kk[:, :, :1]), kk[:, :, :-1]], 2), 2)  # exclusive prefix
    if pi0 is not None:
        prev = prev + pi0[:, :, None].to(prev.dtype)
    out = intra + qc @ prev
    return out.permute(0, 2, 3, 1, 4).reshape(B, nb * blk, H, K)[:, :T]


def qk_project_recurrent(q: Tensor, k: Tensor, pi0: Tensor | None = None) -> Tensor:
    """Token-by-token oracle of :func:`qk_project`: ``Pi_t = Pi_{t-1} + k^_t k^_t^T``, ``out_t = Pi_t q_t``."""
    B, T, H, K = q.shape
    kn = F.normalize(k, dim=-1)
    pi = q.new_zeros(B, H, K, K) if pi0 is None else pi0.to(q.dtype)
    outs = []
    for t in range(T):
        kt = kn[:, t]  # [B, H, K]
        pi = pi + kt[..., :, None] * kt[..., None, :]
        outs.append((pi @ q[:, t, ..., None])[..., 0])
    return torch.stack(outs, 1) if outs else q.clone()


def _outer_sum(k: Tensor) -> Tensor:
    """``sum_t k^_t k^_t^T`` per (batch, head): k ``[B, T, H, K]`` -> ``[B, H, K, K]``."""
    kn = F.normalize(k, dim=-1).transpose(1, 2)  # [B, H, T, K]
    return kn.transpose(-1, -2) @ kn


# ---------------------------------------------------------------------------------------------------- the modules


class MemoryCore(nn.Module):
    """The parameters of one memory of a TNT layer: its gates, learned initial state and memory norm/threshold params.

    Built like the corresponding parts of :class:`MemoryMixer` (a throw-away mixer donates them, so the two stay equal).
    """

    def __init__(self, spec: MemorySpec, *, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        donor = MemoryMixer(spec, d_model=d_model, n_heads=n_heads, d_head=d_head)
        self.spec, self.n_heads, self.d_head = spec, n_heads, d_head
        self.state_shapes = donor.state_shapes
        self.gates, self.init_state, self.mem_params = donor.gates, donor.init_state, donor.mem_params

    def initial_state(self) -> dict[str, Tensor]:
        return MemoryMixer.initial_state(self)  # same attributes, same rule (KL: softmax of the logits)

    def memory_params(self) -> dict[str, Tensor] | None:
        return MemoryMixer.memory_params(self)

    def gate_values(self, x: Tensor) -> dict[str, Tensor]:
        return {name: gate(x) for name, gate in self.gates.items()}


def _fold(x: Tensor, m: int) -> Tensor:
    """``[B, m*S, ...]`` -> ``[B*m, S, ...]`` (shards onto the batch axis, batch-major)."""
    B, n = x.shape[:2]
    return x.reshape(B * m, n // m, *x.shape[2:])


def _unfold(x: Tensor, m: int) -> Tensor:
    """Inverse of :func:`_fold` for outputs ``[B*m, S, ...]`` -> ``[B, m*S, ...]``."""
    Bm, S = x.shape[:2]
    return x.reshape(Bm // m, m * S, *x.shape[2:])


class TNTMixer(MemoryMixer):
    """The TNT memory mixer: shared projections, one global memory (optional) and N local memories (module docstring).

    Parameters: ``MemoryMixer``'s (its gates / init_state / mem_params are the global memory's, empty without one) and
    ``locals[i]`` (:class:`MemoryCore`) per local memory.
    """

    def __init__(self, spec: MemorySpec, *, d_model: int, n_heads: int, d_head: int) -> None:
        if spec.local is None:
            raise SpecError("memory.local: TNTMixer needs the local memories section, but got memory.local=None")
        super().__init__(spec, d_model=d_model, n_heads=n_heads, d_head=d_head)
        loc = spec.local
        self.mode = "auto"
        self.global_spec = plain_memory_spec(spec, spec.learner.chunk_size) if loc.global_memory else None
        if not loc.global_memory:
            self.gates, self.init_state, self.mem_params = nn.ModuleDict(), nn.ParameterDict(), nn.ParameterDict()
        self.local_specs = [plain_memory_spec(spec, c) for c in loc.chunk_sizes]
        self.shards = loc.shards
        self.locals = nn.ModuleList(
            MemoryCore(s, d_model=d_model, n_heads=n_heads, d_head=d_head) for s in self.local_specs
        )

    # ------------------------------------------------------------------------------------------------ pieces
    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q = self.queries(x)
        k = self._qk(self._branch(x, self.w_k, self.conv_k))
        v = self._branch(x, self.w_v, self.conv_v)
        return q, k, v

    def _scan(self, spec: MemorySpec, q, k, v, gates, state, params):
        from miras.ops import memory_scan

        return memory_scan(spec, q, k, v, gates, state, params=params, mode=self.mode)

    def _project(self, q: Tensor, k: Tensor, pi0: Tensor | None) -> Tensor:
        if not self.spec.local.qk_projection:
            return q
        return qk_project_recurrent(q, k, pi0) if self.mode == "recurrent" else qk_project(q, k, pi0)

    def _write(self, spec: MemorySpec, q, k, v, gates, state, params) -> dict[str, Tensor]:
        """The state after writing one chunk, without computing its reads (chunked path; the oracle in recurrent mode)."""
        if self.mode == "recurrent":
            return self._scan(spec, q, k, v, gates, state, params)[1]
        from miras.ops_chunked import chunked_memory_scan

        dt = torch.float64 if q.dtype == torch.float64 else torch.float32

        def cast(d):
            return None if d is None else {n: t.to(dt) for n, t in d.items()}

        return chunked_memory_scan(spec, q.to(dt), k.to(dt), v.to(dt), cast(gates), cast(state), params=cast(params),
                                   reads=False)[1]

    def _global(self, q, k, v, gates, V, *, final: bool = True):
        """Global memory from a C_G boundary with state V: read each chunk with its start state, then write it
        (full chunks only; ``final=False`` skips the last write, which no output reads). Returns (o, state at the
        last boundary, or None when skipped)."""
        from miras.ops import memory_read

        spec, params, C = self.global_spec, self.memory_params(), self.global_spec.learner.chunk_size
        n, outs = q.shape[1], []
        for s in range(0, n, C):
            e = min(s + C, n)
            outs.append(memory_read(spec, q[:, s:e], V, params=params).to(q.dtype))
            if e - s == C:
                if not final and e == n:  # nothing reads the state after the last chunk
                    V = None
                    break
                V = self._write(spec, q[:, s:e], k[:, s:e], v[:, s:e], {g: t[:, s:e] for g, t in gates.items()}, V, params)
        return torch.cat(outs, 1), V

    def _piece(self, i: int, q, k, v, gates, W, pi):
        """One stretch of local memory i inside one shard, from a chunk boundary with state (W, Pi).
        Returns (o, W, Pi) with the state at the stretch's last chunk boundary."""
        core, spec = self.locals[i], self.local_specs[i]
        C, n = spec.learner.chunk_size, q.shape[1]
        nf = n // C * C
        qp = self._project(q, k, pi)
        params = core.memory_params()
        if nf in (0, n):
            o, final = self._scan(spec, qp, k, v, gates, W, params)
            W_b = final if nf == n else W
        else:
            head, tail = slice(0, nf), slice(nf, n)
            o1, W_b = self._scan(spec, qp[:, head], k[:, head], v[:, head], {g: t[:, head] for g, t in gates.items()}, W,
                                 params)
            o2, _ = self._scan(spec, qp[:, tail], k[:, tail], v[:, tail], {g: t[:, tail] for g, t in gates.items()}, W_b,
                               params)
            o = torch.cat([o1, o2], 1)
        if self.spec.local.qk_projection and nf:
            pi_b = _outer_sum(k[:, :nf]) + (0 if pi is None else pi)
        else:
            pi_b = pi
        return o, W_b, pi_b

    def _local(self, i: int, q, k, v, gates, b: int, W, pi):
        """Local memory i over tokens from absolute position ``b`` (a C_L boundary) with state (W, Pi) at b: reset at
        shard starts, full shards folded into the batch. Returns (o, W, Pi) at the last C_L boundary."""
        S, n = self.shards[i], q.shape[1]
        core = self.locals[i]
        init = core.initial_state()
        if S and b % S == 0:
            W, pi = init, None
        if not S:
            return self._piece(i, q, k, v, gates, W, pi)
        outs, s = [], 0
        if b % S:  # the rest of a shard begun in an earlier call
            s = min(n, S - b % S)
            o, W, pi = self._piece(i, q[:, :s], k[:, :s], v[:, :s], {g: t[:, :s] for g, t in gates.items()}, W, pi)
            outs.append(o)
        m = (n - s) // S
        if m:  # full fresh shards, independent: fold them into the batch axis
            e = s + m * S
            sl = slice(s, e)
            o, Wf, pif = self._piece(i, _fold(q[:, sl], m), _fold(k[:, sl], m), _fold(v[:, sl], m),
                                     {g: _fold(t[:, sl], m) for g, t in gates.items()}, init, None)
            outs.append(_unfold(o, m))
            W = {name: w.reshape(-1, m, *w.shape[1:])[:, -1] for name, w in Wf.items()}
            pi = None if pif is None else pif.reshape(-1, m, *pif.shape[1:])[:, -1]
            s = e
        if s < n:  # a fresh shard cut short by the end of the call
            o, W, pi = self._piece(i, q[:, s:], k[:, s:], v[:, s:], {g: t[:, s:] for g, t in gates.items()}, init, None)
            outs.append(o)
        return torch.cat(outs, 1), W, pi

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        """Mix ``x [B, T, D]``; ``state`` continues a sequence. Returns (y [B, T, D], state)."""
        pos0 = 0 if state is None else state["pos"]
        ctx = x[:, :0] if state is None else state["ctx"]
        xs = torch.cat([ctx, x], 1)
        base = pos0 - ctx.shape[1]  # absolute position of xs[:, 0]
        pos1 = pos0 + x.shape[1]
        q, k, v = self._qkv(xs)
        o = 0
        new: dict = {"pos": pos1, "local": []}
        bounds = []
        if self.global_spec is not None:
            C = self.global_spec.learner.chunk_size
            b = pos0 // C * C
            lo = b - base
            V = self.initial_state() if state is None else state["global"]
            if V is None:
                raise MirasError("TNTMixer: this state comes from a training-mode forward with gradients, which skips the "
                                 "global memory's last write; decode under torch.no_grad() or after model.eval()")
            final = not (self.training and torch.is_grad_enabled())  # training: the last write feeds no output
            og, V = self._global(q[:, lo:], k[:, lo:], v[:, lo:], {n: g(xs[:, lo:]) for n, g in self.gates.items()}, V,
                                 final=final)
            o = o + og[:, pos0 - b :]
            new["global"] = V
            bounds.append(pos1 // C * C)
        for i, core in enumerate(self.locals):
            C = self.local_specs[i].learner.chunk_size
            b = pos0 // C * C
            lo = b - base
            W, pi = (core.initial_state(), None) if state is None else state["local"][i]
            ol, W, pi = self._local(i, q[:, lo:], k[:, lo:], v[:, lo:], core.gate_values(xs[:, lo:]), b, W, pi)
            o = o + ol[:, pos0 - b :]
            new["local"].append((W, pi))
            bounds.append(pos1 // C * C)
        keep_from = max(min(bounds) - self.conv_context, base)
        new["ctx"] = xs[:, keep_from - base :]
        return self.output(o, x), new


# ------------------------------------------------------------------------------------------- stage two (TNT §5.3)

FREEZE_CHOICES = ("local",)


def _diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [path]


def check_stage_two(stage_one: ModelSpec, stage_two: ModelSpec) -> list[str]:
    """The fields a stage-two spec changes; raises SpecError unless the only change is ``memory.local.chunk_sizes``
    (TNT §5.3: continue training with finer local chunks, everything else as in stage one)."""
    skip = {"name", "description", "train", "tracking", "budget"}
    a = stage_one.model_dump(mode="json", exclude=skip)
    b = stage_two.model_dump(mode="json", exclude=skip)
    changed = _diff(a, b)
    bad = [p for p in changed if p != "memory.local.chunk_sizes"]
    if stage_one.memory.local is None:
        raise SpecError("--from: stage two fine-tunes a TNT model, but the checkpoint's spec has memory.local=None")
    if bad:
        details = ", ".join(f"{p} ({_get(a, p)!r} -> {_get(b, p)!r})" for p in bad[:8])
        raise SpecError(
            f"--from: a stage-two spec may change only memory.local.chunk_sizes (TNT §5.3), but got changes in "
            f"{details}. Drop those overrides, or train a new model instead of --from."
        )
    return changed


def _get(d: dict, path: str):
    for key in path.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def load_stage_one(model: nn.Module, checkpoint: str | Path) -> None:
    """Copy the weights of a stage-one checkpoint into ``model`` (strict: every tensor must match)."""
    from safetensors.torch import load_model

    from miras.checkpoint import _is_tied, find_checkpoint

    ckpt = find_checkpoint(checkpoint)
    missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    missing = [m for m in missing if not _is_tied(model, m)]
    if missing or unexpected:
        raise SpecError(f"--from {checkpoint}: weights do not match the spec: missing={missing[:5]}, "
                        f"unexpected={unexpected[:5]}")


def stage_two_setup(checkpoint: str | Path, source: str | None, overrides: tuple[str, ...] | list[str]):
    """``miras train --from CKPT [SPEC] --set memory.local.chunk_sizes=[..]``: (spec, train settings, tracking).

    The spec is SPEC (or the checkpoint's own spec) with the overrides; it must equal the checkpoint's spec except for
    ``memory.local.chunk_sizes`` (:func:`check_stage_two`). Train settings start from the checkpoint's (flags override);
    the run is named ``<name>-stage2``.
    """
    import json

    from miras.checkpoint import find_checkpoint
    from miras.commands.train_cmds import load_run_spec
    from miras.spec import load_spec

    ckpt = find_checkpoint(checkpoint)
    stage_one = load_spec(ckpt / "spec.yaml")
    spec, train_data, tracking = load_run_spec(source or str(ckpt / "spec.yaml"), overrides)
    check_stage_two(stage_one, spec)
    meta = json.loads((ckpt / "meta.json").read_text())
    base = {k: v for k, v in (meta.get("train") or {}).items() if k not in ("device",)}
    train_data = {**base, **train_data}
    spec = spec.model_copy(update={"name": f"{stage_one.name or 'tnt'}-stage2"})
    return spec, train_data, tracking


def freeze_except(model: nn.Module, keep: str) -> tuple[int, int]:
    """Freeze every parameter except those of ``keep`` (``local``: the local memories' gates, initial states and
    memory params, TNT §5.3 "only the local memory modules are adapted"). Returns (trainable, frozen) counts."""
    if keep not in FREEZE_CHOICES:
        raise SpecError(f"--freeze-except: must be one of {', '.join(FREEZE_CHOICES)}, but got {keep!r}")
    trainable = frozen = 0
    for name, p in model.named_parameters():
        on = ".locals." in f".{name}"
        p.requires_grad_(on)
        trainable += p.numel() if on else 0
        frozen += 0 if on else p.numel()
    if trainable == 0:
        raise SpecError("--freeze-except local: the model has no local memories (memory.local is not set)")
    return trainable, frozen


__all__ = [
    "MemoryCore",
    "TNTMixer",
    "check_stage_two",
    "freeze_except",
    "load_stage_one",
    "plain_memory_spec",
    "qk_project",
    "qk_project_recurrent",
    "stage_two_setup",
    "tnt_mixer_rows",
    "tnt_state_bytes",
]
