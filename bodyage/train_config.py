"""What determines a training run: :class:`TrainConfig`, its checks and its hash.

A run folder records the hash of its configuration (:func:`hash_config`); running
``bodyage train`` again resumes only with the same hash, and every fold model carries
it. :meth:`TrainConfig.to_dict` leaves out options that are at their "off" value
(``permute_ages_seed``, ``regions``), so adding such an option does not change the hash
of runs made before it and they still resume. Also here: parsing ``--grid``, checking
the options before any work, and the reduced precision a run trains in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bodyage.errors import InputError
from bodyage.models import build_model, get_model_spec
from bodyage.preprocess import PreprocessSettings

if TYPE_CHECKING:  # pragma: no cover
    import torch

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


def hash_config(cfg: TrainConfig, study: Path, settings: PreprocessSettings) -> str:
    """The 16-hex-digit hash of a configuration, study folder and preprocessing.

    Recorded in ``run.json`` and every fold checkpoint; a run resumes only with the same
    hash.
    """
    import hashlib

    payload = {"config": cfg.to_dict(), "study": str(study.resolve()), "preprocess": settings.key()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
