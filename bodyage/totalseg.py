"""The TotalSegmentator backend: the only module of bodyage that runs TotalSegmentator.

Two halves:

- **checks that need no torch** (importable anywhere, used before anything is loaded),
  in :mod:`bodyage.totalseg_checks` and importable from here too: which weights folders
  a task needs (:func:`required_weights`, read from TotalSegmentator's own
  ``map_tasks_config``), whether they are there and complete (:func:`check_weights`),
  where the user keeps them (:func:`default_weights_dir`), the licence of
  ``tissue_types_mr`` (:func:`resolve_license`, :func:`check_license`);
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
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bodyage.errors import InputError, SegmentationError, WeightsMissingError
from bodyage.totalseg_checks import CHECKPOINT as CHECKPOINT
from bodyage.totalseg_checks import DEFAULT_PLANS as DEFAULT_PLANS
from bodyage.totalseg_checks import INSTALL_HINT as INSTALL_HINT
from bodyage.totalseg_checks import LICENSE_URL as LICENSE_URL
from bodyage.totalseg_checks import TASK_SPECS as TASK_SPECS
from bodyage.totalseg_checks import TaskSpec as TaskSpec
from bodyage.totalseg_checks import WeightsFolder as WeightsFolder
from bodyage.totalseg_checks import _ts_version as _ts_version
from bodyage.totalseg_checks import check_license as check_license
from bodyage.totalseg_checks import check_weights as check_weights
from bodyage.totalseg_checks import default_weights_dir as default_weights_dir
from bodyage.totalseg_checks import install_hint as install_hint
from bodyage.totalseg_checks import private_config as private_config
from bodyage.totalseg_checks import require_totalsegmentator as require_totalsegmentator
from bodyage.totalseg_checks import required_weights as required_weights
from bodyage.totalseg_checks import resolve_license as resolve_license
from bodyage.totalseg_checks import task_spec as task_spec
from bodyage.totalseg_checks import user_home_dir as user_home_dir
from bodyage.totalseg_checks import weights_available as weights_available
from bodyage.totalseg_checks import weights_problem as weights_problem
from bodyage.totalseg_checks import write_private_home as write_private_home

log = logging.getLogger("bodyage.totalseg")

#: environment variables the session sets (ours) or TotalSegmentator sets (nnU-Net's)
TOUCHED_ENV = ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


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
