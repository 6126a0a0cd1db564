"""Deterministic, resumable batching of dataset indices.

Epoch ``e`` visits the rows in the order ``permutation(n)`` drawn from a generator
seeded with ``(seed, e)``, so an order depends only on the seed and the epoch number,
never on global random state or on how many batches were taken before. The state is
``(epoch, position, seed)``: restoring it continues with exactly the batches an
uninterrupted run would have produced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from flowrl.batch import Batch


class Collatable(Protocol):
    def __len__(self) -> int: ...

    def collate(self, indices: Sequence[int]) -> Batch: ...


class PromptSampler:
    """Yields lists of ``batch_size`` row indices, epoch after epoch.

    With ``drop_last`` an epoch's tail that does not fill a batch is skipped; without
    it the last batch of an epoch is shorter. ``num_epochs=None`` never stops.
    """

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"PromptSampler: batch_size={batch_size} must be positive")
        if n_rows < (batch_size if drop_last else 1):
            raise ValueError(
                f"PromptSampler: the dataset has {n_rows} rows, fewer than batch_size={batch_size} "
                "(with drop_last); lower the batch size or add data"
            )
        self.n_rows, self.batch_size = n_rows, batch_size
        self.shuffle, self.drop_last, self.num_epochs = shuffle, drop_last, num_epochs
        self.seed, self.epoch, self.position = seed, 0, 0

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.n_rows, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row order of one epoch."""
        if not self.shuffle:
            return np.arange(self.n_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def _epoch_done(self) -> bool:
        left = self.n_rows - self.position
        return left == 0 or (self.drop_last and left < self.batch_size)

    def next_indices(self) -> list[int] | None:
        """The next batch of indices, or None when ``num_epochs`` are done."""
        if self._epoch_done():
            self.epoch, self.position = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            return None
        order = self.epoch_order(self.epoch)
        end = min(self.position + self.batch_size, self.n_rows)
        indices = order[self.position : end].tolist()
        self.position = end
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        while (indices := self.next_indices()) is not None:
            yield indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_rows", self.n_rows) != self.n_rows:
            raise ValueError(
                f"PromptSampler.load_state_dict: the checkpoint was taken over {state['n_rows']} rows "
                f"but this dataset has {self.n_rows}; resume with the same data and length filter"
            )
        if not 0 <= int(state["position"]) <= self.n_rows:
            raise ValueError(f"PromptSampler.load_state_dict: position {state['position']} out of range")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


class DataLoader:
    """Batches of a dataset in the sampler's order: ``for batch in loader: ...``.

    Works for any dataset with ``__len__`` and ``collate(indices) -> Batch``
    (prompt, SFT and preference datasets). ``state_dict``/``load_state_dict`` resume it.
    """

    def __init__(
        self,
        dataset: Collatable,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.sampler = PromptSampler(len(dataset), batch_size, seed, shuffle, drop_last, num_epochs)

    def __iter__(self) -> Iterator[Batch]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def next_batch(self) -> Batch | None:
        """The next batch (``meta["epoch"]`` says which epoch), or None when all epochs are done."""
        indices = self.sampler.next_indices()
        if indices is None:
            return None
        batch = self.dataset.collate(indices)
        batch.meta["epoch"] = self.sampler.epoch
        return batch

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.sampler.steps_per_epoch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
