"""Fold checkpoints of ``bodyage train``: the finished fold models and the partial ones.

``models/fold{k}.pt`` holds a fold's weights and the hyper-parameters to rebuild and
check it (:func:`checkpoint_hparams`); :func:`load_fold_model` loads it with
``weights_only=True`` and refuses one of another grid, channel list or format.
``models/fold{k}.partial.pt`` is what an interrupted fold resumes from
(:data:`PARTIAL_KEYS`, :func:`load_partial`); a corrupt one is deleted with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bodyage.errors import BodyageWarning, CheckpointError
from bodyage.models import build_model
from bodyage.preprocess import PreprocessSettings

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: layout version stored in every fold model; :func:`load_fold_model` refuses another
CHECKPOINT_FORMAT = 1


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


#: what a partial checkpoint must hold to be resumed from
PARTIAL_KEYS = frozenset(
    {"config_hash", "model", "optimizer", "scheduler", "epoch", "history_keys", "history", "best_val_mae"}
    | {"best_epoch", "best_state", "generator", "torch_rng"}
)


def load_partial(path: Path, device: torch.device) -> dict[str, Any] | None:
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
