"""Token-by-token decoding with the recurrent state of memory layers and the KV cache of attention layers.

``model(ids, states, return_states=True) -> (logits, states)`` continues a sequence: memory layers carry their
memory (and momentum), attention layers their key/value cache. Prefill feeds the prompt in one call (or one token at
a time), then each new token is one call with ``T = 1``. ``stepwise_logits`` returns the decoded logits of a
sequence so that they can be compared with the full-sequence forward (they must be equal).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def stepwise_logits(model: nn.Module, ids: torch.Tensor, *, prefill: int = 0) -> torch.Tensor:
    """Logits [B, T, V] of ``ids`` [B, T] computed by a prefill of ``prefill`` tokens then one token per call."""
    states, out = None, []
    if prefill:
        logits, states = model(ids[:, :prefill], states, return_states=True)
        out.append(logits)
    for t in range(prefill, ids.shape[1]):
        logits, states = model(ids[:, t: t + 1], states, return_states=True)
        out.append(logits)
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``prompt`` [B, T] by ``max_new_tokens``: greedy at temperature 0, else sampling (optionally top-k).

    Returns the prompt followed by the new tokens, [B, T + max_new_tokens].
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"generate: prompt must be [B, T] with T >= 1, but got shape={tuple(prompt.shape)}")
    logits, states = model(prompt, None, return_states=True)
    out = [prompt]
    for _ in range(max_new_tokens):
        last = logits[:, -1].float()
        if temperature > 0:
            last = last / temperature
            if top_k:
                kth = torch.topk(last, min(top_k, last.shape[-1])).values[:, -1:]
                last = last.masked_fill(last < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=generator)
        else:
            nxt = last.argmax(-1, keepdim=True)
        out.append(nxt)
        logits, states = model(nxt, states, return_states=True)
    return torch.cat(out, dim=1)
