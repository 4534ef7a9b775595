"""Training data: one token stream, packed into fixed windows, in a seeded order, sliced per rank.

Every rank builds the same stream and the same order, so the global batch of step s is a pure function
of (seed, sequences consumed so far): a rank reads its slice of it, and a resumed run on any world size
sees exactly the batches it would have seen. The position is the number of sequences consumed.
"""

from __future__ import annotations

import numpy as np
import torch

from dsv3.tokenizer import token_stream

__all__ = ["PackedSequences", "token_stream"]


class PackedSequences:
    """Non-overlapping windows of `seq_len` tokens; the last `held_out` fraction is kept for evaluation."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, held_out: float, vocab_size: int) -> None:
        self.tokens, self.seq_len, self.seed, self.vocab_size = tokens, seq_len, seed, vocab_size
        windows = len(tokens) // seq_len
        self.num_held_out = int(windows * held_out)
        self.num_train = windows - self.num_held_out
        if self.num_train < 1:
            raise ValueError(f"data: {len(tokens)} tokens make no training sequence of seq_len {seq_len}")
        self._epoch: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(self.num_train, generator=generator))
        return self._epoch[1]

    def _window(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int64))
        if int(window.max()) >= self.vocab_size:
            raise ValueError(
                f"data: token id {int(window.max())} >= the model's vocab_size {self.vocab_size} "
                "(tokenizer and model do not match)"
            )
        return window

    def sequence(self, position: int) -> torch.Tensor:
        """The `position`-th training sequence of the run (epochs follow each other, reshuffled)."""
        epoch, offset = divmod(position, self.num_train)
        return self._window(int(self._order(epoch)[offset]))

    def batch(self, consumed: int, batch: int, rank: int, world: int) -> torch.Tensor:
        """This rank's [batch / world, seq_len] slice of the global batch starting at `consumed`."""
        local = batch // world
        first = consumed + rank * local
        return torch.stack([self.sequence(p) for p in range(first, first + local)])

    def held_out_batch(self, count: int, rank: int, world: int) -> torch.Tensor | None:
        """This rank's slice of the first `count` held-out sequences (None when there are none)."""
        count = min(count, self.num_held_out) // world * world
        if count == 0:
            return None
        local = count // world
        return torch.stack([self._window(self.num_train + rank * local + i) for i in range(local)])
