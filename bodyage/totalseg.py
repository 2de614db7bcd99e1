"""The TotalSegmentator backend: the only module of bodyage that runs TotalSegmentator.

Two halves:

- **checks that need no torch** (importable anywhere, used before anything is loaded):
  which weights folders a task needs (:func:`required_weights`, read from
  TotalSegmentator's own ``map_tasks_config``), whether they are there and complete
  (:func:`check_weights`), where the user keeps them (:func:`default_weights_dir`), the
  licence of ``tissue_types_mr`` (:func:`resolve_license`, :func:`check_license`);
- **a session** (:class:`TotalSegmentatorSession`) that runs
  ``totalsegmentator.python_api.totalsegmentator`` on in-memory images, offline and
  privately: its own ``TOTALSEG_HOME_DIR`` (a temporary folder) with a ``config.json``
  written before the first call (``send_usage_stats: false``, the licence set the way
  ``totalseg_set_license -sv`` sets it), the user's weights folder passed read-only as
  ``TOTALSEG_WEIGHTS_PATH``, and TotalSegmentator's own download step replaced by the
  check above, so a missing model is a :class:`~bodyage.errors.WeightsMissingError` and
  never a network request (nor a deletion of "old" weights, which its downloader does
  in the weights folder). Every global it touches (environment variables, that
  function, torch's thread count and cuDNN flag, ``sys.stdout``) is restored on exit.

Why a private home per job: TotalSegmentator keeps one ``config.json`` per home, rewrites
it after every prediction (a counter) and uploads usage statistics unless it says
otherwise; parallel jobs sharing a home can read each other's half-written file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bodyage._typing import SEGMENT_TASKS, SegmentTask
from bodyage.errors import InputError, SegmentationError, WeightsMissingError
from bodyage.regions import TISSUE_ID_OFFSET

log = logging.getLogger("bodyage.totalseg")

#: where a free academic licence for the licensed tasks is issued
LICENSE_URL = "https://backend.totalsegmentator.com/license-academic/"
#: TotalSegmentator's default plans identifier (``python_api.totalsegmentator(plans=...)``)
DEFAULT_PLANS = "nnUNetPlans"
#: checkpoint file name nnU-Net v2 loads for each fold
CHECKPOINT = "checkpoint_final.pth"
#: environment variables the session sets (ours) or TotalSegmentator sets (nnU-Net's)
TOUCHED_ENV = ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


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


# ---------------------------------------------------------------- device (torch)


def resolve_device(device: str, local_rank: int = 0) -> str:
    """Turn ``auto|cpu|cuda`` (or ``gpu``) into TotalSegmentator's device string (``cpu`` or ``gpu:N``).

    Under torchrun each local rank takes its own GPU (``local_rank % visible GPUs``).

    Raises
    ------
    InputError
        For an unknown device, or if ``cuda`` is asked for and no CUDA device is visible
        (TotalSegmentator would silently fall back to the CPU, hours per scan).
    """
    from bodyage.device import normalize_device

    name = normalize_device(device)
    if name == "cpu":
        return "cpu"
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        if name == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            raise InputError(
                f"--device {device}: no CUDA device is visible (CUDA_VISIBLE_DEVICES={visible}); "
                "use --device cpu or auto"
            )
        return "cpu"
    return f"gpu:{local_rank % n}"


# ---------------------------------------------------------------- the session (torch, TotalSegmentator)


def _ts_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("TotalSegmentator")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str], also_restore: Sequence[str] = ()) -> Iterator[None]:
    """Set environment variables; on exit restore them and ``also_restore`` to their old state."""
    keys = list(dict.fromkeys([*values, *also_restore]))
    saved = {k: os.environ.get(k) for k in keys}
    try:
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def patched_attribute(obj: object, name: str, value: object) -> Iterator[None]:
    """Replace ``obj.name`` for the duration; restore it on exit (missing attribute: no-op)."""
    if not hasattr(obj, name):
        log.debug("%r has no attribute %s; not patched", obj, name)
        yield
        return
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class TotalSegmentatorSession:
    """Run TotalSegmentator offline, privately and with every global restored afterwards.

    Use as a context manager around a batch of scans::

        with TotalSegmentatorSession(["total_mr"], fast=False, device="gpu:0",
                                     weights_dir=w, license_key=None) as ts:
            labels = ts.segment(data, affine, "total_mr")

    Parameters
    ----------
    tasks
        Tasks the session will run (their weights are checked on entry).
    fast
        Use the lower-resolution model where the task has one.
    device
        ``cpu`` or ``gpu:N`` (see :func:`resolve_device`).
    weights_dir
        The user's (read-only) weights folder.
    license_key
        Licence for licensed tasks (already checked by :func:`check_license`).
    tmp_root
        Where the private home is created (default: the system's temporary folder).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        fast: bool,
        device: str,
        weights_dir: str | os.PathLike[str],
        license_key: str | None,
        tmp_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.tasks = tuple(tasks)
        self.fast = fast
        self.device = device
        self.weights_dir = Path(weights_dir)
        self.license_key = license_key
        self.tmp_root = tmp_root
        self.home: Path | None = None
        self._stack: contextlib.ExitStack | None = None
        self._run: Callable[..., Any] | None = None

    def __enter__(self) -> TotalSegmentatorSession:
        check_license(self.tasks, self.license_key)
        checked = check_weights(self.tasks, fast=self.fast, weights_dir=self.weights_dir)
        stack = contextlib.ExitStack()
        try:
            home = Path(tempfile.mkdtemp(prefix="bodyage-totalseg-", dir=self.tmp_root))
            stack.callback(shutil.rmtree, home, True)
            write_private_home(home, self.license_key)
            stack.enter_context(
                patched_environ(
                    {"TOTALSEG_HOME_DIR": str(home), "TOTALSEG_WEIGHTS_PATH": str(self.weights_dir)},
                    also_restore=TOUCHED_ENV,
                )
            )
            import torch

            threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
            stack.callback(torch.set_num_threads, threads)
            stack.callback(setattr, torch.backends.cudnn, "benchmark", benchmark)
            from totalsegmentator import python_api

            stack.enter_context(patched_attribute(python_api, "download_pretrained_weights", self._guard(checked)))
            if any(task_spec(t).needs_license for t in self.tasks):
                status, message = python_api.has_valid_license_offline()
                if status != "yes":  # pragma: no cover - check_license ran first
                    raise InputError(f"TotalSegmentator does not accept the licence: {message}")
            self._run = python_api.totalsegmentator
        except BaseException:
            stack.close()
            raise
        self.home = home
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = None
        self._run = None

    def _guard(self, checked: Sequence[WeightsFolder]) -> Callable[[int], None]:
        ok = {f.task_id for f in checked}

        def download_pretrained_weights(task_id: int) -> None:
            # replaces TotalSegmentator's downloader: no network, no deletions in a shared folder
            if task_id not in ok:
                raise WeightsMissingError(
                    f"TotalSegmentator asked for model {task_id}, which bodyage did not check; it would download "
                    f"it. Install it in {self.weights_dir} on a machine with internet (totalseg_download_weights)"
                )

        return download_pretrained_weights

    def segment(
        self, data: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], task: str
    ) -> npt.NDArray[np.uint8]:
        """Segment one 3D image with one task; return TotalSegmentator's label ids on the same grid.

        Parameters
        ----------
        data
            Raw scanner intensities, shape ``(X, Y, Z)`` (never normalised: TotalSegmentator
            resamples as integers).
        affine
            4×4 voxel-to-world matrix.
        task
            One of the session's tasks.

        Raises
        ------
        WeightsMissingError
            If TotalSegmentator tries to fetch weights (a connection error included).
        SegmentationError
            If TotalSegmentator exits or returns a map on another grid.
        """
        if self._run is None:
            raise SegmentationError("TotalSegmentatorSession.segment called outside its `with` block")
        import nibabel as nib
        import requests

        spec = task_spec(task)
        img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                seg = self._run(
                    img,
                    None,
                    ml=True,
                    task=spec.name,
                    fast=self.fast and spec.has_fast,
                    device=self.device,
                    quiet=True,
                    nr_thr_resamp=1,
                    nr_thr_saving=1,
                    license_number=None,  # already in the private config.json; passing it validates online
                )
        except requests.exceptions.RequestException as err:
            raise WeightsMissingError(
                f"TotalSegmentator tried to reach the network for task {task} ({type(err).__name__}); "
                + install_hint(task, fast=self.fast)
            ) from err
        except SystemExit as err:  # TotalSegmentator calls sys.exit on some errors; the library must not exit
            said = " ".join(out.getvalue().split())[-300:]
            raise SegmentationError(f"TotalSegmentator stopped (exit {err.code}) on task {task}: {said}") from err
        finally:
            for line in out.getvalue().splitlines():
                if line.strip():
                    log.debug("TotalSegmentator: %s", line)
        labels = np.asarray(seg.dataobj).astype(np.uint8)
        if labels.shape != tuple(img.shape) or not np.allclose(seg.affine, img.affine, atol=1e-3):
            raise SegmentationError(
                f"TotalSegmentator returned task {task} on grid {labels.shape} instead of the input grid {img.shape}"
            )
        return labels


def version_info(weights: Sequence[WeightsFolder], weights_dir: Path) -> dict[str, Any]:
    """What to record in ``run.json`` about TotalSegmentator and the weights used."""
    return {
        "totalsegmentator": _ts_version(),
        "weights_dir": str(weights_dir),
        "models": [{"task": w.task, "task_id": w.task_id, "folder": w.folder, "model": w.model} for w in weights],
    }
