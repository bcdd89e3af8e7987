"""Multi-query associative recall (MQAR), as defined by zoology (Arora et al. 2023, "Zoology", arXiv:2312.04927).

    x = k_1 v_1 k_2 v_2 ... k_n v_n | ... k_i * ... k_j * ...      (n = num_kv_pairs, the context is 2n tokens)

Keys are drawn without replacement from ``[1, V/2)`` and values from ``[V/2, V)`` (disjoint vocabulary halves). Every
key is queried once after the context, at gap positions ``2 g`` drawn without replacement with the power law
``p(g) ~ a g^(a-1)`` (``power_a``), so most queries sit near the context. The label of a query position is its
value; every other label is -100 (loss only at answers). Unused positions hold random tokens (``random_non_queries``).
Accuracy = fraction of answer tokens predicted exactly, reported per number of key-value pairs.

One deliberate difference from zoology (``filler_avoids_keys``, on by default): filler tokens never copy one of the
example's context keys. Zoology draws them from its whole vocabulary (8192 tokens), where a copy is rare (0.4% of queries
at seq 128, 8 pairs); at the small vocabularies that train in minutes on a CPU, a filler copy of a key before its query
(26% of queries at vocab 64, 9% at 256) looks like a new key-value pair, overwrites the association in a recency-biased
memory, and makes the answer ambiguous, capping accuracy below the 90% a correct memory should reach.
"""

from __future__ import annotations

import torch
from pydantic import Field

from miras.tasks.base import IGNORE, Batch, Options, Task, torch_rng


class MQAROptions(Options):
    num_kv_pairs: int | list[int] = 8
    test_kv_pairs: list[int] | None = Field(None, description="kv counts to evaluate; default: the training ones")
    power_a: float = Field(0.01, gt=0, le=1)
    random_non_queries: bool = True
    filler_avoids_keys: bool = Field(True, description="random fillers never copy a context key (zoology: False)")
    vocab_size: int | None = Field(None, ge=4, description="token range used; default: the model's vocab_size")


def mqar_batch(g: torch.Generator, batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
               power_a: float = 0.01, random_non_queries: bool = True,
               filler_avoids_keys: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One MQAR batch ``(input_ids, labels)``, both [B, T]; labels are -100 except at the query positions.

    Fillers are uniform over the vocabulary, or (``filler_avoids_keys``) over the vocabulary minus the row's n keys.
    """
    B, T, n = batch_size, seq_len, num_kv_pairs
    half = vocab_size // 2
    keys = torch.rand(B, half - 1, generator=g).argsort(dim=1)[:, :n] + 1  # [B, n] from [1, V/2)
    values = torch.rand(B, vocab_size - half, generator=g).argsort(dim=1)[:, :n] + half  # [B, n] from [V/2, V)
    ctx = 2 * n
    space = (T - ctx) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(B, space), n, replacement=False, generator=g)  # [B, n]
    seq = torch.zeros(B, T + 1, dtype=torch.long)
    seq[:, 0:ctx:2] = keys
    seq[:, 1:ctx:2] = values
    qpos = ctx + 2 * gaps  # position of each query key
    seq.scatter_(1, qpos, keys)
    labels = torch.full((B, T + 1), IGNORE, dtype=torch.long)
    labels.scatter_(1, qpos + 1, values)
    inputs, labels = seq[:, :T].clone(), labels[:, 1:].clone()
    if random_non_queries:
        if filler_avoids_keys:  # uniform over [0, V) minus the row's keys: shift past each key in ascending order
            noise = torch.randint(vocab_size - n, (B, T), generator=g)
            for key in keys.sort(dim=1).values.unbind(1):  # [B] each
                noise = noise + (noise >= key[:, None]).long()
        else:
            noise = torch.randint(vocab_size, (B, T), generator=g)
        inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, labels


class MQAR(Task):
    name = "mqar"
    Opts = MQAROptions
    default_seq_len = 128
    # zoology's reference sweep trains on (seq, kv) = (64, 4), (128, 8), (256, 16 | 32 | 64)
    DIFFICULTY = [
        {"seq_len": 128, "num_kv_pairs": 8},
        {"seq_len": 64, "num_kv_pairs": 4},
        {"seq_len": 256, "num_kv_pairs": 16},
        {"seq_len": 256, "num_kv_pairs": 32},
        {"seq_len": 256, "num_kv_pairs": 64},
    ]

    def setup(self) -> None:
        o = self.opts
        self.train_kv = [o.num_kv_pairs] if isinstance(o.num_kv_pairs, int) else list(o.num_kv_pairs)
        self.test_kv = list(o.test_kv_pairs or self.train_kv)
        self.vocab = o.vocab_size or self.model_vocab
        for kv in sorted(set(self.train_kv + self.test_kv)):
            if kv < 1 or 4 * kv > self.seq_len:
                raise self.error(
                    f"num_kv_pairs must satisfy 1 <= 4 * num_kv_pairs <= seq_len, but got num_kv_pairs={kv}, "
                    f"seq_len={self.seq_len}. Use a longer --seq-len or fewer pairs."
                )
            if kv > self.vocab // 2 - 1:
                raise self.error(
                    f"num_kv_pairs must be < vocab_size/2 (distinct keys), but got num_kv_pairs={kv}, "
                    f"vocab_size={self.vocab}"
                )

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def _batch(self, g: torch.Generator, batch_size: int, kvs: list[int]) -> Batch:
        # split the batch evenly over the kv counts (deterministic order)
        sizes = [batch_size // len(kvs) + (i < batch_size % len(kvs)) for i in range(len(kvs))]
        parts, groups = [], []
        for kv, size in zip(kvs, sizes):
            if size:
                parts.append(mqar_batch(g, size, self.seq_len, kv, self.vocab, self.opts.power_a,
                                        self.opts.random_non_queries, self.opts.filler_avoids_keys))
                groups += [f"kv={kv}"] * size
        return Batch(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), groups)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        return self._batch(torch_rng(self.seed, self.name, "train", step), batch_size, self.train_kv)

    def eval_batches(self, n_batches: int, batch_size: int) -> list[Batch]:
        # every test kv count gets n_batches batches of its own
        return [self._batch(torch_rng(self.seed, self.name, "test", kv, j), batch_size, [kv])
                for kv in self.test_kv for j in range(n_batches)]
