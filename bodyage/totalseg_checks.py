"""TotalSegmentator checks that need no torch: tasks, weights and licence, before anything runs.

Importable anywhere (only TotalSegmentator's light table modules are read, never torch):
the tasks ``bodyage segment`` runs (:data:`TASK_SPECS`, :func:`task_spec`), which weights
folders a task needs (:func:`required_weights`, read from TotalSegmentator's own
``map_tasks_config``), whether they are there and complete (:func:`check_weights`), where
the user keeps them (:func:`default_weights_dir`), the licence of ``tissue_types_mr``
(:func:`resolve_license`, :func:`check_license`) and the ``config.json`` of a private
TotalSegmentator home (:func:`private_config`). The session that runs TotalSegmentator
with these checks is :class:`bodyage.totalseg.TotalSegmentatorSession`; every public
name here is also importable from :mod:`bodyage.totalseg`.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bodyage._typing import SEGMENT_TASKS, SegmentTask
from bodyage.errors import InputError, WeightsMissingError
from bodyage.regions import TISSUE_ID_OFFSET

#: where a free academic licence for the licensed tasks is issued
LICENSE_URL = "https://backend.totalsegmentator.com/license-academic/"
#: TotalSegmentator's default plans identifier (``python_api.totalsegmentator(plans=...)``)
DEFAULT_PLANS = "nnUNetPlans"
#: checkpoint file name nnU-Net v2 loads for each fold
CHECKPOINT = "checkpoint_final.pth"


@dataclass(frozen=True)
class TaskSpec:
    """How ``bodyage segment`` runs one TotalSegmentator task.

    Attributes
    ----------
    name
        TotalSegmentator task name.
    default_channel
        Image channel fed by default (see docs/guide/segment.md: the water image for organs and
        muscles, the fat image for the fat classes).
    id_offset
        Added to the task's class ids in the study's combined map (docs/design.md §3).
    download
        Name ``totalseg_download_weights -t`` knows the task's weights by.
    download_fast
        The same for ``--fast`` (``None``: the task has no fast mode).
    """

    name: SegmentTask
    default_channel: str
    id_offset: int
    download: str
    download_fast: str | None

    @property
    def needs_license(self) -> bool:
        """Whether TotalSegmentator requires a licence for this task (its own registry)."""
        from totalsegmentator.map_to_binary import commercial_models

        return self.name in commercial_models

    @property
    def has_fast(self) -> bool:
        """Whether the task has a lower-resolution ``--fast`` model."""
        return "fast" in _task_config(self.name).get("sub_modes", {})


#: the tasks ``bodyage segment --task`` runs (one entry per :data:`bodyage._typing.SEGMENT_TASKS`)
TASK_SPECS: dict[SegmentTask, TaskSpec] = {
    "total_mr": TaskSpec("total_mr", "water", 0, "total_mr", "total_fast_mr"),
    "tissue_types_mr": TaskSpec("tissue_types_mr", "fat", TISSUE_ID_OFFSET, "tissue_types_mr", None),
}


#: how to install TotalSegmentator with bodyage: the optional extra of ``pyproject.toml``
INSTALL_HINT = "pip install 'bodyage[segment]'"


def require_totalsegmentator() -> None:
    """Check that TotalSegmentator can be imported (its light class-map module: no torch).

    Raises
    ------
    InputError
        If it is not installed (bodyage's minimal install leaves it out), saying how to
        install it and that ``--from DIR`` imports masks without it.
    """
    try:
        import totalsegmentator.map_to_binary  # noqa: F401
    except ImportError as err:
        raise InputError(
            f"TotalSegmentator is not installed (it is optional); install it with: {INSTALL_HINT} "
            "-- or import existing masks with --from DIR"
        ) from err


def task_spec(task: str) -> TaskSpec:
    """Return the :class:`TaskSpec` of ``task``; raise :class:`InputError` for unknown tasks."""
    if task not in TASK_SPECS:
        raise InputError(f"--task must be one of {', '.join(SEGMENT_TASKS)}; {task!r} was provided")
    return TASK_SPECS[task]


# ---------------------------------------------------------------- weights (no torch)


def _ts_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("TotalSegmentator")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _task_config(task: str) -> dict[str, Any]:
    from totalsegmentator.map_tasks_config import TASK_CONFIGS

    if task not in TASK_CONFIGS:  # pragma: no cover - TASK_SPECS are TotalSegmentator tasks
        raise InputError(f"TotalSegmentator {_ts_version()} has no task {task!r}")
    return dict(TASK_CONFIGS[task])


@dataclass(frozen=True)
class WeightsFolder:
    """One nnU-Net model TotalSegmentator loads for a task.

    Attributes
    ----------
    task
        The task it serves.
    task_id
        TotalSegmentator's model id (e.g. 850).
    folder
        Folder under the weights directory (``Dataset850_TotalSegMRI_part1_organs_1088subj``).
    model
        Sub-folder ``<trainer>__<plans>__<configuration>`` holding ``plans.json``,
        ``dataset.json`` and ``fold_<k>/checkpoint_final.pth``.
    folds
        Folds loaded.
    """

    task: str
    task_id: int
    folder: str
    model: str
    folds: tuple[int, ...]

    def model_dir(self, weights_dir: Path) -> Path:
        """The folder nnU-Net's predictor is initialised from."""
        return weights_dir / self.folder / self.model

    def files(self, weights_dir: Path) -> list[Path]:
        """Every file the predictor reads."""
        d = self.model_dir(weights_dir)
        return [d / "plans.json", d / "dataset.json", *(d / f"fold_{k}" / CHECKPOINT for k in self.folds)]


def required_weights(task: str, *, fast: bool) -> list[WeightsFolder]:
    """Return the nnU-Net models TotalSegmentator loads for ``task``.

    Read from TotalSegmentator's ``map_tasks_config`` (the table its ``python_api`` uses),
    so the layout follows the installed version:
    ``<weights>/<DatasetNNN_...>/<trainer>__<plans>__<model>/{plans.json, dataset.json,
    fold_0/checkpoint_final.pth}``.
    """
    from totalsegmentator.map_tasks_config import DEFAULT_CONFIG, TASK_ID_WEIGHTS_CONFIGS

    spec = task_spec(task)
    raw = _task_config(spec.name)
    if "sub_modes" in raw:
        cfg = {**DEFAULT_CONFIG, **raw["sub_modes"]["fast" if fast and spec.has_fast else "default"]}
    else:
        skip = ("disallow_fast", "commercial", "info_msg")
        cfg = {**DEFAULT_CONFIG, **{k: v for k, v in raw.items() if k not in skip}}
    ids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
    plans = cfg.get("plans") or DEFAULT_PLANS
    out: list[WeightsFolder] = []
    for tid in ids:
        info = TASK_ID_WEIGHTS_CONFIGS[tid]
        folder = str(Path(info["rel_path"]) / info["foldername"]) if info.get("rel_path") else info["foldername"]
        out.append(
            WeightsFolder(
                task=spec.name,
                task_id=int(tid),
                folder=folder,
                model=f"{cfg['trainer']}__{plans}__{cfg['model']}",
                folds=tuple(int(f) for f in cfg["folds"]),
            )
        )
    return out


def user_home_dir(env: Mapping[str, str] | None = None) -> Path:
    """The user's TotalSegmentator home (``TOTALSEG_HOME_DIR`` or ``~/.totalsegmentator``).

    Mirrors ``totalsegmentator.config.get_totalseg_dir`` without importing it (it imports
    torch).
    """
    e = os.environ if env is None else env
    if "TOTALSEG_HOME_DIR" in e:
        return Path(e["TOTALSEG_HOME_DIR"])
    home = Path("/tmp") if str(Path.home()) == "/" else Path.home()
    return home / ".totalsegmentator"


def default_weights_dir(env: Mapping[str, str] | None = None) -> Path:
    """The user's weights folder: ``TOTALSEG_WEIGHTS_PATH``, else ``<home>/nnunet/results``."""
    e = os.environ if env is None else env
    if "TOTALSEG_WEIGHTS_PATH" in e:
        return Path(e["TOTALSEG_WEIGHTS_PATH"])
    return user_home_dir(e) / "nnunet" / "results"


def _checkpoint_problem(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return f"{path.name} is empty"
    with path.open("rb") as fh:
        magic = fh.read(2)
    if magic == b"PK":  # torch.save's zip format: the central directory sits at the end
        if not zipfile.is_zipfile(path):
            return f"{path.name} is truncated"
        return None
    if magic[:1] == b"\x80":  # legacy pickle format: cannot be checked cheaply
        return None
    return f"{path.name} is not a PyTorch checkpoint"


def weights_problem(folder: WeightsFolder, weights_dir: Path) -> str | None:
    """Say what is wrong with one model folder (``None`` if it looks complete).

    TotalSegmentator itself only checks that the dataset folder exists, so a half-copied
    folder fails later, inside nnU-Net. Here every file the predictor reads must exist,
    the JSON files must parse, and a zip-format checkpoint must have its central
    directory (a truncated copy does not).
    """
    root = weights_dir / folder.folder
    if not root.is_dir():
        return "missing"
    for f in folder.files(weights_dir):
        rel = f.relative_to(root)
        if not f.is_file():
            return f"incomplete ({rel} is missing)"
        if f.suffix == ".json":
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return f"incomplete ({rel} is not valid JSON: a half-copied file?)"
        else:
            problem = _checkpoint_problem(f)
            if problem:
                return f"incomplete ({rel.parent}/{problem}: a half-copied file?)"
    return None


def install_hint(task: str, *, fast: bool) -> str:
    """How to get a task's weights onto an offline machine (one sentence)."""
    spec = task_spec(task)
    name = spec.download_fast if fast and spec.download_fast else spec.download
    licence = "`totalseg_set_license -l YOUR_KEY`, then " if spec.needs_license else ""
    return (
        f"on a machine with internet run {licence}`totalseg_download_weights -t {name}`, then copy "
        "~/.totalsegmentator/nnunet/results (or the Dataset folders in it) to this machine and point "
        "--weights or TOTALSEG_WEIGHTS_PATH at it"
    )


def check_weights(tasks: Sequence[str], *, fast: bool, weights_dir: str | os.PathLike[str]) -> list[WeightsFolder]:
    """Check that every model the tasks need is present and complete; return them.

    Raises
    ------
    WeightsMissingError
        Naming the task, the model folder, what is wrong and how to install it.
    """
    root = Path(weights_dir)
    found: list[WeightsFolder] = []
    for task in tasks:
        mode = " --fast" if fast and task_spec(task).has_fast else ""
        for folder in required_weights(task, fast=fast):
            problem = weights_problem(folder, root)
            if problem:
                raise WeightsMissingError(
                    f"TotalSegmentator weights for task {task}{mode} are {problem}: {folder.folder} in {root}; "
                    + install_hint(task, fast=fast)
                )
            found.append(folder)
    return found


def weights_available(
    tasks: Sequence[str] = ("total_mr",), *, fast: bool = False, weights_dir: Path | None = None
) -> bool:
    """Whether :func:`check_weights` passes (for skipping tests that need real weights)."""
    try:
        check_weights(tasks, fast=fast, weights_dir=weights_dir or default_weights_dir())
    except WeightsMissingError:
        return False
    return True


# ---------------------------------------------------------------- licence (no torch)


def _license_format_problem(key: str) -> str | None:
    # the rules of `totalseg_set_license` and of the offline check TotalSegmentator runs
    if not key.startswith("aca_"):
        return "must start with 'aca_'"
    if len(key) != 18:
        return f"must have exactly 18 characters, not {len(key)}"
    return None


def resolve_license(option: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The licence key: ``--license``, else the one set in the user's TotalSegmentator config."""
    if option is not None:
        return option.strip()
    cfg = user_home_dir(env) / "config.json"
    try:
        key = json.loads(cfg.read_text(encoding="utf-8")).get("license_number")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return str(key) if key else None


def check_license(tasks: Sequence[str], key: str | None) -> None:
    """Check, offline, that the tasks needing a licence have a well-formed one.

    Raises
    ------
    InputError
        Naming the task, where to get a free academic licence and how to pass it.
    """
    for task in tasks:
        if not task_spec(task).needs_license:
            continue
        if not key:
            raise InputError(
                f"task {task} needs TotalSegmentator's licence (free for academic use: {LICENSE_URL}); "
                "pass it with --license aca_XXXXXXXXXXXXXX or set it once with `totalseg_set_license -l KEY`"
            )
        problem = _license_format_problem(key)
        if problem:
            raise InputError(f"--license: TotalSegmentator licence numbers {problem}; got {key!r}")


def private_config(key: str | None) -> dict[str, Any]:
    """The ``config.json`` of a private TotalSegmentator home.

    The keys TotalSegmentator's ``setup_totalseg`` writes, with usage statistics off and
    the disclaimer marked as shown, plus ``license_number`` as ``totalseg_set_license -sv``
    stores it (no online validation).
    """
    cfg: dict[str, Any] = {
        "totalseg_id": "totalseg_bodyage",
        "send_usage_stats": False,
        "prediction_counter": 0,
        "statistics_disclaimer_shown": True,
    }
    if key:
        cfg["license_number"] = key
    return cfg


def write_private_home(home: Path, key: str | None) -> Path:
    """Create a private TotalSegmentator home holding :func:`private_config`; return config.json."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    path.write_text(json.dumps(private_config(key), indent=4), encoding="utf-8")
    return path
