"""Sleep / knowledge seeding: grow a trained small model into a larger spec, then distil the small model into it.

Scaled-down reading of "Language Models Need Sleep" (Behrouz et al. 2026, arXiv:2606.03979, papers.md §9):

1. **Function-preserving growth** (Net2Net-style; papers.md §9 "parameter expansion", §4.4 "ad-hoc level stacking"):
   every weight of the small model is copied into the leading slice of the large one, and every *new* unit is given a
   zero output so that the grown model computes exactly the small model's function:

       wider channel MLP      new hidden units: random input rows, zero columns of W_2          y = W_2 h unchanged
       more layers            new residual layers appended on top, their output maps zero      x + 0 + 0 = x
                              (W_o of memory/attention, W_2 of the MLP, norm_a of MAG)
       wider memory MLP       new hidden units of W_0: zero columns of W_1, zero rows of W_L;   the inner gradients of
                              those entries stay 0 (act(0) = 0, W_L rows = 0), so the test-time updates never touch them
       more heads (same d)    new heads: random q/k/v/gates/state, zero columns of W_o
       wider CMS level        new hidden units: zero rows of W2 and zero columns of W1 (and W3): the level learns
                              at test time, so the new units must also have zero inner gradients (and leave the
                              weight norms of the CMS trust region unchanged)

   Zeroing both sides of a test-time-learned unit leaves it at a saddle (zero outer gradient too); ``noise`` puts small
   random input weights there instead (exact at insertion, a change of O(noise^2) after test-time updates).
   Anything else that differs (d_model, vocabulary, memory axes, ...) is refused with the list of differing fields.

2. **Knowledge seeding** (Sleep §"Knowledge Seeding", GKD-style on-policy distillation): the small model (teacher)
   is distilled *upwards* into the grown one (student) while the student keeps learning the task:

       L = w_ce CE(student; task labels)
         + w_off E_{x ~ D}           [ 1/T sum_t F_off(p_teacher(.|x_<t) || p_student(.|x_<t)) ]     (off-policy)
         + w_on  E_{x ~ D, y ~ student(.|x)} [ 1/|y| sum_t F_on(p_teacher || p_student)(y_t | x, y_<t) ]   (on-policy)

   Sleep Eq. L_GKD = (1 - lambda) E_D[F] + lambda E_{y ~ LM_exp}[F]; F a token-level divergence (kl, rkl, jsd).
   Samples are drawn without gradient (the paper: "student sampling is not backpropagated through").
   Note: right after exact growth student = teacher, so both divergence terms are 0 with 0 gradient; the task term
   is what moves the student beyond its teacher, the divergence terms keep it close to what the teacher knew.

3. **Consolidation** for CMS channel mixers (Hope; Sleep §Stage 1): for each pair of CMS levels fast -> slow
   (:func:`sleep_pairs`), a new low-rank expert (r hidden units: A = new W1/W3 columns ``[D, r]``, B = new W2 rows
   ``[r, D]``) is activated in the slow level (function-preserving, :func:`add_expert`), the experts earlier sleeps
   added to the fast level are reset (:func:`reset_experts`, "synaptic pruning"), and only the new expert is trained by
   knowledge seeding from the model before the step (Self-KS, :func:`consolidate`; :func:`sleep` runs the schedule).
   Scaled-down reading: the experts are extra hidden units of the level (pre-allocation + masking in weight form),
   not a routed MoE, and the reward term of L_KS (learning to imitate) and Stage 2 (dreaming) are not built.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from miras.errors import MirasError, SpecError
from miras.spec import ModelSpec
from miras.train_spec import TrainSpec

# fields that never change the model's function
_IGNORED = {"name", "description", "budget", "train", "tracking", "max_seq_len"}
# fields growth may change (checked one by one in check_growth)
_GROWABLE = {"n_layers", "n_heads", "head_dim", "layout", "mlp.expansion", "memory.memory.expansion", "mlp.cms.widths"}
# block kinds whose new heads are known to be exact (new heads append to the head axis, W_o columns zeroed)
_HEAD_GROWABLE = {"lmm", "attn", "swa", "mac", "mag", "mal"}
_GROWABLE_PREFIX = ("taper.",)


# -------------------------------------------------------------------------------------------------- growth: checks


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    if not data and prefix:
        out[prefix[:-1]] = {}
    return {k.rstrip("."): v for k, v in out.items()}


def _unused_sections(*specs: ModelSpec) -> set[str]:
    """Sections no layer of ``specs`` reads (their values, e.g. a changed schema default, cannot matter)."""
    blocks = {b for s in specs for b in s.blocks}
    hybrid = blocks & {"mac", "mag", "mal"}
    hybrid_mem = {getattr(s, "hybrid_memory", "lmm") for s in specs} if hybrid else set()
    used = {
        "attention": bool(blocks & {"attn", "swa", "mac", "mag", "mal"}),
        "mac": "mac" in blocks,
        "hybrid_memory": bool(hybrid),
        "memory": bool(blocks & {"lmm", "selfmod"}) or "lmm" in hybrid_mem,
        "selfmod": "selfmod" in blocks,
        "trellis": "trellis" in blocks or "trellis" in hybrid_mem,
        "msssm": "msssm" in blocks or "msssm" in hybrid_mem,
        "mlp.cms": any(s.mlp.kind == "cms" for s in specs),
    }
    return {k for k, v in used.items() if not v}


def memory_hidden(spec: ModelSpec) -> int:
    """Hidden width of the memory MLP of ``spec`` (0 for a linear memory or a model without memory layers)."""
    from miras.components.memory import hidden_width

    if not spec.uses_memory or spec.memory.memory.kind != "mlp" or spec.memory.memory.depth < 2:
        return 0
    return hidden_width(spec.memory, spec.d_head)


def cms_widths(spec: ModelSpec) -> list[list[int]]:
    """Hidden width of every CMS level of every layer (``[]`` per layer when ``mlp.kind`` is not cms)."""
    if spec.mlp.kind != "cms":
        return [[] for _ in range(spec.n_layers)]
    from miras.components.cms import level_widths
    from miras.components.mlp import taper_widths

    return [level_widths(spec.mlp.cms, w) for w in taper_widths(spec)]


def check_growth(small: ModelSpec, big: ModelSpec) -> list[str]:
    """Check that ``big`` is a function-preserving growth of ``small``; return the changes, one line each.

    Raises:
        SpecError: mismatched vocabularies; a field that growth cannot change (all of them listed); a smaller target
            (every shrinking field listed); more heads with a different head width.
    """
    from miras.components.mlp import taper_widths

    if small.vocab_size != big.vocab_size:
        raise SpecError(
            f"grow: vocab_size must be equal in the checkpoint and the target spec (the teacher's tokens are the "
            f"student's), but got checkpoint vocab_size={small.vocab_size}, target vocab_size={big.vocab_size}"
        )
    a = _flatten(small.model_dump(mode="json", exclude=_IGNORED))
    b = _flatten(big.model_dump(mode="json", exclude=_IGNORED))
    skip = tuple(f"{k}." for k in _unused_sections(small, big)) + _GROWABLE_PREFIX
    fixed = sorted(
        k for k in set(a) | set(b)
        if a.get(k, "<absent>") != b.get(k, "<absent>") and k not in _GROWABLE and not f"{k}.".startswith(skip)
    )
    if fixed:
        listing = ", ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in fixed)
        raise SpecError(
            f"grow: the target spec may only add layers, heads (same head width), channel-MLP width or memory-MLP "
            f"width, but got changes to fields growth cannot preserve: {listing}. Keep these fields as in the checkpoint."
        )
    shrinks, changes = [], []
    if big.n_layers < small.n_layers:
        shrinks.append(f"n_layers={big.n_layers} < {small.n_layers}")
    elif big.n_layers > small.n_layers:
        changes.append(f"n_layers {small.n_layers} -> {big.n_layers} (new layers {small.n_layers}..{big.n_layers - 1} "
                       f"of kinds {big.blocks[small.n_layers:]}, zero output maps)")
    n = min(small.n_layers, big.n_layers)
    if big.blocks[:n] != small.blocks[:n]:
        raise SpecError(f"grow: layout must keep the block kind of every existing layer, but got checkpoint blocks="
                        f"{small.blocks}, target blocks={big.blocks[:n]} for the first {n} layers")
    if big.n_heads < small.n_heads:
        shrinks.append(f"n_heads={big.n_heads} < {small.n_heads}")
    if big.d_head != small.d_head:
        raise SpecError(
            f"grow: the head width must stay the same (more heads are exact only with the same head_dim), but got "
            f"d_head={small.d_head} -> {big.d_head} (n_heads {small.n_heads} -> {big.n_heads}, head_dim "
            f"{small.head_dim} -> {big.head_dim}). Set head_dim: {small.d_head} in the target spec."
        )
    if big.n_heads > small.n_heads:
        odd = sorted(set(big.blocks) - _HEAD_GROWABLE)
        if odd or getattr(big.memory, "local", None) is not None or getattr(big, "hybrid_memory", "lmm") != "lmm":
            raise SpecError(
                f"grow: n_heads: more heads are exact only for the blocks {sorted(_HEAD_GROWABLE)} with the plain memory "
                f"mixer, but got n_heads {small.n_heads} -> {big.n_heads} with blocks {odd or big.blocks} "
                f"(memory.local / hybrid_memory set?). Keep n_heads={small.n_heads}."
            )
        changes.append(f"n_heads {small.n_heads} -> {big.n_heads} (new heads with zero output columns)")
    ws, wb = taper_widths(small), taper_widths(big)
    narrower = [f"layer {i}: {wb[i]} < {ws[i]}" for i in range(n) if wb[i] < ws[i]]
    if narrower:
        shrinks.append(f"channel-MLP widths ({'; '.join(narrower)})")
    elif wb[:n] != ws[:n]:
        changes.append(f"channel-MLP widths {ws} -> {wb[:n]} (+ new layers {wb[n:]})")
    cs, cb = cms_widths(small), cms_widths(big)
    narrower = [f"layer {i} level {j}: {b} < {a}" for i in range(n) for j, (a, b) in enumerate(zip(cs[i], cb[i])) if b < a]
    if narrower:
        shrinks.append(f"CMS level widths ({'; '.join(narrower)})")
    elif cb[:n] != cs[:n]:
        changes.append(f"CMS level widths {cs} -> {cb[:n]} (new units: zero W_2 rows, zero input columns)")
    hs, hb = memory_hidden(small), memory_hidden(big)
    if hb < hs:
        shrinks.append(f"memory MLP hidden width={hb} < {hs} (memory.memory.expansion)")
    elif hb > hs:
        odd = sorted(set(big.blocks) - _HEAD_GROWABLE)
        if odd or getattr(big.memory, "local", None) is not None:
            raise SpecError(
                f"grow: memory.memory.expansion: a wider memory MLP is exact only for the blocks lmm, mac, mag, mal with "
                f"the plain memory mixer, but got blocks {odd or big.blocks} (or memory.local set). Keep "
                f"memory.memory.expansion={small.memory.memory.expansion}."
            )
        if small.memory.retention.kind == "kl":
            raise SpecError(
                f"grow: memory.memory.expansion: a wider memory MLP is not function-preserving under KL retention "
                f"(the softmax over a layer's outputs changes), but got hidden width {hs} -> {hb} with retention.kind='kl'"
            )
        changes.append(f"memory MLP hidden {hs} -> {hb} (zero new rows/columns)")
    if shrinks:
        raise SpecError(f"grow: the target spec must not be smaller than the checkpoint's, but got {', '.join(shrinks)}. "
                        f"Growing goes from a small trained model to a larger one.")
    return changes


# ------------------------------------------------------------------------------------------------ growth: weights


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def _cms_gate(spec: ModelSpec) -> str:
    """The CMS weight whose zero columns switch new hidden units off: ``h = silu(x W1) * (x W3)`` -> W3; gelu -> W1."""
    return "W3" if spec.mlp.cms.block == "swiglu" else "W1"


def _is_cms(name: str, what: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 6 and parts[2:4] == ["mlp", "levels"] and parts[-1] == what


def _zero_new(name: str, t: Tensor, old: tuple[int, ...], hid_old: int, depth: int, gate: str) -> None:
    """Zero the *new* entries of an output-side tensor that grew from shape ``old`` (in place).

    CMS levels learn at test time, so a new unit needs a zero output row (W2) *and* zero input columns (W1, W3): then
    its inner gradients are 0, every test-time update leaves it at 0, and the Frobenius norms the CMS trust region
    (``cms.max_update``) rescales updates by are unchanged.
    """
    if name.endswith(("mlp.w2.weight", "w_o.weight")):  # [D, width | inner]: new input columns
        t[:, old[1]:] = 0
    elif _is_cms(name, "W2"):  # [w, D]
        t[old[0]:, :] = 0
    elif _is_cms(name, "W1") or _is_cms(name, "W3"):  # [D, w]
        t[:, old[1]:] = 0
    elif ".init_state.W" in name and hid_old:  # memory MLP state [H, in, out]
        i = int(name.rsplit(".W", 1)[1])
        if i > 1:  # rows fed by new hidden units
            t[:, hid_old:, :] = 0
        if i < depth:  # columns producing new hidden units
            t[:, :, hid_old:] = 0


def _zero_all(name: str, t: Tensor, gate: str) -> None:
    """Zero the output maps of a newly added layer so that its residual branches add 0."""
    if name.endswith(("mlp.w2.weight", "w_o.weight", "w_out.weight", "block.norm_a.weight")):
        t.zero_()
    elif _is_cms(name, "W2") or _is_cms(name, gate):
        t.zero_()


@torch.no_grad()
def grow_model(small: nn.Module, small_spec: ModelSpec, big_spec: ModelSpec, *, seed: int = 0, noise: float = 0.0,
               verify: bool = True) -> tuple[nn.Module, list[str]]:
    """Build ``big_spec`` and embed the trained ``small`` model into it so that the logits are unchanged.

    ``seed`` fixes the random init of the new units; ``noise`` > 0 draws the zeroed input weights of new test-time-
    learned units (memory-MLP hidden units, CMS units) from N(0, noise^2) instead: exact growth leaves them at a saddle
    with zero gradient, noise breaks it at a cost of O(noise^2) after the first test-time update. ``verify`` runs both
    models on random ids and raises when the logits differ (a block kind whose output maps this function does not know).

    Returns:
        (the grown model in eval mode, the list of changes).
    Raises:
        SpecError: see :func:`check_growth`; MirasError: when verification fails.
    """
    from miras.compiler import build

    changes = check_growth(small_spec, big_spec)
    torch.manual_seed(seed)
    big = build(big_spec)
    src, dst = small.state_dict(), big.state_dict()
    hid_old = memory_hidden(small_spec)
    depth = small_spec.memory.memory.depth if hid_old else 1
    gate = _cms_gate(big_spec) if big_spec.mlp.kind == "cms" else ""
    out: dict[str, Tensor] = {}
    for name, fresh in dst.items():
        t = fresh.clone()
        layer = _layer_of(name)
        if name in src:
            s = src[name]
            if s.dim() != t.dim() or any(a > b for a, b in zip(s.shape, t.shape)):
                raise MirasError(f"grow: parameter {name} cannot grow from shape {tuple(s.shape)} to {tuple(t.shape)}")
            if s.shape != t.shape:
                _zero_new(name, t, tuple(s.shape), hid_old, depth, gate)
                if noise and ".init_state.W1" in name and hid_old:
                    t[:, :, hid_old:] = noise * torch.randn_like(t[:, :, hid_old:])
                if noise and (_is_cms(name, "W1") or _is_cms(name, "W3")):
                    t[:, s.shape[1]:] = noise * torch.randn_like(t[:, s.shape[1]:])
            t[tuple(slice(0, n) for n in s.shape)] = s.to(t.dtype)
        elif layer is not None and layer >= small_spec.n_layers:
            _zero_all(name, t, gate)
            if noise and gate and _is_cms(name, gate):
                t.normal_(0.0, noise)
        else:
            raise MirasError(f"grow: parameter {name} of the target model has no counterpart in the checkpoint")
        out[name] = t
    big.load_state_dict(out)
    big.eval()
    if verify:
        diff = logit_difference(small, big, vocab_size=small_spec.vocab_size,
                                seq_len=min(32, small_spec.max_seq_len, big_spec.max_seq_len))
        if not diff <= 1e-4 * (1 + noise * 1e4):
            raise MirasError(f"grow: the grown model must compute the small model's function, but got max |logit "
                             f"difference|={diff:.3g} (changes: {'; '.join(changes) or 'none'}). This block kind has "
                             f"output maps grow_model does not know; report it.")
    return big, changes


@torch.no_grad()
def logit_difference(a: nn.Module, b: nn.Module, *, vocab_size: int, seq_len: int = 32, batch: int = 2,
                     seed: int = 0) -> float:
    """max |logits_a - logits_b| on random token ids (a quick check of function preservation)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    dev_a, dev_b = next(a.parameters()).device, next(b.parameters()).device
    return (a(ids.to(dev_a)).float().cpu() - b(ids.to(dev_b)).float().cpu()).abs().max().item()


