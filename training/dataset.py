"""Dataset over the uint8 cache, imbalance weights, and a seeded (distributed) epoch sampler."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.cache import Cache


class CachedImages(Dataset):
    """Rows of a cache as (uint8 [1, H, W], float32 [L]) pairs; whole batches in one slice.

    ``__getitems__`` lets the DataLoader fetch a batch with one fancy index into the memmap instead
    of B Python calls. The memmap is reopened lazily in each worker: pickling it would copy it.
    """

    def __init__(self, cache: Cache, positions: Sequence[int] | np.ndarray) -> None:
        self.path = cache.path / "images.npy"
        self.positions = np.asarray(positions, dtype=np.int64)
        self.rows = cache.index["row"].to_numpy()[self.positions]
        self.targets = cache.targets[self.positions]
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _memmap(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx_arr = np.asarray(idx, dtype=np.int64)
        images = np.ascontiguousarray(self._memmap()[self.rows[idx_arr]])
        return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(self.targets[idx_arr])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.__getitems__([i])
        return images[0], targets[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}


def _batch_identity(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``__getitems__`` already returns a collated batch."""
    return batch


def label_weights(targets: np.ndarray, mode: str, beta: float = 0.999) -> np.ndarray:
    """Per-label weights against imbalance, from training-set label counts.

    ``label_count``: 1 / count (the notebooks' inverse-frequency weights). ``effective``: the
    class-balanced weight (1 - beta) / (1 - beta^count) of Cui et al. (CVPR 2019), which saturates
    for frequent labels instead of growing without bound for rare ones. Both are scaled to mean 1.
    """
    counts = np.maximum(targets.sum(axis=0), 1.0)
    if mode == "label_count":
        w = 1.0 / counts
    elif mode == "effective":
        w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    else:
        raise ValueError(f"unknown weighting {mode!r}")
    return w / w.mean()


def sample_weights(targets: np.ndarray, mode: str, beta: float = 0.999) -> np.ndarray | None:
    """Per-image sampling weight: the weight of its rarest positive label (None for ``none``).

    Taking the maximum, not the sum, keeps an image with many common findings from outweighing
    one with a single rare finding. Images with no positive label (possible when "No Finding" is
    not among the labels) get the smallest label weight.
    """
    if mode == "none":
        return None
    w = label_weights(targets, mode, beta)
    per_image = (targets * w[None, :]).max(axis=1)
    return np.where(per_image > 0, per_image, w.min())


class EpochSampler(Sampler[int]):
    """Seeded shuffle (or weighted draw with replacement) per epoch, sharded across ranks.

    Like DistributedSampler, every rank draws the same permutation from ``seed + epoch`` and keeps
    every ``world``-th index, padded by wrapping so ranks take the same number of steps. Because the
    order depends only on (seed, epoch), a resumed run sees exactly the batches it would have seen.
    """

    def __init__(
        self,
        n: int,
        *,
        weights: np.ndarray | None = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0
        self.per_rank = -(-n // world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        total = self.per_rank * self.world
        if total > self.n:
            order = torch.cat([order, order[: total - self.n]])
        return iter(order[self.rank : total : self.world].tolist())


def make_loader(
    dataset: CachedImages,
    batch_size: int,
    *,
    sampler: Sampler[int] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=_batch_identity,
        persistent_workers=num_workers > 0,
    )


def shard(n: int, rank: int, world: int) -> np.ndarray:
    """Contiguous slice of range(n) for one rank (evaluation: every image exactly once overall)."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return np.arange(bounds[rank], bounds[rank + 1])
