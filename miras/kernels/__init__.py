"""Triton kernels of the memory update: ``triton_memory_scan`` (the ``mode="triton"`` of ``miras.ops.memory_scan``).

Same contract and semantics as ``memory_scan`` (see miras/ops.py and briefs/ops.md): the chunked dual form with every
gradient of a chunk taken at the chunk-start state (Titans Eq. 16, Miras Eq. 28). Which spec combinations have a
kernel is answered by ``kernel_support``; everything else falls back to the PyTorch chunked path in ops.py.

Triton is imported lazily (only when a kernel runs), so ``import miras.kernels`` works without it. On a CPU machine the
kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is first imported.

Knobs (environment, read at each call; a malformed value is a ValueError naming the variable):
- ``MIRAS_KERNEL_SPLIT=0``: the fused chunk walk instead of the split kernels (state pass + chunk-parallel passes,
  miras/kernels/linear.py).
- ``MIRAS_KERNEL_BV``: a smaller V-tile (default the whole V; Huber always uses it); ``MIRAS_KERNEL_BV_STATE``: the
  V-tile of the sequential state passes (default: that tile, at most 64); ``MIRAS_KERNEL_BV_LOOP``: the sub-block in
  which the backward's gradient pass walks its V-tile (default 64 columns). On GPU, tiles are at least 64 wide.
- ``MIRAS_KERNEL_GRAD_SPLIT=0``: the backward's gradient pass as one kernel instead of two (a whole-K kernel for dv
  and the gates, then dq / dk in K-blocks); ``MIRAS_KERNEL_BK_GRAD``: that K-block (default 64).
- ``MIRAS_KERNEL_STATES``: dtype of the chunk-start state slots the forward hands to the other passes (``auto``, the
  default: bf16 for bf16 inputs, else fp32; or ``fp32``, ``bf16``).
- ``MIRAS_KERNEL_COEFFS=0``: the state passes build the gate coefficients at every step instead of reading them from
  the per-chunk coefficient kernel.
- ``MIRAS_KERNEL_CONFIG=warps,stages[,maxnreg]``: a fixed launch config instead of autotuning on GPU;
  ``MIRAS_KERNEL_GRAD_CONFIG``: the same for the backward's gradient pass alone.
- ``MIRAS_KERNEL_DELTA=1``: the online delta rule (``learner.chunk_size: 1``, l2, gd: DeltaNet, Gated DeltaNet)
  and DGD with its key projector on a linear memory (dot or l2 bias, retention none or a head keep gate) on the
  kernels, in WY blocks (miras/kernels/delta.py; default off until their GPU tests have run: the chunked path runs
  them); ``MIRAS_KERNEL_DELTA_CHUNK``: its tokens per WY block, which is also the kernels' chunk there
  (1..64, default 64);
  ``MIRAS_KERNEL_DELTA_WY``: where its WY blocks are formed (``triton``, the default: kernels of their own; ``torch``:
  PyTorch's batched triangular solves and autograd, the chunked path's ``ops_delta.wy_solve``).
- ``MIRAS_KERNEL_OMEGA=0``: the omega bias (ATLAS Eq. 9-10; gd, ``bias.window * learner.chunk_size <= 64``) takes
  the chunked path instead of its inner bias' kernels on sub-tokens (miras/kernels/omega.py; default on: no kernel
  code of its own, exact against the float64 oracle in the interpreter; not yet run on a GPU).
- ``MIRAS_KERNEL_TTT=1``: a depth-1 MLP memory with a LayerNorm head (TTT-Linear's ``x + LN(x W) w + b``, the
  ``tnt-ttt`` recipe; bias dot, l2, lp or huber; head or scalar keep gates) on the linear kernels, which then write
  with the head's rows R = J^T R_y (``common.ln_rows``, all of V per program) and read q W raw, the head applied in
  PyTorch (``_ttt_scan``; default off until its GPU test has passed: it matches the float64 oracle in the
  interpreter).
- ``MIRAS_KERNEL_LQ=1``: Lq retention (Moneta's W = A / ||A||_q^(q-2), ``retention.kind: lq``) of the linear
  memory on the linear kernels: the walks (all of V per program) take each chunk's read scale 1 / nu(A) from its
  start state (``common.lq_scale``), the predictions are taken at the scaled state, and the reads are scaled in
  PyTorch (``_lq_reads``, ``linear.LqScanFunction``; default off until its GPU test has passed: it matches the
  float64 oracle in the interpreter).
- ``MIRAS_KERNEL_LAG=1``: KL and elastic-net retention (the lag-token retentions, Miras Eq. 21-22, 30:
  ``retention.kind: kl | elastic``) of the linear memory on the linear kernels: every pass forms each chunk's
  carried state from its start state (``common.lag_carry``: the soft threshold, or the softmax over all of V per
  program), and the backward takes its vector-Jacobian product (``linear.LagScanFunction``; default off until its
  GPU test has passed: it matches the float64 oracle in the interpreter).
- ``MIRAS_KERNEL_CHANNEL_CONFIG=warps,stages[,maxnreg]``: the launch config of the kernels of a key-channel keep gate
  (``retention.gate.granularity: channel`` on the linear memory, miras/kernels/linear_channel.py; default ``8,1``);
  ``MIRAS_KERNEL_CHANNEL_BV``: their V-tile (default 64; all of V for Huber); ``MIRAS_KERNEL_CHANNEL_SPLIT=0``: one
  program per V-tile and batch*head walks the chunks doing all of the work, instead of walking them for the states
  alone and forming the rest for every chunk at once (``linear_channel.channel_split``, the default; unmeasured on a
  GPU).
- ``MIRAS_KERNEL_MLP_NORM=0``: turns off the MLP-memory kernels' LayerNorm head (``memory.norm``, the recipes' MLP
  memory; docs/kernels-ln-head.md), so that such a memory takes the chunked path. On by default since its GPU tests
  passed on an H100 (benchmarks/RESULTS.md, GPU session 15).
- ``MIRAS_KERNEL_MLP=0``: turns the 2-layer MLP-memory kernels off (on by default since they passed their GPU
  tests on an H200, benchmarks/RESULTS.md session 12); ``MIRAS_KERNEL_MLP_LAYOUT``: their
  layout (``tiles``, the default: miras/kernels/mlp_tiles.py; ``walk``: miras/kernels/mlp.py); ``MIRAS_KERNEL_BH``:
  their hidden tile (16 at chunk 64, else 32); ``MIRAS_KERNEL_MLP_CONFIG``: their launch config (default ``4,1``:
  8 warps miscompile the tile kernels on Hopper, see ``mlp._launcher``; five kernels default to their measured
  fastest, ``mlp.TUNED_CONFIGS``); ``MIRAS_KERNEL_MLP_SUMS_CONFIG``: the launch config of the
  tiles layout's contractions over the hidden dim (default: ``MIRAS_KERNEL_MLP_CONFIG``);
  ``MIRAS_KERNEL_MLP_CONFIG_<KERNEL>``: one kernel's launch config, before both (``<KERNEL>``: its name without the
  underscore, upper case, e.g. ``MIRAS_KERNEL_MLP_CONFIG_BWD_SUMS``; ``mlp.kernel_config_env``);
  ``MIRAS_KERNEL_MLP_BLOCK_<KERNEL>``: how much of its output one program of ``_prep_state`` (rows, default 16 at
  chunk 64), ``_fwd_out`` or ``_bwd_sums`` (columns, default 32), ``_fwd_tile``, ``_bwd_tile32``, ``_bwd_tile2`` or
  ``_bwd_read`` (hidden tiles, default 1) forms (``mlp_tiles.kernel_block``); ``MIRAS_KERNEL_MLP_Y0``: how the training
  forward's tile programs hand the next chunk's prediction to ``_prep_state`` (``acts``, the default: their hidden
  activations, contracted with W2 there; ``parts``: their parts of it, summed there, the default before session
  17; ``mlp_tiles.y0_mode``); ``MIRAS_KERNEL_MLP_PREC``:
  the dot operands for bf16 inputs (``bf16``, the tiles layout's default, or ``tf32``, the walk layout's;
  ``mlp._prec``);
  ``MIRAS_KERNEL_MLP_FACTORS``: the dtype of the tiles layout's per-tile factor scratch (``auto``, the default: bf16
  with bf16 dots, else fp32; ``fp32``; ``bf16``; ``mlp_tiles.factors_dtype``); ``MIRAS_KERNEL_MLP_OPERANDS``: the
  dtype of its records' dot-operand blocks (``fp32``, the default; ``bf16`` / ``auto`` are experimental: an illegal
  memory access on an H100, ``mlp_tiles.operands_dtype``); ``MIRAS_KERNEL_MLP_R``: the dtype of its records' R
  (``fp32``, the default; ``bf16`` / ``auto``: the same products from half the loads, not yet run on a GPU;
  ``mlp_tiles.r_dtype``); ``MIRAS_KERNEL_MLP_STATES``: the dtype of the chunk-start states the training forward
  keeps for the backward (``fp32``, the default; ``bf16`` / ``auto``: kept apart from the fp32 recurrence, half
  their bytes and memory, not yet run on a GPU; ``mlp_tiles.saved_states_dtype``);
  ``MIRAS_KERNEL_MLP_FUSE_PASSES``: whether the tiles layout runs each chunk's backward pass 2 behind the next
  chunk's pass 3 (default: separate when launches are cheap, with the fast launch below or graphs; fused otherwise;
  ``mlp_tiles.fuse_passes``); ``MIRAS_KERNEL_MLP_SPLIT_PASS2=1``: run the ten of pass 2's fourteen dots per tile
  that the end state's gradient does not enter for every chunk at once before the backward's chunk loop, and only
  the other four in it (default off, unmeasured; 0.8 GB more memory at the bench shape; ``mlp_tiles.split_pass2``);
  ``MIRAS_KERNEL_MLP_SPLIT_SUMS=1``: that, and the backward's sums over the hidden dim that the end state's gradient
  does not enter (SA, dC1, dq) for every chunk before the loop too (default off, unmeasured; 0.27 GB more;
  ``mlp_tiles.split_sums``); ``MIRAS_KERNEL_MLP_SPLIT_READ=1``: the training forward forms the dual-form read's
  hidden activation for every chunk after its loop (``_fwd_read``) instead of in it (default off, unmeasured; 64 MB
  more; ``mlp_tiles.split_read``); ``MIRAS_KERNEL_MLP_DOT_BLOCKS=fp32|bf16|auto``: the dtype in which the tile
  kernels hold the chunk's blocks that only feed dots (q, k, dO, R, gamma dY; default fp32, unmeasured; with bf16
  dots the same products and fewer spills; ``mlp_tiles.dot_blocks_dtype``).
- ``MIRAS_KERNEL_FAST_LAUNCH=0``: launch the MLP kernels through Triton's plain ``kernel[grid]`` path at every call
  instead of through the compiled kernel's own launcher once a launch site has been seen (default on with triton
  >= 3.6; same compiled kernels, bit for bit the same results, far less host time per launch;
  miras/kernels/launcher.py).
- ``MIRAS_KERNEL_MLP_PDL=1``: launch the tiles layout's kernels with programmatic dependent launch (Hopper or
  newer, compiled kernels only; default off, unmeasured): a kernel's programs may be scheduled while the previous
  kernel drains and wait for it before their first memory access (``mlp.launch_pdl``), bit for bit the same results.
- ``MIRAS_KERNEL_MLP_GRAPHS=N`` or ``auto``: replay the MLP memory's backward (~200 launches at T=4096) and, in
  the tiles layout, its forward (~130; ``MIRAS_KERNEL_MLP_FORWARD_GRAPHS`` sets the forward's apart) as CUDA
  graphs, keeping at most N graphs each (default 0: off; ``auto``: as many as a step needs, up to 64; a model YAML's
  ``train.kernel_graphs`` sets it for a ``miras train`` run; miras/kernels/graphs.py). On an H200, fwd+bwd at B=4,
  T=4096, H=8, D=128 took 10.8 ms instead of 16.4 ms with the backward's graphs (benchmarks/RESULTS.md session 13;
  the forward's are unmeasured). Each layer's backward (and forward) is its own graph: a fixed N below the number
  of MLP-memory layers re-captures every step (and warns). Each backward graph keeps its gradient outputs; their
  scratch shares one pool (~0.7 GB at that shape). The forward's graphs write only into buffers allocated before
  each call (the outputs, the state slots and records kept for the backward, the scratch), so they hold nothing.
"""

