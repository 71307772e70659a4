"""Data order: an endless, resumable stream of index batches."""

from __future__ import annotations

import torch

from .dataset import DataError


class BatchStream:
    """Endless stream of index batches: each epoch a fresh permutation of range(n); a batch may span
    two epochs so every batch has exactly batch_size indices. The permutation of epoch e comes from
    torch.Generator().manual_seed(seed * 1_000_003 + e), so the state is just (epoch, position)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if not 1 <= batch_size <= n:
            raise DataError(f"batch_size={batch_size} must be between 1 and the number of "
                            f"training images ({n}); use a smaller batch or more data")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator)

    def next(self) -> torch.Tensor:
        return self.next_with_epochs()[0]

    def next_with_epochs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch's indices and the epoch each belongs to (a batch may span two)."""
        parts, epochs, need = [], [], self.batch_size
        while need:
            take = min(need, self.n - self._position)
            parts.append(self._perm[self._position : self._position + take])
            epochs.append(torch.full((take,), self._epoch, dtype=torch.int64))
            self._position += take
            need -= take
            if self._position == self.n:
                self._epoch, self._position = self._epoch + 1, 0
                self._perm = self._permutation(self._epoch)
        return torch.cat(parts), torch.cat(epochs)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n:
            raise DataError(f"BatchStream state {state} does not fit n={self.n}; the checkpoint "
                            "belongs to another dataset")
        if epoch != self._epoch:
            self._perm = self._permutation(epoch)
        self._epoch, self._position = epoch, position
