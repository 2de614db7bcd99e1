"""One fold of ``bodyage train``: the epoch loop, its resume and its stopping rules.

:func:`train_fold` trains fold *k*'s model on its training subjects with AdamW under a
one-cycle schedule, watching the inner-validation MAE for early stopping. After every
epoch its whole state is written atomically to ``models/fold{k}.partial.pt``, and an
interrupted fold continues from there. A training loss or inner-validation MAE that
becomes NaN or infinite stops the run (:class:`~bodyage.errors.RunError`) before that
epoch is saved. :func:`predict` gives a model's standardised predictions.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from bodyage.atomic import write_with
from bodyage.checkpoints import load_partial
from bodyage.distributed import WorldInfo
from bodyage.errors import RunError
from bodyage.models import build_model
from bodyage.progress import Progress
from bodyage.train_config import TrainConfig, autocast_dtype
from bodyage.train_data import ScanTensors, augment_batch, epoch_batches

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 -- third-party code may draw from the legacy global state
    torch.manual_seed(seed)


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


def train_fold(
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
    state = load_partial(partial_file, device) if partial_file.is_file() else None
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
        for batch in epoch_batches(len(train_idx), cfg.batch_size, perms[epoch], info):
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