# ------------------------------------------------------------------------------------------------ distillation


Divergence = Literal["kl", "rkl", "jsd"]


class SeedSpec(BaseModel):
    """Knowledge-seeding weights: ``L = ce_weight CE + off_policy_weight F_off + on_policy_weight F_on``.

    ``off_policy``: F on the task's sequences; ``on_policy``: F on ``sample_tokens`` continuations sampled from the
    student (at ``temperature``) after the first ``seq_len - sample_tokens`` tokens of each task sequence.
    ``kl`` = KL(teacher || student), ``rkl`` = KL(student || teacher), ``jsd`` = Jensen-Shannon (beta 1/2).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ce_weight: float = Field(1.0, ge=0)
    off_policy_weight: float = Field(1.0, ge=0)
    on_policy_weight: float = Field(0.5, ge=0)
    off_policy_divergence: Divergence = "kl"
    on_policy_divergence: Divergence = "rkl"
    sample_tokens: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)


def token_divergence(teacher_logits: Tensor, student_logits: Tensor, kind: Divergence = "kl") -> Tensor:
    """Per-position divergence ``[...]`` between the next-token distributions ``[..., V]`` (float32).

        kl   sum_v p_T (log p_T - log p_S)        rkl  sum_v p_S (log p_S - log p_T)
        jsd  (KL(p_T || m) + KL(p_S || m)) / 2,   m = (p_T + p_S) / 2      (GKD, Agarwal et al. 2024, Eq. 1-2)
    """
    lt = F.log_softmax(teacher_logits.float(), -1)
    ls = F.log_softmax(student_logits.float(), -1)
    if kind == "kl":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "rkl":
        return (ls.exp() * (ls - lt)).sum(-1)
    if kind == "jsd":
        lm = torch.logsumexp(torch.stack([lt, ls]), 0) - math.log(2.0)
        return 0.5 * ((lt.exp() * (lt - lm)).sum(-1) + (ls.exp() * (ls - lm)).sum(-1))
    raise SpecError(f"seed: divergence must be one of kl, rkl, jsd, but got kind={kind!r}")


def seeding_loss(teacher: nn.Module, student: nn.Module, input_ids: Tensor, labels: Tensor, cfg: SeedSpec, *,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """The knowledge-seeding loss of one batch (see the module docstring) and its parts as floats."""
    from miras.generate import generate
    from miras.tasks import IGNORE

    parts: dict[str, Tensor] = {}
    logits = student(input_ids)  # [B, T, V]
    if cfg.ce_weight:
        parts["ce"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)
    if cfg.off_policy_weight:
        with torch.no_grad():
            t_logits = teacher(input_ids)
        parts["off_policy"] = token_divergence(t_logits, logits, cfg.off_policy_divergence).mean()
    if cfg.on_policy_weight:
        T = input_ids.shape[1]
        n = min(cfg.sample_tokens, T - 1)
        was = student.training
        student.eval()
        ids = generate(student, input_ids[:, : T - n], n, temperature=cfg.temperature, generator=generator)  # [B, T]
        student.train(was)
        with torch.no_grad():
            t_on = teacher(ids)[:, T - n - 1 : T - 1]  # distributions of the n sampled tokens
        s_on = student(ids)[:, T - n - 1 : T - 1]
        parts["on_policy"] = token_divergence(t_on, s_on, cfg.on_policy_divergence).mean()
    weights = {"ce": cfg.ce_weight, "off_policy": cfg.off_policy_weight, "on_policy": cfg.on_policy_weight}
    loss = sum(weights[k] * v for k, v in parts.items())
    return loss, {k: v.item() for k, v in parts.items()}


def knowledge_seed(teacher: nn.Module, student: nn.Module, spec: ModelSpec, cfg: TrainSpec, seed_cfg: SeedSpec, *,
                   run_dir: Path, info: dict[str, Any] | None = None, progress: bool = False,
                   trainable: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` (``spec``) on ``cfg.task`` with AdamW, warm-up + cosine (as miras.train).

    Evaluates before the first step (step 0: the grown model) and every ``eval_every`` steps; writes
    ``run_dir/record.json`` (the keys of a training record plus ``sleep``: teacher metrics, seeding weights and
    ``info``) and ``run_dir/checkpoint`` (weights-only; ``miras eval`` reads it). ``trainable``: parameter name ->
    0/1 mask of the entries to train (everything else frozen, no weight decay; Self-KS trains only the new expert).
    """
    from miras.checkpoint import CHECKPOINT_DIR, save_checkpoint, write_json_atomic
    from miras.tasks import make_task
    from miras.train import (
        check_writable,
        environment,
        evaluate,
        lr_at,
        param_counts,
        peak_memory,
        resolve_device,
        resolve_train_spec,
    )

    run_dir = Path(run_dir)
    cfg = resolve_train_spec(cfg)
    device = resolve_device(cfg)
    if cfg.precision not in ("auto", "fp32"):
        raise SpecError(f"seed: precision must be fp32 or auto (fp32 on CPU) for knowledge seeding, but got "
                        f"precision={cfg.precision!r}")
    task = make_task(cfg.task, vocab_size=spec.vocab_size, seq_len=cfg.seq_len, seed=cfg.seed)
    if task.seq_len > spec.max_seq_len:
        raise SpecError(f"train.seq_len: the task's sequences must fit the model, but got seq_len={task.seq_len} > "
                        f"max_seq_len={spec.max_seq_len}")
    check_writable(run_dir)
    teacher, student = teacher.to(device).eval(), student.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    eval_set = task.eval_batches(cfg.eval_batches, cfg.batch_size)
    teacher_metrics = evaluate(teacher, task, eval_set, device=device)
    history = [{"step": 0, **evaluate(student, task, eval_set, device=device)}]
    hooks = []
    if trainable is None:
        decay = [p for p in student.parameters() if p.dim() >= 2]
        no_decay = [p for p in student.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        named = dict(student.named_parameters())
        unknown = sorted(set(trainable) - set(named))
        if unknown:
            raise MirasError(f"seed: trainable names must be parameters of the student, but got {unknown[:3]}")
        for name, p in named.items():
            p.requires_grad_(name in trainable)
        for name, mask in trainable.items():
            m = mask.to(device=device, dtype=named[name].dtype)
            hooks.append(named[name].register_hook(lambda g, m=m: g * m))
        groups = [{"params": [named[n] for n in trainable], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    n_params, n_non_emb = param_counts(student)
    record: dict[str, Any] = {
        "name": run_dir.name, "status": "running", "error": None, "spec": spec.model_dump(mode="json"),
        "spec_hash": spec.spec_hash(), "train": cfg.model_dump(mode="json"), "task": task.describe(),
        "params": n_params, "params_non_embedding": n_non_emb, "state_bytes": None, "metrics": history, "final": {},
        "tokens_per_s": None, "peak_mem_bytes": None, "wall_s": None, **environment(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sleep": {"teacher": teacher_metrics, "grown": dict(history[0]), "seed": seed_cfg.model_dump(), **(info or {})},
    }
    try:
        from miras.params import state_size_bytes

        record["state_bytes"] = int(state_size_bytes(spec, task.seq_len))
    except Exception:  # the params helper may not know every block kind yet
        pass
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    t_wall, t_train, tokens, status, error = time.perf_counter(), 0.0, 0, "completed", None
    sums: dict[str, float] = {}
    try:
        student.train()
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = task.train_batch(step, cfg.batch_size)
            loss, parts = seeding_loss(teacher, student, batch.input_ids.to(device), batch.labels.to(device), seed_cfg,
                                       generator=gen)
            if not torch.isfinite(loss):
                raise MirasError(f"step {step}: the seeding loss is {loss.item()} (NaN/inf); lower --lr")
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["n"] = sums.get("n", 0.0) + 1
            tokens += cfg.batch_size * task.seq_len
            t_train += time.perf_counter() - t0
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                n = sums.pop("n")
                m = {"step": done, **{f"train_{k}" if k != "loss" else k: v / n for k, v in sums.items()},
                     "lr": lr_at(step, cfg), **evaluate(student, task, eval_set, device=device)}
                sums = {}
                history.append(m)
                if progress:
                    print(f"seed step {done}/{cfg.steps}: loss {m['loss']:.4f} val_loss {m['val_loss']:.4f}", flush=True)
    except (MirasError, KeyboardInterrupt) as err:
        status, error = "failed", f"{type(err).__name__}: {err}"
    for h in hooks:
        h.remove()
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    last = history[-1]
    final = {k: v for k, v in last.items() if k not in ("lr",)}
    record.update(status=status, error=error, final=final, wall_s=round(time.perf_counter() - t_wall, 3),
                  tokens_per_s=tokens / max(t_train, 1e-9) if tokens else None, peak_mem_bytes=peak_memory(device))
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"step": last["step"], "train": record["train"], "task": record["task"], "metrics": history,
            "sleep": record["sleep"]}
    save_checkpoint(run_dir / CHECKPOINT_DIR, model=student, spec=spec, meta=meta)
    write_json_atomic(run_dir / "record.json", record)
    return record


def grow_and_seed(ckpt: str | Path, big_spec: ModelSpec, cfg: TrainSpec | None = None, seed_cfg: SeedSpec | None = None,
                  *, run_dir: Path, noise: float = 0.0, progress: bool = False) -> dict[str, Any]:
    """``miras grow``: load the checkpoint (teacher), grow it to ``big_spec``, seed it; returns the run record.

    ``cfg`` defaults to the checkpoint's training settings (task, batch, length, lr, steps; early stop dropped).
    """
    from miras.checkpoint import find_checkpoint, load_checkpoint

    teacher, small_spec, meta = load_checkpoint(ckpt)
    if cfg is None:
        cfg = teacher_train_spec(meta)
    student, changes = grow_model(teacher, small_spec, big_spec, seed=cfg.seed, noise=noise)
    info = {"checkpoint": str(find_checkpoint(ckpt)), "teacher_spec_hash": small_spec.spec_hash(),
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "growth": changes, "noise": noise}
    return knowledge_seed(teacher, student, big_spec, cfg, seed_cfg or SeedSpec(), run_dir=run_dir, info=info,
                          progress=progress)


def teacher_train_spec(meta: dict[str, Any]) -> TrainSpec:
    """The checkpoint's resolved training settings as a TrainSpec (early stop dropped: seeding runs its steps)."""
    data = dict(meta.get("train") or {})
    if not data:
        raise MirasError("grow: the checkpoint has no training settings (meta.json 'train'); pass --task and --steps")
    data["early_stop"] = None
    return TrainSpec.model_validate(data)


# ------------------------------------------------------------------------------------------------ consolidation


def sleep_pairs(spec: ModelSpec) -> list[tuple[int, int]]:
    """The consolidation schedule of a CMS model: consecutive levels ordered fast -> slow (period null/0 = slowest).

    Sleep §Stage 1: block l*-1 is consolidated into block l*, for every level in turn (many-to-one).

    Raises:
        SpecError: when ``mlp.kind`` is not cms or there is a single level.
    """
    if spec.mlp.kind != "cms" or len(spec.mlp.cms.periods) < 2:
        raise SpecError(f"sleep: consolidation moves knowledge between CMS levels, so mlp.kind must be cms with at least "
                        f"2 levels, but got mlp.kind={spec.mlp.kind!r}"
                        + (f", periods={spec.mlp.cms.periods}" if spec.mlp.kind == "cms" else ""))
    periods = spec.mlp.cms.periods
    order = sorted(range(len(periods)), key=lambda i: (not periods[i], periods[i] or 0, i))
    return list(zip(order, order[1:]))


def add_expert(model: nn.Module, spec: ModelSpec, level: int, rank: int, *, seed: int = 0,
               noise: float = 1e-3) -> tuple[nn.Module, ModelSpec, list[int]]:
    """Activate a new low-rank expert in CMS ``level`` of every layer: ``rank`` new hidden units (A = the new columns
    of W1 and W3 ``[D, r]``, B = the new rows of W2 ``[r, D]``; Sleep §Stage 1 "parameter expansion").

    Function-preserving at insertion (B = 0 and a zero/``noise`` gate column, see :func:`grow_model`). Returns the new
    model, its spec (``mlp.cms.widths`` raised) and the first new unit of every layer.
    """
    from miras.components.mlp import base_width

    if rank < 1:
        raise SpecError(f"sleep: rank must be >= 1, but got rank={rank}")
    cms = spec.mlp.cms
    mult = list(cms.widths) if cms.widths is not None else [1.0] * len(cms.periods)
    mult[level] = mult[level] + rank / base_width(spec)
    big_spec = spec.with_overrides({"mlp.cms.widths": mult})
    starts = [w[level] for w in cms_widths(spec)]
    grown, _ = grow_model(model, spec, big_spec, seed=seed, noise=noise)
    return grown, big_spec, starts


def expert_masks(model: nn.Module, spec: ModelSpec, level: int, starts: list[int]) -> dict[str, Tensor]:
    """0/1 masks selecting the units ``starts[i]:`` of CMS ``level`` in every layer i (for :func:`knowledge_seed`)."""
    params = dict(model.named_parameters())
    masks = {}
    for i, a in enumerate(starts):
        for w in ("W1", "W3", "W2"):
            name = f"layers.{i}.mlp.levels.{level}.{w}"
            if name not in params:
                continue
            m = torch.zeros_like(params[name])
            if w == "W2":
                m[a:, :] = 1
            else:
                m[:, a:] = 1
            masks[name] = m
    return masks


@torch.no_grad()
def reset_experts(model: nn.Module, spec: ModelSpec, level: int, starts: list[int]) -> None:
    """Reset (mask) the units ``starts[i]:`` of CMS ``level`` ("synaptic pruning"): zero W2 rows and W1/W3 columns,
    which gives exactly the model without them (see :func:`_zero_new`)."""
    params = dict(model.named_parameters())
    for i, a in enumerate(starts):
        for w in ("W1", "W3", "W2"):
            p = params.get(f"layers.{i}.mlp.levels.{level}.{w}")
            if p is None:
                continue
            if w == "W2":
                p[a:, :] = 0  # [w, D]
            else:
                p[:, a:] = 0  # [D, w]


def consolidate(model: nn.Module, spec: ModelSpec, cfg: TrainSpec, seed_cfg: SeedSpec, *, fast: int, slow: int,
                rank: int, experts: dict[int, list[int]], run_dir: Path, noise: float = 1e-3,
                progress: bool = False) -> tuple[nn.Module, ModelSpec, dict[str, Any], dict[int, list[int]]]:
    """One consolidation step fast -> slow (Sleep §Stage 1, Self-KS):

    1. teacher = the model before expansion (frozen copy);
    2. student = the model with a new low-rank expert in level ``slow`` (function-preserving insertion), and with the
       experts earlier sleeps added to level ``fast`` reset (so what they held must move into the new expert);
    3. knowledge seeding from teacher into student, only the new expert trainable;
    ``experts``: level -> first added unit per layer (from earlier sleeps). Returns (student, its spec, the record,
    the updated experts map).
    """
    import copy

    teacher = copy.deepcopy(model).eval()
    student, big_spec, starts = add_expert(model, spec, slow, rank, seed=cfg.seed, noise=noise)
    inserted = logit_difference(teacher, student, vocab_size=spec.vocab_size, seq_len=min(32, spec.max_seq_len))
    experts = {k: list(v) for k, v in experts.items()}
    reset = experts.pop(fast, None)
    if reset is not None:
        reset_experts(student, big_spec, fast, reset)
    experts.setdefault(slow, starts)
    info = {"stage": f"level {fast} -> level {slow}", "rank": rank, "insertion_max_logit_diff": inserted,
            "reset_fast_experts": reset, "experts": {str(k): v for k, v in experts.items()}, "noise": noise}
    record = knowledge_seed(teacher, student, big_spec, cfg, seed_cfg, run_dir=run_dir, info=info, progress=progress,
                            trainable=expert_masks(student, big_spec, slow, starts))
    return student, big_spec, record, experts


def sleep(ckpt: str | Path, cfg: TrainSpec | None = None, seed_cfg: SeedSpec | None = None, *, rank: int = 4,
          run_dir: Path, noise: float = 1e-3, progress: bool = False) -> dict[str, Any]:
    """``miras sleep``: run the whole consolidation schedule (:func:`sleep_pairs`) on a CMS checkpoint.

    Stage k writes ``run_dir/stage-k/`` (record + checkpoint); ``run_dir/record.json`` is the last stage's record
    with ``sleep.stages`` (teacher / after insertion and reset / after seeding validation metrics of every stage) and
    ``run_dir/checkpoint`` the final model (its meta keeps the experts map for the next sleep).
    """
    from miras.checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint, write_json_atomic

    model, spec, meta = load_checkpoint(ckpt)
    pairs = sleep_pairs(spec)
    cfg = cfg or teacher_train_spec(meta)
    seed_cfg = seed_cfg or SeedSpec()
    experts = {int(k): v for k, v in ((meta.get("sleep") or {}).get("experts") or {}).items()}
    run_dir = Path(run_dir)
    stages, record = [], {}
    for k, (fast, slow) in enumerate(pairs):
        model, spec, record, experts = consolidate(model, spec, cfg, seed_cfg, fast=fast, slow=slow, rank=rank,
                                                   experts=experts, run_dir=run_dir / f"stage-{k}", noise=noise,
                                                   progress=progress)
        s = record["sleep"]
        stages.append({"stage": s["stage"], "teacher": s["teacher"], "after_insertion_and_reset": s["grown"],
                       "after_seeding": record["final"], "insertion_max_logit_diff": s["insertion_max_logit_diff"]})
    record["sleep"]["stages"] = stages
    record["name"] = run_dir.name
    save_checkpoint(run_dir / CHECKPOINT_DIR, model=model, spec=spec,
                    meta={"step": record["final"].get("step", 0), "train": record["train"], "task": record["task"],
                          "metrics": record["metrics"], "sleep": record["sleep"]})
    write_json_atomic(run_dir / "record.json", record)
    return record
