"""k-fold training of the 3D CNN age regressor with out-of-fold predictions.

:func:`train_run` is the one call behind ``bodyage train``. For each fold *k* it trains
a model on the other folds (minus an inner validation split of subjects), stops early on
the validation MAE, fits the age-bias correction on the inner-validation predictions and
predicts fold *k*'s scans. Every scan is predicted exactly once, by the model that never
saw its subject.

Resume: after every epoch the fold's state (model, optimiser, scheduler, best model,
history, random states) is written atomically to ``models/fold{k}.partial.pt``; a
finished fold leaves ``models/fold{k}.pt`` and ``models/fold{k}.predictions.parquet``.
Running the same command again skips finished folds and continues an interrupted one at
its last completed epoch; a fold whose checkpoint says it had stopped early is finalised
from its best state without training further, and a corrupt partial checkpoint is
deleted with a warning and its fold trained again.

Divergence: a training loss or inner-validation MAE that becomes NaN or infinite stops
the run with :class:`~bodyage.errors.RunError` naming the fold and epoch, before that
epoch's partial checkpoint is written, so the fold keeps its last good epoch.

Scale out: under ``torchrun --nproc_per_node N`` each fold is trained with
DistributedDataParallel (NCCL on GPU, gloo on CPU), each rank taking its share of every
epoch's batches; rank 0 writes all outputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from bodyage.accuracy import prediction_metrics
from bodyage.atomic import remove_stale_temps, write_json, write_with
from bodyage.distributed import WorldInfo, world_info
from bodyage.errors import BodyageWarning, CheckpointError, InputError, RunError, StudyError
from bodyage.folds import BiasCorrection, assign_folds, inner_split
from bodyage.models import MODELS, build_model, check_grid, get_model_spec
from bodyage.preprocess import CacheResult, PreprocessSettings, auto_grid, build_cache
from bodyage.progress import NO_PROGRESS, Progress
from bodyage.provenance import build_run_record, finish_run_record, write_record
from bodyage.study import TRUTH_FILE, Study, load_study

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
PREDICTIONS = "predictions.parquet"
METRICS = "metrics.json"
TRAINING_LOG = "training_log.csv"
FAILURES = "failures.csv"
RUN_FILE = "run.json"
#: preload cached tensors into memory when they take less than this (bytes)
PRELOAD_LIMIT = 4 << 30
#: --precision choices (see :func:`autocast_dtype`)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (hashed; a resumed run must match).

    The defaults are chosen for the default synthetic study on a 2-core CPU (see the
    "Training" section of docs/history.md for how they were chosen); on UK Biobank data with a GPU,
    use a finer ``grid`` and more ``epochs``.
    """

    folds: int = 5
    epochs: int = 40
    model: str = "sfcn"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"widths": [8, 16, 32, 64]})
    grid: tuple[int, int, int] | None = None
    channels: tuple[str, ...] = ("water", "fat")
    seed: int = 0
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-3
    val_fraction: float = 0.15
    patience: int = 12
    select: str = "last"
    augment: bool = True
    max_shift_voxels: int = 2
    max_scale: float = 0.05
    intensity_jitter: float = 0.05
    exclude_qc: tuple[str, ...] = ()
    precision: str = "auto"
    #: permuted-label null model (:mod:`bodyage.nulls`): subjects' ages shuffled within each fold with this seed
    permute_ages_seed: int | None = None
    #: organ clock: restrict the input to these regions or groups (:mod:`bodyage.crop`)
    regions: tuple[str, ...] = ()
    crop_margin_mm: float = 16.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``permute_ages_seed`` only when set, so other runs' hashes do not change)."""
        d = asdict(self)
        if d["permute_ages_seed"] is None:
            del d["permute_ages_seed"]
        d["grid"] = list(self.grid) if self.grid is not None else None
        d["channels"] = list(self.channels)
        d["exclude_qc"] = list(self.exclude_qc)
        if self.regions:  # a whole-body run's hash is as before clocks existed
            d["regions"] = list(self.regions)
        else:
            del d["regions"], d["crop_margin_mm"]
        return d


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_run` produced."""

    run: Path
    metrics: dict[str, Any]
    n_scans: int
    n_failed: int
    folds_trained: int
    folds_skipped: int
    minutes: float
    training_dtype: str = "float32"


# ----------------------------------------------------------------------------- helpers


def parse_grid(text: str | None) -> tuple[int, int, int] | None:
    """Parse ``--grid X,Y,Z``; ``None`` or ``auto`` means automatic."""
    if text is None or text.strip().lower() == "auto":
        return None
    parts = text.replace("x", ",").split(",")
    try:
        g = tuple(int(p) for p in parts)
    except ValueError as err:
        raise InputError(f"--grid must be three integers X,Y,Z, got {text!r}") from err
    if len(g) != 3 or min(g) < 8:
        raise InputError(f"--grid must be three integers X,Y,Z of at least 8 each, got {text!r}")
    return (g[0], g[1], g[2])


def check_config(cfg: TrainConfig) -> None:
    """Check a configuration before any work; raise :class:`InputError` naming the option at fault."""
    get_model_spec(cfg.model)
    if cfg.folds < 2:
        raise InputError(f"--folds must be at least 2, got {cfg.folds}")
    if cfg.epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 2:
        raise InputError(f"--batch-size must be at least 2 (batch normalisation), got {cfg.batch_size}")
    if not cfg.lr > 0:
        raise InputError(f"--lr must be positive, got {cfg.lr}")
    if cfg.precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.select not in ("last", "best"):
        raise InputError(f"select must be last or best, got {cfg.select!r}")
    if not cfg.channels:
        raise InputError("at least one image channel is needed")
    try:
        build_model(cfg.model, len(cfg.channels), **cfg.model_kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"--model-options do not fit model {cfg.model!r}: {err}") from err


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 -- third-party code may draw from the legacy global state
    torch.manual_seed(seed)


def checkpoint_hparams(
    model_name: str, model_kwargs: dict[str, Any], settings: PreprocessSettings, **extra: Any
) -> dict[str, Any]:
    """The hyper-parameters stored with every fold model."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model_name,
        "model_kwargs": dict(model_kwargs),
        "in_channels": len(settings.channels),
        "grid": list(settings.grid),
        "channels": list(settings.channels),
        "preprocess": json.loads(json.dumps(asdict(settings))),
        **extra,
    }


def load_fold_model(
    path: str | os.PathLike[str],
    *,
    grid: Sequence[int] | None = None,
    channels: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``models/fold{k}.pt`` with ``weights_only=True`` and check it matches.

    Returns the model in ``eval()`` mode and its hyper-parameters.

    Raises
    ------
    CheckpointError
        If the file is missing or unreadable, of another format, or its grid or
        channels differ from the expected ones.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise CheckpointError(f"{p}: cannot be loaded as a bodyage checkpoint ({_load_failure(err)})") from err
    hp = ckpt.get("hparams") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or hp.get("format") != CHECKPOINT_FORMAT or "state_dict" not in ckpt:
        raise CheckpointError(f"{p}: not a bodyage checkpoint of format {CHECKPOINT_FORMAT}")
    if grid is not None and list(hp["grid"]) != list(grid):
        raise CheckpointError(f"{p}: model grid {hp['grid']} does not match the expected grid {list(grid)}")
    if channels is not None and list(hp["channels"]) != list(channels):
        raise CheckpointError(
            f"{p}: model channels {hp['channels']} do not match the expected channels {list(channels)}"
        )
    model = build_model(hp["model"], int(hp["in_channels"]), **hp["model_kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{p}: weights do not fit model {hp['model']} ({err})") from err
    model.to(device)
    model.eval()
    return model, hp


def _load_failure(err: Exception) -> str:
    """Why ``torch.load`` failed, in a few words, without torch's advice to load unsafely.

    With ``weights_only=True`` a corrupt file and one holding code both raise torch's
    "Weights only load failed ... Re-running torch.load with weights_only set to False
    will likely succeed": advice bodyage must not pass on.
    """
    text = str(err)
    if "weights_only" in text or "Weights only" in text:
        return f"{type(err).__name__}: corrupt, or holds objects other than weights, which are never loaded"
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- data


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


def _batches(n: int, batch_size: int, perm: npt.NDArray[np.int64], info: WorldInfo) -> Iterator[npt.NDArray[np.int64]]:
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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The reduced precision the convolutions run in, or ``None`` for float32.

    ``auto``: float16 on CUDA (with loss scaling), float32 on a CPU. bfloat16 on a CPU
    whose oneDNN has bfloat16 kernels trains about 1.7× faster per step, but it diverged to
    NaN predictions on small grids (the quick scenario's 22×16×44, the shrunken demo, masked
    organ-clock crops), so it is opt-in (``bf16``). ``bf16``/``fp16`` ask for one explicitly,
    ``fp32`` turns mixed precision off. The models keep their heads (global pooling and
    the linear output) in float32 either way (:mod:`bodyage.models`).
    """
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.float16
    return None


def dtype_name(amp: torch.dtype | None) -> str:
    """``bfloat16``, ``float16`` or ``float32`` (no autocast): how runs record their precision."""
    return str(amp).removeprefix("torch.") if amp is not None else "float32"


def predict(
    model: nn.Module,
    data: ScanTensors,
    idx: npt.NDArray[np.int64],
    device: torch.device,
    batch: int = 16,
    amp: torch.dtype | None = None,
) -> npt.NDArray[np.float64]:
    """Standardised predictions of ``model`` (eval mode) for scans ``idx`` (float32 unless ``amp``)."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(idx), batch):
            x = data.get(idx[i : i + batch]).to(device)
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


# ----------------------------------------------------------------------------- one fold

#: what a partial checkpoint must hold to be resumed from
PARTIAL_KEYS = frozenset(
    {"config_hash", "model", "optimizer", "scheduler", "epoch", "history_keys", "history", "best_val_mae"}
    | {"best_epoch", "best_state", "generator", "torch_rng"}
)


def _load_partial(path: Path, device: torch.device) -> dict[str, Any] | None:
    """Load a fold's partial checkpoint; a corrupt one is deleted with a warning (``None``).

    The fold is then trained again from its start (seeded: the same model as an
    uninterrupted run) instead of blocking the resume until the file is deleted by hand.
    """
    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not set(state) >= PARTIAL_KEYS:
            raise ValueError("keys missing")
    except Exception as err:
        # torch's own message advises weights_only=False: not passed on
        warnings.warn(
            f"{path}: unreadable partial checkpoint ({type(err).__name__}); deleted, the fold is trained again",
            BodyageWarning,
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        return None
    return state


def _check_finite(k: int, epoch: int, what: str, value: float, amp: torch.dtype | None) -> None:
    """Raise :class:`RunError` if ``value`` (a loss or MAE of fold ``k`` at ``epoch``) is NaN or infinite.

    A diverged model only produces NaN from then on; training on would checkpoint it and
    write NaN predictions. The likely causes are named: a learning rate too high, reduced
    precision (bfloat16 diverged on small grids, see :func:`autocast_dtype`), or scans
    whose intensities are far off (the run folder then refuses other settings, hence a new
    one).
    """
    if math.isfinite(value):
        return
    fp32 = ", train in --precision fp32" if amp is not None else ""
    raise RunError(
        f"fold {k}, epoch {epoch}: {what} is {value}; lower --lr (in a new --run folder){fp32} "
        "or check the scans' intensities"
    )


def _train_fold(
    k: int,
    cfg: TrainConfig,
    hp: dict[str, Any],
    data: ScanTensors,
    ages: npt.NDArray[np.float64],
    train_idx: npt.NDArray[np.int64],
    val_idx: npt.NDArray[np.int64],
    models_dir: Path,
    device: torch.device,
    info: WorldInfo,
    progress: Progress,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train fold ``k`` (resuming from its partial checkpoint); return the best state and history."""
    import torch
    from torch import nn

    _seed_everything(cfg.seed * 1000 + k)
    model = build_model(cfg.model, len(cfg.channels), **cfg.model_kwargs).to(device)
    amp = autocast_dtype(cfg.precision, device)
    net: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(
        1,
        len(train_idx) // (cfg.batch_size * info.world_size)
        + (1 if info.world_size == 1 and len(train_idx) % cfg.batch_size >= 2 else 0),
    )
    # OneCycleLR divides by its phase lengths: fewer than ~5 steps in all (one epoch of a tiny
    # study) raised ZeroDivisionError; a longer schedule only leaves the last steps unused
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(cfg.epochs * steps_per_epoch, 10), pct_start=0.2
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    mean, sd = float(hp["age_mean"]), float(hp["age_sd"])
    y_std = torch.tensor((ages - mean) / sd, dtype=torch.float32)

    partial_file = models_dir / f"fold{k}.partial.pt"
    start_epoch = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val_mae": float("inf"), "epoch": -1, "state_dict": None}
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + k)
    # the inner-validation MAE is watched from the second half of the one-cycle schedule
    # on: near the peak learning rate it swings by tens of years (BatchNorm statistics of a
    # fast-moving network), and an early best there once stopped a fold at epoch 15 of 40
    # with a model that was never annealed
    watch_from = max(1, cfg.epochs // 2)
    stop = False
    state = _load_partial(partial_file, device) if partial_file.is_file() else None
    if state is not None:
        if state.get("config_hash") != hp["config_hash"]:
            raise RunError(f"{partial_file}: belongs to a run with other settings; delete it or use a new --run folder")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        history = [dict(zip(state["history_keys"], row, strict=True)) for row in state["history"]]
        best = {
            "val_mae": float(state["best_val_mae"]),
            "epoch": int(state["best_epoch"]),
            "state_dict": state["best_state"],
        }
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        # a fold killed after its early stop was saved is finished: finalise it, train no
        # further (checkpoints older than the flag: the stopping rule gives the same answer)
        stale_saved = 0 if best["epoch"] < 0 else len(history) - 1 - best["epoch"]
        stop = bool(state.get("stopped", int(state["epoch"]) >= watch_from and stale_saved >= cfg.patience))

    bar = progress.task(f"fold {k} (folds 0-{cfg.folds - 1})", cfg.epochs)  # k as in fold{k}.pt and predictions
    if start_epoch:
        bar.advance(start_epoch)
    perm_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, k, 0xE90C]))
    perms = [perm_rng.permutation(len(train_idx)) for _ in range(cfg.epochs)]
    stale = 0 if best["epoch"] < 0 else len(history) - 1 - best["epoch"]
    for epoch in range(start_epoch, start_epoch if stop else cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        total, count = 0.0, 0
        for batch in _batches(len(train_idx), cfg.batch_size, perms[epoch], info):
            idx = train_idx[batch]
            x = data.get(idx)
            if cfg.augment:
                x = augment_batch(x, cfg, gen)
            x = x.to(device, non_blocking=True)
            y = y_std[torch.as_tensor(idx)].to(device)
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                loss = nn.functional.l1_loss(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        train_loss = total / max(count, 1)
        if info.distributed:
            import torch.distributed as dist

            t = torch.tensor([total, float(count)], device=device)
            dist.all_reduce(t)
            train_loss = float(t[0] / t[1].clamp(min=1))
        # every rank sees the same reduced loss and rank 0's validation MAE, so all stop together;
        # raised before this epoch's partial checkpoint: the fold's last good epoch is kept
        _check_finite(k, epoch, "training loss", train_loss, amp)
        val_pred = predict(model, data, val_idx, device, amp=amp) * sd + mean
        val_mae = float(np.mean(np.abs(val_pred - ages[val_idx]))) if len(val_idx) else float("nan")
        if info.distributed:
            import torch.distributed as dist

            t = torch.tensor([val_mae], device=device)
            dist.broadcast(t, src=0)  # every rank takes rank 0's decision
            val_mae = float(t[0])
        if len(val_idx):  # e.g. batch-norm running statistics that overflowed while the batches' did not
            _check_finite(k, epoch, "inner-validation MAE", val_mae, amp)
        watching = epoch >= watch_from
        improved = watching and val_mae < best["val_mae"]
        if improved:
            best = {
                "val_mae": val_mae,
                "epoch": epoch,
                "state_dict": {kk: v.detach().clone() for kk, v in model.state_dict().items()},
            }
            stale = 0
        elif watching:
            stale += 1
        row = {
            "fold": k,
            "epoch": epoch,
            "train_loss_years": train_loss * sd,
            "val_mae": val_mae,
            "lr": float(sched.get_last_lr()[0]),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        bar.advance(1, loss=row["train_loss_years"], val_mae=val_mae)
        stop = watching and stale >= cfg.patience
        if info.is_main:
            keys = list(row)
            state = {
                "config_hash": hp["config_hash"],
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "history_keys": keys,
                "history": [[h[kk] for kk in keys] for h in history],
                "best_val_mae": best["val_mae"],
                "best_epoch": best["epoch"],
                "best_state": best["state_dict"],
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "stopped": stop,
            }
            write_with(partial_file, partial(torch.save, state))
        if stop:
            log.info("fold %d: early stop at epoch %d (best %d)", k, epoch, best["epoch"])
            break
    bar.close()
    stopped_early = stop and len(history) < cfg.epochs
    if (cfg.select == "last" and not stopped_early) or best["state_dict"] is None:
        # the one-cycle schedule anneals to ~0: the last epoch is the model the schedule
        # was built for; picking the best of 40 noisy inner-validation scores selects noise
        best = {
            "val_mae": float(history[-1]["val_mae"]) if history else float("nan"),
            "epoch": len(history) - 1,
            "state_dict": {kk: v.detach().clone() for kk, v in model.state_dict().items()},
        }
    return best, history


# ----------------------------------------------------------------------------- the run


def _config_hash(cfg: TrainConfig, study: Path, settings: PreprocessSettings) -> str:
    import hashlib

    payload = {"config": cfg.to_dict(), "study": str(study.resolve()), "preprocess": settings.key()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _grid_of_first_readable(study: Study, cohort: pd.DataFrame, channel: str) -> tuple[int, int, int]:
    """The automatic grid from the first scan whose image loads (an unreadable one is a failures row later)."""
    from bodyage.volumes import load_volume

    problems = []
    for path in cohort[channel]:
        try:
            return auto_grid(load_volume(study.path(path)).shape)
        except (InputError, StudyError) as err:
            problems.append(str(err))
            if len(problems) >= 20:
                break
    raise StudyError(f"no readable {channel} image among the first {len(problems)} scans: {problems[0]}")


def _check_run_folder(run: Path, config_hash: str) -> None:
    rec = run / RUN_FILE
    if not rec.is_file():
        return
    try:
        old = json.loads(rec.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{rec}: not valid JSON; use a new --run folder") from err
    old_hash = old.get("config_hash")
    if old_hash is not None and old_hash != config_hash:
        raise RunError(
            f"{run}: was started with other settings (config {old_hash}, now {config_hash}); "
            "run again with the same arguments to resume, or choose a new --run folder"
        )


def train_run(
    study_dir: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    device: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    progress: Progress = NO_PROGRESS,
    figures: bool = True,
    threads: int | None = None,
) -> TrainResult:
    """Train k fold models and write out-of-fold predictions (docs/design.md §3).

    Parameters
    ----------
    study_dir
        Study folder (``cohort.csv``, images).
    run_dir
        Run folder to write (or resume).
    config
        Training settings (:class:`TrainConfig`).
    device
        ``auto``, ``cpu`` or ``cuda``.
    cache_dir
        Where preprocessed tensors are cached (default ``STUDY/cache``).
    strict
        Stop at the first scan that cannot be preprocessed instead of listing it in
        ``failures.csv``.
    progress
        Progress display.
    figures
        Write learning curves and the predicted-vs-age scatter.
    threads
        CPU threads for torch (default: the machine's cores shared among the processes).

    Raises
    ------
    StudyError, InputError
        For a bad study (missing ages, duplicate keys, ...), bad options, or too few
        subjects for the folds.
    RunError
        If ``run_dir`` holds a run with other settings.
    """
    import torch

    started = time.perf_counter()
    cfg = config or TrainConfig()
    check_config(cfg)
    info = world_info()
    study = load_study(study_dir, channels=cfg.channels)
    run = Path(run_dir)
    dev = _init_distributed(info, device, threads)

    cohort = study.cohort.reset_index(drop=True)
    failures: list[dict[str, str]] = []
    if cfg.exclude_qc:
        from bodyage.qc import excluded_scans

        excluded = excluded_scans(study, cfg.exclude_qc)
        for sid in sorted(excluded & set(cohort["scan_id"])):
            failures.append(
                {"scan_id": sid, "stage": "qc", "reason": f"excluded by --exclude-qc {','.join(cfg.exclude_qc)}"}
            )
        cohort = cohort[~cohort["scan_id"].isin(excluded)].reset_index(drop=True)

    # folds of the whole cohort, before preprocessing failures: a scan's fold does not depend
    # on which other scans fail, so every clock of a study shares the whole-body run's folds
    cohort["fold"] = assign_folds(cohort, cfg.folds, cfg.seed).to_numpy()
    crop = None
    if cfg.regions:
        from bodyage.crop import plan_crop, resolve_regions

        if cfg.grid is not None:
            raise InputError("--grid cannot be combined with --region: the clock's crop sets its grid")
        regions = resolve_regions(cfg.regions, study)
        crop = plan_crop(study, cohort, regions, margin_mm=cfg.crop_margin_mm)
        cfg = replace(cfg, regions=regions, grid=crop.grid)
        if cfg.precision == "auto" and dev.type == "cpu":
            # bfloat16 batch norm on a mostly-zero masked input diverged to NaN within a few
            # epochs (liver clock, default study); a clock's small crop is cheap in float32
            cfg = replace(cfg, precision="fp32")
    grid = cfg.grid
    if grid is None:
        grid = _grid_of_first_readable(study, cohort, cfg.channels[0])
        cfg = replace(cfg, grid=grid)
    check_grid(cfg.model, grid, **cfg.model_kwargs)  # before the run folder exists
    settings = PreprocessSettings(grid=grid, channels=cfg.channels, crop=crop)
    config_hash = _config_hash(cfg, study.root, settings)
    if info.is_main:
        _check_run_folder(run, config_hash)
        (run / "models").mkdir(parents=True, exist_ok=True)
        for folder in (run, run / "models", run / "figures"):  # what a killed run left half-written
            remove_stale_temps(folder)
    _barrier(info)

    record = build_run_record(
        "train",
        {"study": str(study.root), "run": str(run), **cfg.to_dict(), "device": device, "strict": strict},
        seed=cfg.seed,
        inputs={"cohort": study.root / "cohort.csv"},
        extra={
            "study": str(study.root.resolve()),
            "config_hash": config_hash,
            "world_size": info.world_size,
            **({"regions": list(cfg.regions), "crop": crop.to_dict()} if crop is not None else {}),
        },
    )
    if info.is_main:
        write_record(run / RUN_FILE, record)

    # preprocessing: rank 0 builds the cache, the others reuse it
    if info.is_main:
        cache = build_cache(study, settings, cache_root=cache_dir, scan_ids=list(cohort["scan_id"]), progress=progress)
    _barrier(info)
    if not info.is_main:
        cache = build_cache(study, settings, cache_root=cache_dir, scan_ids=list(cohort["scan_id"]))
    for f in cache.failures.to_dict("records"):
        if strict:
            raise InputError(f"{f['reason']} (--strict stops at the first bad scan)")
        failures.append({str(k): str(v) for k, v in f.items()})
    cohort = cohort[cohort["scan_id"].isin(list(cache.scans))].reset_index(drop=True)
    if cohort.empty:
        raise StudyError(f"no scan could be preprocessed; the first reason: {failures[0]['reason']}")

    ages = cohort["age"].to_numpy(dtype=float)
    if cfg.permute_ages_seed is not None:
        from bodyage.nulls import permute_ages

        ages = permute_ages(cohort, cfg.permute_ages_seed)  # a permuted-label null model
    data = ScanTensors(cache, list(cohort["scan_id"]))
    training_dtype = dtype_name(autocast_dtype(cfg.precision, dev))
    models_dir = run / "models"
    all_history: list[dict[str, Any]] = []
    trained = skipped = 0
    for k in range(cfg.folds):
        final = models_dir / f"fold{k}.pt"
        fold_pred_file = models_dir / f"fold{k}.predictions.parquet"
        if final.is_file() and fold_pred_file.is_file():
            try:
                _, hp_old = load_fold_model(final, grid=settings.grid, channels=settings.channels)
            except CheckpointError:
                hp_old = {}
            if hp_old.get("config_hash") == config_hash:
                skipped += 1
                log_file = models_dir / f"fold{k}.log.csv"
                if log_file.is_file():
                    all_history += [{str(k): v for k, v in r.items()} for r in pd.read_csv(log_file).to_dict("records")]
                continue
        test = cohort["fold"].to_numpy() == k
        rest = cohort[~test]
        is_val = np.zeros(len(cohort), dtype=bool)
        is_val[np.nonzero(~test)[0]] = inner_split(rest, cfg.val_fraction, cfg.seed + k)
        train_idx = np.nonzero(~test & ~is_val)[0]
        val_idx = np.nonzero(is_val)[0]
        test_idx = np.nonzero(test)[0]
        age_mean = float(ages[train_idx].mean())
        age_sd = float(ages[train_idx].std()) or 1.0
        hp = checkpoint_hparams(
            cfg.model,
            cfg.model_kwargs,
            settings,
            fold=k,
            folds=cfg.folds,
            age_mean=age_mean,
            age_sd=age_sd,
            config_hash=config_hash,
            default_layer=MODELS[cfg.model].default_layer,
            regions=list(cfg.regions),
            crop=crop.to_dict() if crop is not None else None,
        )
        best, history = _train_fold(k, cfg, hp, data, ages, train_idx, val_idx, models_dir, dev, info, progress)
        all_history += history
        if info.is_main:
            model = build_model(cfg.model, len(cfg.channels), **cfg.model_kwargs).to(dev)
            model.load_state_dict(best["state_dict"])
            val_pred = predict(model, data, val_idx, dev) * age_sd + age_mean
            bias = BiasCorrection.fit(ages[val_idx], val_pred)
            test_pred = predict(model, data, test_idx, dev) * age_sd + age_mean
            hp.update(
                training_dtype=training_dtype,
                best_epoch=int(best["epoch"]),
                best_val_mae=float(best["val_mae"]),
                bias={"slope": bias.slope, "intercept": bias.intercept, "n": bias.n},
                n_train=len(train_idx),
                n_val=len(val_idx),
                n_test=len(test_idx),
            )
            sub = cohort.iloc[test_idx]
            fold_pred = pd.DataFrame(
                {
                    "subject_id": sub["subject_id"].to_numpy(),
                    "visit": sub["visit"].to_numpy(),
                    "fold": k,
                    "age": ages[test_idx],
                    "predicted_age": test_pred,
                    "age_gap": test_pred - ages[test_idx],
                    "age_gap_corrected": bias.apply(ages[test_idx], test_pred) - ages[test_idx],
                }
            )
            if cfg.permute_ages_seed is not None:  # `age` is the label it was trained on
                fold_pred["true_age"] = sub["age"].to_numpy(dtype=float)
            state = {"state_dict": {kk: v.cpu() for kk, v in best["state_dict"].items()}, "hparams": hp}
            write_with(models_dir / f"fold{k}.log.csv", partial(pd.DataFrame(history).to_csv, index=False))
            write_with(fold_pred_file, partial(fold_pred.to_parquet, index=False))
            write_with(final, partial(torch.save, state))
            (models_dir / f"fold{k}.partial.pt").unlink(missing_ok=True)
        trained += 1
        _barrier(info)

    metrics: dict[str, Any] = {}
    if info.is_main:
        preds = pd.concat([pd.read_parquet(models_dir / f"fold{k}.predictions.parquet") for k in range(cfg.folds)])
        preds = preds.sort_values(["subject_id", "visit"]).reset_index(drop=True)
        write_with(run / "predictions.parquet", lambda p: preds.to_parquet(p, index=False))
        metrics = _metrics(preds, study)
        write_json(run / METRICS, metrics)
        log_df = pd.DataFrame(all_history)
        write_with(run / TRAINING_LOG, lambda p: log_df.to_csv(p, index=False))
        fail_df = pd.DataFrame(failures, columns=["scan_id", "stage", "reason"])
        write_with(run / FAILURES, lambda p: fail_df.to_csv(p, index=False))
        if figures:
            from bodyage.train_figures import learning_curves, predicted_vs_age

            learning_curves(log_df, run / "figures")
            predicted_vs_age(preds, run / "figures", metrics)
        minutes = (time.perf_counter() - started) / 60.0
        write_record(
            run / RUN_FILE,
            finish_run_record(
                record,
                minutes=round(minutes, 2),
                n_scans=len(preds),
                n_failed=len(failures),
                training_dtype=training_dtype,
            ),
        )
    _barrier(info)
    _finish_distributed(info)
    return TrainResult(
        run=run,
        metrics=metrics,
        n_scans=len(cohort),
        n_failed=len(failures),
        folds_trained=trained,
        folds_skipped=skipped,
        minutes=(time.perf_counter() - started) / 60.0,
        training_dtype=training_dtype,
    )


def _metrics(preds: pd.DataFrame, study: Study) -> dict[str, Any]:
    # accuracy beside the mean-age baseline and the informative flag; never the accuracy of
    # the bias-corrected predictions (they use the true age)
    out = prediction_metrics(preds)
    truth = study.root / TRUTH_FILE
    if truth.is_file():
        oracle = float(json.loads(truth.read_text())["oracle_mae"])
        out["oracle_mae"] = oracle
        out["mae_ratio"] = out["overall"]["mae"] / oracle if oracle > 0 else float("nan")
    return out


# ----------------------------------------------------------------------------- torchrun


def _init_distributed(info: WorldInfo, device: str, threads: int | None = None) -> torch.device:
    import torch

    from bodyage.device import resolve_device

    dev = resolve_device(device, info.local_rank)
    if dev.type == "cpu":
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // info.world_size))
    if info.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def _barrier(info: WorldInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def _finish_distributed(info: WorldInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
