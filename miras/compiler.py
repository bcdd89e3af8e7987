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
        return cls(mixer=MemoryMixer(spec.memory, **dims))
    window = spec.attention.window if kind in ("swa", "mag", "mal") else None
    attention = Attention(spec.attention, window=window, **dims)
    if kind in ("attn", "swa"):
        return cls(attention=attention, d_model=spec.d_model, n_persistent=n_p)
    mixer = MemoryMixer(spec.memory, **dims)
    if kind == "mac":
        return cls(mixer=mixer, attention=attention, d_model=spec.d_model, n_persistent=n_p,
                   segment_length=spec.mac.segment_length)
    return cls(mixer=mixer, attention=attention, d_model=spec.d_model, n_persistent=n_p)


def build(spec: ModelSpec | str) -> MirasLM:
    """Build the model a spec describes (a ModelSpec, a recipe name or a YAML path).

    Raises:
        SpecError: for an invalid spec or a taper that leaves a layer without width.
    """
    if not isinstance(spec, ModelSpec):
        spec = load_spec(spec)
    widths = taper_widths(spec)
    layers = [
        Layer(
            block=build_block(spec, kind),
            mlp=build_mlp(spec.mlp.kind, d_model=spec.d_model, width=widths[i]),
            norm=spec.norm,
            d_model=spec.d_model,
        )
        for i, kind in enumerate(spec.blocks)
    ]
    return MirasLM(
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        layers=layers,
        norm=spec.norm,
        tie_embeddings=spec.tie_embeddings,
        init_std=spec.init_std,
        max_seq_len=spec.max_seq_len,
    )