from __future__ import annotations

import warnings
from functools import cache, lru_cache

import torch

from miras.errors import KernelUnavailable
from miras.kernels.settings import delta_chunk, env_switch

__all__ = ["kernel_chunk", "kernel_support", "shape_gap", "triton_memory_scan", "triton_status"]

MAX_CHUNK = 64  # the kernels hold a chunk in one block of rows (padded to 16 or the next power of two)
MAX_HEAD_DIM = 256
MAX_GRID_AXIS = 65535  # CUDA's cap on a grid's second and third axes: the batch*heads, and the chunks of a sequence


@lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(usable?, reason). Triton >= 3.0 is required (the kernels use tl.cumsum(reverse=...) and input_precision)."""
    try:
        import triton
    except ImportError:
        return False, "triton is not installed (pip install 'miras[triton]')"
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return True, f"triton {triton.__version__} (unparsed version, assumed >= 3.0)"
    if major < 3:
        return False, f"triton >= 3.0 is required, but got triton=={triton.__version__}; upgrade triton"
    return True, f"triton {triton.__version__}"


def _warn_known_bad(device: torch.device) -> None:
    """Warn once about Triton versions with known Hopper codegen bugs in chunked linear-attention backward kernels."""
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9 and (3, 4) <= (major, minor) < (3, 8):
        _warn_once(
            f"miras.kernels: triton=={triton.__version__} on a Hopper GPU has known codegen bugs in chunked "
            "linear-attention backward kernels (fla-org/flash-linear-attention #640, #984: tl.trans of tl.dot results, "
            "fixed in 3.7.1). These kernels avoid the pattern on their [BT, BT] tiles and are checked by "
            "tests/test_kernels_gpu.py; if gradients look wrong, upgrade triton or use mode='chunked'."
        )


@cache
def _warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


def shape_gap(spec, B: int, T: int, H: int, K: int, V: int) -> str:
    """Why the kernels cannot run inputs of these shapes, or "" when they can: head dims above MAX_HEAD_DIM, more
    chunks per sequence (ceil(T / the ``kernel_chunk``)) or batch*heads than a grid axis holds (the chunk-parallel
    launches put the batch*heads on the grid's second axis and the chunks on its third). ``memory_scan``'s auto mode
    takes the chunked path then, with a one-time warning naming the reason."""
    if max(K, V) > MAX_HEAD_DIM:
        return f"head dims must be <= {MAX_HEAD_DIM}, but got K={K}, V={V}"
    chunk, name = kernel_chunk(spec)
    chunks = -(-T // chunk)
    if chunks > MAX_GRID_AXIS:
        advice = f"use a larger {name}" if chunk < MAX_CHUNK else "use shorter sequences"
        return (f"at most {MAX_GRID_AXIS} chunks per sequence (a CUDA grid axis), but T={T} at {name}={chunk} makes "
                f"{chunks}; {advice}")
    if B * H > MAX_GRID_AXIS:
        return f"at most {MAX_GRID_AXIS} batch*heads (a CUDA grid axis), but got B*H={B * H}"
    return ""


def _delta_rule(spec) -> bool:
    """Whether the spec is the online delta rule with a head keep gate or none: the WY blocks of delta.py."""
    from miras.ops_delta import is_delta_rule

    return is_delta_rule(spec) and not _channel_gate(spec)


def _dgd_blocks(spec) -> bool:
    """Whether the spec is DGD with its key projector on a linear memory with a dot or L2 bias and a head keep gate or
    none: the WY blocks of delta.py at ``learner.chunk_size`` (``ops_delta.dgd_point``)."""
    from miras.ops_delta import dgd_point

    return dgd_point(spec) is not None and not _channel_gate(spec)


def _dgd_gap(spec) -> str:
    """Why DGD has no kernel for this spec, or "" (then: its WY blocks, or plain GD where it has no projector)."""
    mem, bias, ret = spec.memory, spec.bias, spec.retention
    if mem.kind != "linear":
        return (f"no Triton kernel for learner.kind='dgd' on memory.kind={mem.kind!r} (only 'linear'); the chunked "
                "PyTorch path runs it")
    if spec.learner.mlp_form == "none":  # no projector: plain GD
        return ""
    if bias.kind not in ("dot", "l2"):
        return (f"no Triton kernel for learner.kind='dgd' with bias.kind={bias.kind!r} (only 'dot', 'l2': rows "
                "affine in the state); the chunked PyTorch path runs it")
    if ret.kind not in ("none", "decay") or _channel_gate(spec):
        kind = "a channel-wise keep gate" if _channel_gate(spec) else f"retention.kind={ret.kind!r}"
        return (f"no Triton kernel for learner.kind='dgd' with {kind} (only retention none or a scalar / head keep "
                "gate); the chunked PyTorch path runs it")
    if not delta_kernels_on():
        return ("the Triton kernels of DGD (learner.kind='dgd', the delta rule's WY blocks) are off until they pass "
                "their GPU tests (MIRAS_KERNEL_DELTA=1 turns them on); the chunked PyTorch path runs it")
    return ""


def delta_kernels_on() -> bool:
    """Whether the online delta rule takes the kernels (miras/kernels/delta.py): ``MIRAS_KERNEL_DELTA=1``. Off by
    default until its GPU tests have passed on a GPU (they match the float64 oracle in the interpreter), as the MLP
    kernels and their LayerNorm head were before theirs."""
    return env_switch("MIRAS_KERNEL_DELTA", False)


def kernel_chunk(spec) -> tuple[int, str]:
    """The kernels' chunk for this spec and the setting that names it: ``learner.chunk_size``, or for the online
    delta rule the WY block (``MIRAS_KERNEL_DELTA_CHUNK``, miras/kernels/delta.py)."""
    if _delta_rule(spec):
        return delta_chunk(), "MIRAS_KERNEL_DELTA_CHUNK"
    return spec.learner.chunk_size, "learner.chunk_size"


def kernel_support(spec) -> tuple[bool, str]:
    """Whether a Triton kernel exists for this MemorySpec: (True, "") or (False, "<the missing piece>").

    Supported: memory {linear, mlp (depth 2, residual or not, LayerNorm head or not (tiles layout), act
    gelu|silu|tanh|relu)} x bias
    {dot, l2, lp, huber} x retention {none, decay (scalar/head gate, grad_at previous|decayed; a channel gate on the
    linear memory: miras/kernels/linear_channel.py), lq on the linear memory (``_lq_reads``, with
    ``MIRAS_KERNEL_LQ=1``), kl and elastic on the linear memory (``_lag_inputs``, with ``MIRAS_KERNEL_LAG=1``)}
    x learner {gd, momentum},
    chunk_size 1..64 (the online delta rule at chunk 1 with a scalar or head keep gate in WY blocks of
    ``settings.delta_chunk()`` tokens, miras/kernels/delta.py, with ``MIRAS_KERNEL_DELTA=1``), triton >= 3.0.
    DGD on a linear memory: with ``mlp_form: none`` it is GD; with its key projector, a dot or l2 bias and
    retention none or a scalar / head keep gate it runs in the delta rule's WY blocks at its chunk size (with
    ``MIRAS_KERNEL_DELTA=1``).
    The omega bias around any of those inner biases with the gd learner and ``window * chunk_size <= 64`` runs on
    the inner bias' kernels, its window written as sub-tokens (miras/kernels/omega.py). A depth-1 MLP memory with a
    LayerNorm head (TTT-Linear's x + LN(x W) w + b) with dot, l2, lp or huber runs on the linear kernels with their
    LayerNorm-head rows (common.ln_rows), with ``MIRAS_KERNEL_TTT=1``.
    """
    ok, why = triton_status()
    if not ok:
        return False, why
    if spec.bias.kind == "omega":  # the window as sub-tokens of the inner bias' kernels (miras/kernels/omega.py)
        from miras.kernels.omega import omega_inner_spec, omega_support

        why = omega_support(spec, MAX_CHUNK)
        if not why and not env_switch("MIRAS_KERNEL_OMEGA", True):
            why = ("the omega bias' sub-token form on the kernels is turned off (MIRAS_KERNEL_OMEGA=0); the chunked "
                   "PyTorch path runs it")
        return (False, why) if why else kernel_support(omega_inner_spec(spec))
    mem, bias, ret, learner = spec.memory, spec.bias, spec.retention, spec.learner
    if mem.kind not in ("linear", "mlp"):
        return False, f"no Triton kernel for memory.kind={mem.kind!r} yet (only 'linear', 'mlp'); the chunked PyTorch " \
                      "path runs it"
    if mem.kind == "mlp" and mem.depth == 1:  # TTT-Linear's x + LN(x W) w + b: the linear kernels with an LN head
        why = _ttt_gap(spec)
        if why:
            return False, why
    elif mem.kind == "mlp":
        if mem.depth != 2:
            return False, f"no Triton kernel for memory.kind='mlp' with memory.depth={mem.depth} (only 1 and 2); " \
                          "the chunked PyTorch path runs it"
        from miras.kernels.mlp import layout

        if mem.norm and layout() != "tiles":
            return False, "no Triton kernel for memory.kind='mlp' with a LayerNorm head (memory.norm=True) in the " \
                          "walk layout (MIRAS_KERNEL_MLP_LAYOUT=walk); the tiles layout has it"
        if mem.activation not in ("gelu", "silu", "tanh", "relu"):
            return False, f"no Triton kernel for memory.activation={mem.activation!r}; kernels cover gelu, silu, tanh, relu"
        if not env_switch("MIRAS_KERNEL_MLP", True):
            return False, "the Triton kernel for memory.kind='mlp' is turned off (MIRAS_KERNEL_MLP=0); the chunked " \
                          "PyTorch path runs it"
    if bias.kind not in ("dot", "l2", "lp", "huber"):
        return False, f"no Triton kernel for bias.kind={bias.kind!r}; kernels cover dot, l2, lp, huber"
    if ret.kind in ("kl", "elastic"):
        why = _lag_gap(spec)
        if why:
            return False, why
    elif ret.kind not in ("none", "decay", "lq"):
        return False, f"no Triton kernel for retention.kind={ret.kind!r}; kernels cover none, decay, lq, kl, elastic"
    if ret.kind == "lq" and mem.kind != "linear":
        return False, f"no Triton kernel for retention.kind='lq' on memory.kind={mem.kind!r} (only 'linear'); the " \
                      "chunked PyTorch path runs it"
    if ret.kind == "lq" and not env_switch("MIRAS_KERNEL_LQ", False):
        return False, "the Triton kernels of Lq retention (retention.kind='lq', linear memory) are off until they pass " \
                      "their GPU tests (MIRAS_KERNEL_LQ=1 turns them on); the chunked PyTorch path runs it"
    if _channel_gate(spec) and mem.kind != "linear":
        return False, "no Triton kernel for a channel-wise retention gate (retention.gate.granularity='channel') on " \
                      f"memory.kind={mem.kind!r} (only 'linear')"
    if learner.kind == "dgd":
        why = _dgd_gap(spec)
        if why:
            return False, why
    elif learner.kind not in ("gd", "momentum"):
        return False, f"no Triton kernel for learner.kind={learner.kind!r}; kernels cover gd, momentum, dgd"
    if learner.chunk_size > MAX_CHUNK:
        return False, f"learner.chunk_size must be at most {MAX_CHUNK} for the Triton kernels, but got " \
                      f"chunk_size={learner.chunk_size}"
    if _delta_rule(spec) and not delta_kernels_on():
        return False, "the Triton kernels of the online delta rule (learner.chunk_size=1 with l2 bias and gd) are off " \
                      "until they pass their GPU tests (MIRAS_KERNEL_DELTA=1 turns them on); the chunked path solves " \
                      "it exactly in blocks, in parallel over the tokens"
    if mem.kind == "mlp" and mem.norm and not env_switch("MIRAS_KERNEL_MLP_NORM", True):  # (last: the only gap)
        return False, "the Triton kernels of the MLP memory's LayerNorm head (memory.norm=True) are turned off " \
                      "(MIRAS_KERNEL_MLP_NORM=0); the chunked PyTorch path runs it"
    return True, ""


def _lag_gap(spec) -> str:
    """Why a lag-token retention (kl, elastic: the non-linear step at each chunk's first token, Miras Eq. 30) has no
    kernel for this spec, or "" (then: the linear kernels with ``linear.LagScanFunction``)."""
    ret = spec.retention.kind
    if spec.memory.kind != "linear":
        return (f"no Triton kernel for retention.kind={ret!r} on memory.kind={spec.memory.kind!r} (only 'linear'); "
                "the chunked PyTorch path runs it")
    if not env_switch("MIRAS_KERNEL_LAG", False):
        return (f"the Triton kernels of retention.kind={ret!r} (a lag-token retention on the linear memory) are off "
                "until they pass their GPU tests (MIRAS_KERNEL_LAG=1 turns them on); the chunked PyTorch path runs it")
    return ""


def ttt_kernels_on() -> bool:
    """Whether a depth-1 MLP memory with a LayerNorm head (TTT-Linear) takes the linear kernels with their LN head
    (``MIRAS_KERNEL_TTT=1``). Off by default until its GPU tests have passed (it matches the float64 oracle in the
    interpreter), as the MLP kernels and the delta rule's were before theirs."""
    return env_switch("MIRAS_KERNEL_TTT", False)


def _ttt_gap(spec) -> str:
    """Why a depth-1 MLP memory has no kernel, or "" (then it is TTT-Linear's x + LN(x W) w + b, or LN(x W) w + b)."""
    mem, bias = spec.memory, spec.bias
    if not mem.norm:
        return ("no Triton kernel for memory.kind='mlp' with memory.depth=1 and no LayerNorm head (memory.norm=False; "
                "the kernels cover TTT-Linear's x + LN(x W)); the chunked PyTorch path runs it")
    if bias.kind not in ("dot", "l2", "lp", "huber"):
        return (f"no Triton kernel for a depth-1 MLP memory's LayerNorm head with bias.kind={bias.kind!r} (only dot, "
                "l2, lp, huber); the chunked PyTorch path runs it")
    if _channel_gate(spec):
        return ("no Triton kernel for a channel-wise retention gate on memory.kind='mlp' (only 'linear'); the chunked "
                "PyTorch path runs it")
    if not ttt_kernels_on():
        return ("the Triton kernels of a depth-1 MLP memory with a LayerNorm head (TTT-Linear) are off until they pass "
                "their GPU tests (MIRAS_KERNEL_TTT=1 turns them on); the chunked PyTorch path runs it")
    return ""


def _gate(gates: dict, name: str, B: int, T: int, H: int) -> torch.Tensor:
    if name not in gates or gates[name] is None:
        raise ValueError(f"triton_memory_scan: gates[{name!r}] is required by this spec, but got keys={sorted(gates)}")
    g = gates[name]
    if g.dim() == 4 and g.shape[-1] == 1:
        g = g[..., 0]
    if g.dim() != 3 or g.shape[0] != B or g.shape[1] != T or g.shape[2] not in (1, H):
        raise ValueError(f"triton_memory_scan: gates[{name!r}] must have shape [B, T, H] = [{B}, {T}, {H}] "
                         f"(or [B, T, 1]), but got shape={tuple(g.shape)}")
    return g.expand(B, T, H).to(torch.float32).contiguous()


def _channel_gate(spec) -> bool:
    """Whether the spec's keep gate is channel-wise (one per key channel: miras/kernels/linear_channel.py)."""
    return spec.retention.kind == "decay" and spec.retention.gate.granularity == "channel"


def _kernel_gates(spec, gates: dict, B: int, T: int, H: int, K: int) -> tuple[torch.Tensor, ...]:
    """(eta, keep, mu, delta) as contiguous fp32 [B, T, H] (None where the spec has no such gate); a channel-wise
    keep as [B, T, H, K]."""
    from miras.ops_common import required_gates

    eta = _gate(gates, "lr", B, T, H)
    if "keep" not in required_gates(spec):
        keep = None
    elif _channel_gate(spec):
        keep = _channel_keep(gates, B, T, H, K)
    else:
        keep = _gate(gates, "keep", B, T, H)
    mu = _gate(gates, "momentum", B, T, H) if spec.learner.kind == "momentum" else None
    delta = _gate(gates, "huber_delta", B, T, H) if spec.bias.kind == "huber" else None
    return eta, keep, mu, delta


def _channel_keep(gates: dict, B: int, T: int, H: int, K: int) -> torch.Tensor:
    """A channel-wise keep gate as contiguous fp32 [B, T, H, K]."""
    g = gates.get("keep")
    if g is None or g.dim() != 4 or tuple(g.shape) != (B, T, H, K):
        raise ValueError(f"triton_memory_scan: gates['keep'] of a channel-wise retention gate must have shape "
                         f"[B, T, H, K] = [{B}, {T}, {H}, {K}], but got "
                         f"{None if g is None else tuple(g.shape)}")
    return g.to(torch.float32).contiguous()


def _state(state: dict | None, name: str, B: int, H: int, K: int, V: int) -> torch.Tensor | None:
    if state is None or state.get(name) is None:
        return None
    s = state[name]
    if s.dim() == 3:
        s = s.unsqueeze(0)
    if s.dim() != 4 or tuple(s.shape[1:]) != (H, K, V) or s.shape[0] not in (1, B):
        raise ValueError(f"triton_memory_scan: state[{name!r}] must have shape [B, H, K, V] = [{B}, {H}, {K}, {V}] "
                         f"or [H, K, V], but got shape={tuple(s.shape)}")
    return s.expand(B, H, K, V).to(torch.float32).contiguous()


def triton_memory_scan(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor],
                       state: dict[str, torch.Tensor] | None = None, *,
                       params: dict[str, torch.Tensor] | None = None,
                       lag_rows: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The memory scan of ``spec`` over a sequence with the fused Triton kernels (forward and backward).

        W_t = beta_t W_0 + f_t S_0 - sum_{j<=t} G[t, j] k_j^T R_j ,  o_t = q_t W_t      (per chunk, common.py)

    Args:
        spec: a MemorySpec for which ``kernel_support(spec)[0]`` is True.
        q, k: [B, T, H, K]; v: [B, T, H, V]; float32, bfloat16 or float16, on CUDA (or CPU under TRITON_INTERPRET=1).
        gates: "lr" [B, T, H]; "keep" [B, T, H] for decay retention; "momentum" for the momentum learner;
            "huber_delta" for the Huber bias (all already squashed to their ranges).
        state: {"W1": [B, H, K, V] or [H, K, V], "S1": same (momentum)}; None or missing keys mean zeros.
        params: "norm_weight", "norm_bias" [H, V] for an MLP memory with a LayerNorm head (memory.norm; their
            gradients flow); "threshold" [H] for elastic-net retention; unused otherwise (accepted for the
            memory_scan contract).
        lag_rows: the tokens of each chunk's non-linear step under a lag-token retention (kl, elastic): 1, or the
            omega bias' window when its sub-tokens run here (miras/kernels/omega.py).
    Returns:
        o [B, T, H, V] in q's dtype, and the final state {"W1", "S1" (momentum)} as float32 [B, H, K, V].
    Raises:
        KernelUnavailable: unsupported spec, no triton, float64 inputs, CPU tensors without the interpreter, or
            shapes beyond the kernels' limits (``shape_gap``). ValueError: shapes or missing gates.
    """
    ok, why = kernel_support(spec)
    if not ok:
        raise KernelUnavailable(f"triton_memory_scan: {why}")
    from miras.kernels.common import interpreting
    from miras.kernels.linear import LinearConfig

    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"triton_memory_scan: q, k must be [B, T, H, K] and v [B, T, H, V] with matching B, T, H, "
                         f"but got q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise KernelUnavailable(f"triton_memory_scan: inputs must be float32, bfloat16 or float16, but got "
                                f"dtype={q.dtype}; use mode='chunked' for float64")
    if not (q.is_cuda or interpreting()):
        raise KernelUnavailable(f"triton_memory_scan needs a CUDA device (or TRITON_INTERPRET=1 on CPU), but got "
                                f"device={q.device}; use mode='chunked'")
    gap = shape_gap(spec, B, T, H, K, V)
    if gap:
        raise KernelUnavailable(f"triton_memory_scan: {gap}; use mode='chunked' or 'auto'")
    if T == 0:
        raise ValueError(f"triton_memory_scan: the sequence must not be empty, but got T={T}")
    if q.is_cuda:
        _warn_known_bad(q.device)

    if spec.bias.kind == "omega":
        from miras.kernels.omega import omega_scan

        return omega_scan(spec, q, k, v, gates, state, params, triton_memory_scan)
    if spec.memory.kind == "mlp" and spec.memory.depth == 1:
        return _ttt_scan(spec, q, k, v, gates, state, params)
    if spec.memory.kind == "mlp":
        return _mlp_scan(spec, q, k, v, gates, state, params)
    if _delta_rule(spec) or _dgd_blocks(spec):
        from miras.kernels.delta import delta_scan

        eta, keep, _, _ = _kernel_gates(spec, gates, B, T, H, K)
        o, ht = delta_scan(spec, q.contiguous(), k.contiguous(), v.contiguous(), eta, keep,
                           _state(state, "W1", B, H, K, V))
        return o, {"W1": ht}
    eta, keep, mu, delta = _kernel_gates(spec, gates, B, T, H, K)  # (a channel gate's keep: [B, T, H, K])
    choices = LinearConfig.choices(spec)
    cfg = LinearConfig(**{**choices, "lag_rows": lag_rows if choices["lag"] else 1})  # (one compile without a lag)
    return _linear_kernels(cfg, q, k, v, eta, keep, mu, delta, state, params)


def _linear_kernels(cfg, q, k, v, eta, keep, mu, delta, state, params=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One call of the linear kernels (``LinearScanFunction``; with Lq retention ``LqScanFunction`` and its reads
    scaled by ``_lq_reads``; with a lag-token retention ``LagScanFunction``, ``_lag_inputs``) from the scan's initial
    state: (o, {"W1"[, "S1"]})."""
    from miras.kernels.linear import LagScanFunction, LinearScanFunction, LqScanFunction

    B, T, H, K = q.shape
    V = v.shape[-1]
    h0 = _state(state, "W1", B, H, K, V)
    s0 = _state(state, "S1", B, H, K, V) if cfg.momentum else None
    args = (cfg, q.contiguous(), k.contiguous(), v.contiguous(), eta, keep, mu, delta, h0, s0)
    if cfg.lag:
        eta_lin, keep_lin, thr = _lag_inputs(cfg, eta, keep, params, H)
        o, ht = LagScanFunction.apply(cfg, *args[1:4], eta_lin, keep_lin, delta, h0, eta, keep, thr)
        return o, {"W1": ht}
    if cfg.lq:
        o, ht, st, sc = LqScanFunction.apply(*args)
        o = _lq_reads(cfg, o, sc, ht)
    else:
        o, ht, st = LinearScanFunction.apply(*args)
    return o, {"W1": ht, **({"S1": st} if cfg.momentum else {})}


def _lag_inputs(cfg, eta: torch.Tensor, keep: torch.Tensor, params: dict | None, H: int) -> tuple[torch.Tensor, ...]:
    """A lag-token retention's gates for the linear part of each chunk (eta 0 and keep 1 on its first token, or its
    ``cfg.lag_rows`` sub-tokens, whose own step is the non-linear one, Miras Eq. 30) and elastic's per-head threshold
    gamma [H] (KL: a placeholder)."""
    first = (torch.arange(eta.shape[1], device=eta.device) % cfg.chunk < cfg.lag_rows)[None, :, None]
    eta_lin = torch.where(first, 0.0, eta)
    keep_lin = torch.where(first, 1.0, keep)
    from miras.kernels.common import LAG_CODES

    if cfg.lag == LAG_CODES["elastic"]:
        thr = (params or {}).get("threshold")
        if thr is None or thr.numel() != H:
            raise ValueError(f"triton_memory_scan: params['threshold'] must hold one elastic-net threshold per head "
                             f"[{H}], but got {None if thr is None else tuple(thr.shape)}")
        thr = thr.reshape(H).to(torch.float32).contiguous()
    else:
        thr = eta.new_zeros(H)
    return eta_lin, keep_lin, thr


def _lq_reads(cfg, o: torch.Tensor, sc: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    r"""Lq retention's reads (Moneta, Miras Eq. 24-25) from the kernels' o_t = q_t A_t and read scales sc [B, H, NT]:
    the state is the accumulator A, and token t reads s q_t A_t, s = 1 / nu(A) = (sum |A|^q + eps)^(-(q-2)/q) of its
    chunk's start state, but the last token of a full chunk that of the end state (the next chunk's, or the call's
    final one), as the chunked path does (ops_chunked.py)."""
    from miras.components.retention import lq_normalizer
    from miras.kernels.linear import chunk_scales

    T = o.shape[1]
    s_end = 1.0 / lq_normalizer(ht, cfg.lq, cfg.lq_eps)[..., 0, 0]  # [B, H]
    after = torch.cat([sc[..., 1:], s_end[..., None]], -1)  # the scale after each chunk
    last = (torch.arange(T, device=o.device) % cfg.chunk == cfg.chunk - 1)[None, :, None]  # (of full chunks only)
    scale = torch.where(last, chunk_scales(after, cfg.chunk, T), chunk_scales(sc, cfg.chunk, T))  # [B, T, H]
    return (o.float() * scale[..., None]).to(o.dtype)


def _mlp_scan(spec, q, k, v, gates, state, params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The 2-layer MLP memory (miras/kernels/mlp.py): gates and per-layer states checked and laid out here."""
    from miras.components.memory import state_shapes
    from miras.kernels.mlp import mlp_memory_scan

    B, T, H, K = q.shape
    V = v.shape[-1]
    if spec.memory.residual and K != V:
        raise ValueError(f"triton_memory_scan: a residual MLP memory needs K == V, but got K={K}, V={V}")
    layers = {name: _state(state, name, B, H, *shape) for name, shape in state_shapes(spec, K, V).items()}
    head = None
    if spec.memory.norm:
        head = tuple(_head_param(params, name, H, V) for name in ("norm_weight", "norm_bias"))
    return mlp_memory_scan(spec, q, k, v, *_kernel_gates(spec, gates, B, T, H, K), layers, head)


def _ttt_scan(spec, q, k, v, gates, state, params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A depth-1 MLP memory with a LayerNorm head, M(x) = [x +] LN(x W) w + b (TTT-Linear, Sun et al. 2024), on the
    linear kernels: they write with R = J^T R_y (common.ln_rows) at the predictions z = k W, the parts of y that do
    not depend on W (the residual k, the LN bias b) folded into the targets v - k - b here (the dot bias' R_y = -v
    has none), and read o = q W_t raw; the head is applied to it here. Autograd takes the gradients through both."""
    from miras.components.memory import LN_EPS
    from miras.kernels.common import BIAS_CODES, LN_HEAD
    from miras.kernels.linear import LinearConfig

    B, T, H, K = q.shape
    V = v.shape[-1]
    if spec.memory.residual and K != V:
        raise ValueError(f"triton_memory_scan: a residual MLP memory needs K == V, but got K={K}, V={V}")
    w, b = (_head_param(params, name, H, V) for name in ("norm_weight", "norm_bias"))  # (gradients flow)
    target = v.float()
    if spec.bias.kind != "dot":
        target = target - b - (k.float() if spec.memory.residual else 0.0)
    cfg = LinearConfig(**{**LinearConfig.choices(spec), "bias": LN_HEAD + BIAS_CODES[spec.bias.kind]})
    eta, keep, mu, delta = _kernel_gates(spec, gates, B, T, H, K)
    head = w.flatten()  # (in Huber's delta slot; Huber's own deltas after it: common.HUBER_LN, autograd splits them)
    if delta is not None:
        head = torch.cat([head, delta.flatten()])
    z, final = _linear_kernels(cfg, q, k, target, eta, keep, mu, head, state)
    o = torch.nn.functional.layer_norm(z.float(), (V,), eps=LN_EPS) * w + b
    if spec.memory.residual:
        o = o + q.float()
    return o.to(q.dtype), final


def _head_param(params: dict | None, name: str, H: int, V: int) -> torch.Tensor:
    """A LayerNorm-head parameter of an MLP memory with ``norm``: fp32 [H, V]."""
    p = (params or {}).get(name)
    if p is None or tuple(p.shape) != (H, V):
        raise ValueError(f"triton_memory_scan: params[{name!r}] must be [H, V] = [{H}, {V}] for an MLP memory with a "
                         f"LayerNorm head (memory.norm), but got {None if p is None else tuple(p.shape)}")
    return p.to(torch.float32).contiguous()
