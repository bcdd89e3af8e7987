"""build(spec) -> MirasLM: the only code that reads a whole ModelSpec and connects the modules.

Each block gets the sub-specs and structural sizes it needs (d_model, n_heads, d_head, window, segment length);
:func:`miras.params.count_params` mirrors this file analytically.
"""

from __future__ import annotations

from torch import nn

import miras.components  # noqa: F401  (registers every component)
from miras.components import blocks  # noqa: F401  (registers the block kinds)
from miras.components.attention import Attention
from miras.components.mixer import MemoryMixer
from miras.components.mlp import build_mlp, taper_widths
from miras.model import Layer, MirasLM
from miras.registry import BLOCK
from miras.spec import ModelSpec, load_spec


def build_block(spec: ModelSpec, kind: str) -> nn.Module:
    """The token mixer of one layer of kind ``lmm | mac | mag | mal | attn | swa``."""
    dims = {"d_model": spec.d_model, "n_heads": spec.n_heads, "d_head": spec.d_head}
    cls = BLOCK.get(kind)
    n_p = spec.attention.persistent_tokens
    if kind == "lmm":
        return cls(mixer=_memory_mixer(spec))
    if kind in ("trellis", "msssm"):  # Trellis / MS-SSM blocks (miras/components/trellis.py, msssm.py)
        return cls(mixer=_other_memory(spec, kind))
    if kind == "selfmod":  # self-modifying Titans (hope: miras/components/selfmod.py)
        return cls(spec.memory, spec.selfmod, **dims)
    window = spec.attention.window if kind in ("swa", "mag", "mal") else None
    attention = Attention(spec.attention, window=window, **dims)
    if kind in ("attn", "swa"):
        return cls(attention=attention, d_model=spec.d_model, n_persistent=n_p)
    mixer = _memory_mixer(spec) if spec.hybrid_memory == "lmm" else _other_memory(spec, spec.hybrid_memory)
    if kind == "mac":
        return cls(mixer=mixer, attention=attention, d_model=spec.d_model, n_persistent=n_p,
                   segment_length=spec.mac.segment_length)
    return cls(mixer=mixer, attention=attention, d_model=spec.d_model, n_persistent=n_p)


def _memory_mixer(spec: ModelSpec) -> nn.Module:
    """The memory token mixer: ``MemoryMixer``, or TNT's hierarchical one when ``memory.local`` is set (tnt.py)."""
    dims = {"d_model": spec.d_model, "n_heads": spec.n_heads, "d_head": spec.d_head}
    if spec.memory.local is not None:
        from miras.components.tnt import TNTMixer

        return TNTMixer(spec.memory, **dims)
    return MemoryMixer(spec.memory, **dims)


def _other_memory(spec: ModelSpec, kind: str) -> nn.Module:
    """A Trellis or MS-SSM mixer (a block of its own, or the memory of a mac/mag/mal hybrid via ``hybrid_memory``)."""
    from miras.components.msssm import MSSSMMixer
    from miras.components.trellis import TrellisMixer

    if kind == "trellis":
        return TrellisMixer(spec.trellis, d_model=spec.d_model, n_heads=spec.n_heads, d_head=spec.d_head)
    return MSSSMMixer(spec.msssm, d_model=spec.d_model)


def build(spec: ModelSpec | str) -> MirasLM:
    """Build the model a spec describes (a ModelSpec, a recipe name or a YAML path).

    Raises:
        SpecError: for an invalid spec or a taper that leaves a layer without width.
    """
    if not isinstance(spec, ModelSpec):
        spec = load_spec(spec)
    widths = taper_widths(spec)
    if spec.mlp.kind == "cms":  # Continuum Memory System channel mixer (hope: miras/components/cms.py)
        from miras.components.cms import CMSLayer, build_cms

        layers = [
            CMSLayer(block=build_block(spec, kind), mlp=build_cms(spec, widths[i]), norm=spec.norm, d_model=spec.d_model)
            for i, kind in enumerate(spec.blocks)
        ]
        return _model(spec, layers)
    layers = [
        Layer(
            block=build_block(spec, kind),
            mlp=build_mlp(spec.mlp.kind, d_model=spec.d_model, width=widths[i]),
            norm=spec.norm,
            d_model=spec.d_model,
        )
        for i, kind in enumerate(spec.blocks)
    ]
    return _model(spec, layers)


def _model(spec: ModelSpec, layers: list[Layer]) -> MirasLM:
    return MirasLM(
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        layers=layers,
        norm=spec.norm,
        tie_embeddings=spec.tie_embeddings,
        init_std=spec.init_std,
        max_seq_len=spec.max_seq_len,
    )
