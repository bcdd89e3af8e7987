"""Shared test helper: run a model over a sequence in pieces, carrying its recurrent states (decoding / streaming)."""

from __future__ import annotations

import torch


def logits_in_pieces(model, ids: torch.Tensor, sizes: list[int] | tuple[int, ...]) -> torch.Tensor:
    """The model over ``ids`` in consecutive pieces of ``sizes`` tokens (which must cover the sequence), each piece
    starting from the states the previous one returned; the pieces' logits concatenated, to compare with one forward."""
    assert sum(sizes) == ids.shape[1], (sizes, ids.shape)
    states, outs, s = None, [], 0
    for n in sizes:
        logits, states = model(ids[:, s : s + n], states, return_states=True)
        outs.append(logits)
        s += n
    return torch.cat(outs, 1)
