"""Training data of ``bodyage train``: cached scans as tensors, augmentation, batches.

:class:`ScanTensors` serves the preprocessed cache as float32 batches (preloaded when
small, memory-mapped otherwise); :func:`augment_batch` applies the anatomy-respecting
augmentation; :func:`epoch_batches` shares an epoch's batches out among torchrun ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from bodyage.distributed import WorldInfo
from bodyage.preprocess import CacheResult

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from bodyage.train_config import TrainConfig

#: preload cached tensors into memory when they take less than this (bytes)
PRELOAD_LIMIT = 4 << 30


class ScanTensors:
    """Cached scans as a float32 tensor source: preloaded into memory, or read from memory maps."""

    def __init__(self, cache: CacheResult, scan_ids: Sequence[str], preload: bool | None = None) -> None:
        import torch

        self.scan_ids = list(scan_ids)
        first = cache.scans[self.scan_ids[0]].load()
        nbytes = first.nbytes * len(self.scan_ids) * 2  # float32 in memory
        self.preloaded = nbytes <= PRELOAD_LIMIT if preload is None else preload
        self._cache = cache
        self.shape = tuple(first.shape)
        if self.preloaded:
            arr = np.stack([cache.scans[s].load(mmap=False) for s in self.scan_ids]).astype(np.float32)
            self._data: torch.Tensor | None = torch.from_numpy(arr)
        else:
            self._data = None

    def __len__(self) -> int:
        return len(self.scan_ids)

    def get(self, idx: npt.NDArray[np.int64]) -> torch.Tensor:
        """Float32 tensor ``(len(idx), C, X, Y, Z)``."""
        import torch

        if self._data is not None:
            return self._data[torch.as_tensor(idx)]
        return torch.from_numpy(
            np.stack([np.asarray(self._cache.scans[self.scan_ids[i]].load(), dtype=np.float32) for i in idx])
        )


def _interpolation_matrices(n: int, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation weights ``(B, n, n)`` of ``x_in = scale·x_out + shift`` along one axis.

    Coordinates are normalised as in ``F.affine_grid``/``F.grid_sample`` with
    ``align_corners=False``; samples outside the axis read zeros (``padding_mode="zeros"``).
    """
    import torch

    i = torch.arange(n, dtype=torch.float32)
    x_out = (2 * i + 1) / n - 1
    src = ((scale[:, None] * x_out[None] + shift[:, None] + 1) * n - 1) / 2  # source voxel index
    lo = torch.floor(src)
    w_hi = src - lo
    # columns 0 and n + 1 collect what falls outside the axis and are cut off
    first = (lo.long() + 1).clamp(0, n + 1)
    second = (lo.long() + 2).clamp(0, n + 1)
    m = torch.zeros(scale.shape[0], n, n + 2)
    m.scatter_add_(2, first[..., None], (1 - w_hi)[..., None])
    m.scatter_add_(2, second[..., None], w_hi[..., None])
    return m[:, :, 1 : n + 1]


def augment_batch(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Anatomy-respecting augmentation: small shifts and scaling, intensity jitter.

    No flips: left and right organs are distinct regions. The transform is a scaling about
    the grid centre plus a shift of whole voxels, the same trilinear resampling as
    ``F.grid_sample(F.affine_grid(...))`` (tested against it), done as one small matrix
    product per axis because an axis-aligned transform is separable: about 6× faster on
    the CPU than ``grid_sample``, which gathers eight neighbours per voxel.
    """
    import torch

    b, c, nx, ny, nz = x.shape
    scale = 1.0 + (torch.rand(b, generator=gen) * 2 - 1) * cfg.max_scale
    sizes = torch.tensor([nz, ny, nx], dtype=torch.float32)
    shift = torch.randint(-cfg.max_shift_voxels, cfg.max_shift_voxels + 1, (b, 3), generator=gen).float()
    offset = 2.0 * shift / sizes  # normalised, in affine_grid's (z, y, x) = last-dimension-first order
    dev = x.device
    mz = _interpolation_matrices(nz, scale, offset[:, 0]).to(dev)
    my = _interpolation_matrices(ny, scale, offset[:, 1]).to(dev)
    mx = _interpolation_matrices(nx, scale, offset[:, 2]).to(dev)
    out = torch.bmm(x.reshape(b, c * nx * ny, nz), mz.transpose(1, 2))
    out = torch.matmul(my[:, None], out.reshape(b, c * nx, ny, nz))
    out = torch.matmul(mx[:, None], out.reshape(b, c, nx, ny * nz)).reshape(x.shape)
    jitter = 1.0 + (torch.rand(b, c, 1, 1, 1, generator=gen) * 2 - 1) * cfg.intensity_jitter
    return out * jitter.to(dev)


def epoch_batches(
    n: int, batch_size: int, perm: npt.NDArray[np.int64], info: WorldInfo
) -> Iterator[npt.NDArray[np.int64]]:
    """Return this rank's batches of an epoch: the permutation split into global batches, each shared out."""
    per_rank = batch_size
    global_bs = per_rank * info.world_size
    n_full = n // global_bs
    for b in range(n_full):
        chunk = perm[b * global_bs : (b + 1) * global_bs]
        yield chunk[info.rank * per_rank : (info.rank + 1) * per_rank]
    rest = perm[n_full * global_bs :]
    if info.world_size == 1 and len(rest) >= 2:
        yield rest
