"""MirasLM: embedding -> L pre-norm residual layers -> final norm -> LM head (nanoGPT-sized backbone).

    x_{l+1/2} = x_l + block_l(norm(x_l))          token mixer: lmm | mac | mag | mal | attn | swa
    x_{l+1}   = x_{l+1/2} + mlp_l(norm(x_{l+1/2}))  channel mixer (SwiGLU / GELU, tapered widths); skipped for none

Built by :func:`miras.compiler.build`; the modules are passed in, nothing here reads a spec.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from miras.errors import MirasError


def make_norm(kind: str, d_model: int) -> nn.Module:
    """``rmsnorm`` (weight only) or ``layernorm`` (weight and bias)."""
    return nn.RMSNorm(d_model, eps=1e-6) if kind == "rmsnorm" else nn.LayerNorm(d_model, eps=1e-5)


class Layer(nn.Module):
    """One residual layer: ``x + block(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, *, block: nn.Module, mlp: nn.Module | None, norm: str, d_model: int) -> None:
        super().__init__()
        self.norm1, self.block = make_norm(norm, d_model), block
        self.norm2 = make_norm(norm, d_model) if mlp is not None else None
        self.mlp = mlp

    def forward(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        y, state = self.block(self.norm1(x), state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state


class MirasLM(nn.Module):
    """A causal language model over token ids.

    ``forward(ids [B, T]) -> logits [B, T, vocab]``; ``forward(ids, states, return_states=True) -> (logits, states)``
    continues a sequence (states: one entry per layer, as returned by the previous call; None starts a new one).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        layers: list[Layer],
        norm: str,
        tie_embeddings: bool,
        init_std: float,
        max_seq_len: int,
    ) -> None:
        super().__init__()
        self.vocab_size, self.d_model, self.max_seq_len = vocab_size, d_model, max_seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(layers)
        self.norm = make_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(init_std)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self, std: float) -> None:
        """N(0, std) for every linear map, the embedding and the persistent tokens; gate biases, memory initial
        states and norms keep the values their modules set."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            persistent = getattr(module, "persistent", None)
            if isinstance(persistent, nn.Parameter):
                nn.init.normal_(persistent, mean=0.0, std=std)

    def forward(
        self, input_ids: Tensor, states: list | None = None, return_states: bool = False
    ) -> Tensor | tuple[Tensor, list]:
        if input_ids.dim() != 2:
            raise MirasError(f"MirasLM.forward: input_ids must be [B, T], but got shape={tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T == 0:
            raise MirasError("MirasLM.forward: input_ids must hold at least one token, but got T=0")
        if states is None and T > self.max_seq_len:
            raise MirasError(
                f"MirasLM.forward: the sequence length must be <= max_seq_len, but got T={T}, "
                f"max_seq_len={self.max_seq_len}. Raise max_seq_len in the spec."
            )
        if states is not None and len(states) != len(self.layers):
            raise MirasError(
                f"MirasLM.forward: states must have one entry per layer ({len(self.layers)}), but got {len(states)}"
            )
        x = self.embed(input_ids)  # [B, T, D]
        new_states = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, None if states is None else states[i])
            new_states.append(s)
        logits = self.head(self.norm(x)).float()  # [B, T, vocab]
        return (logits, new_states) if return_states else logits

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0) -> Tensor:
        """Greedy (temperature 0) or sampled continuation of ``prompt [B, T]`` using the recurrent states."""
        logits, states = self(prompt, return_states=True)
        out = [prompt]
        for _ in range(max_new_tokens):
            last = logits[:, -1]
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1)
            else:
                nxt = last.argmax(-1, keepdim=True)
            out.append(nxt)
            logits, states = self(nxt, states, return_states=True)
        return torch.cat(out, 1)
