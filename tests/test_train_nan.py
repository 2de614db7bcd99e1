"""`bodyage train` stops at a NaN or infinite loss instead of checkpointing a diverged model.

Tiny runs as in test_train.py (16×12×32 grid, 2 folds, 2 epochs, seconds each).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from bodyage.errors import RunError
from bodyage.train import TrainConfig, train_run
from cli.app import app

runner = CliRunner()

TINY = TrainConfig(folds=2, epochs=2, grid=(16, 12, 32), model_kwargs={"widths": [4, 8, 8]}, batch_size=4)
TINY_ARGS = ["--folds", "2", "--epochs", "2", "--grid", "16,12,32", "--batch-size", "4"]
TINY_ARGS += ["--model-options", '{"widths": [4, 8, 8]}', "--precision", "fp32", "--quiet"]
HINT = r"lower --lr \(in a new --run folder\) or check the scans' intensities$"


class _PoisonAfter:
    """A progress display that sets ``poisoned`` once ``n`` epochs have finished."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.poisoned = False

    def task(self, description: str, total: int | None) -> _PoisonAfter:
        return self

    def advance(self, n: int = 1, **fields: object) -> None:
        if fields:  # an epoch finished (the preprocess bar advances without fields)
            self.left -= 1
            self.poisoned = self.left <= 0

    def close(self) -> None:
        pass


def _nan_loss_after(monkeypatch: pytest.MonkeyPatch, n_epochs: int) -> _PoisonAfter:
    """From epoch ``n_epochs`` on (counted over all folds), every training loss is NaN, as after a divergence."""
    import torch

    poison = _PoisonAfter(n_epochs)
    l1 = torch.nn.functional.l1_loss

    def l1_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = l1(*args, **kwargs)
        return loss * float("nan") if poison.poisoned else loss  # still on the graph: NaN gradients

    monkeypatch.setattr(torch.nn.functional, "l1_loss", l1_loss)
    return poison


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_epoch(
    tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    run, cache = tmp_path / "run", tmp_path / "cache"
    cfg = replace(TINY, precision="fp32")
    with monkeypatch.context() as m:
        poison = _nan_loss_after(m, 3)  # fold 0: epochs 0 and 1; fold 1: epoch 0, then NaN
        with pytest.raises(RunError, match=rf"^fold 1, epoch 1: training loss is nan; {HINT}") as err:
            train_run(tiny_study, run, cfg, cache_dir=cache, progress=poison, figures=False)
    assert "\n" not in str(err.value)
    models = run / "models"
    assert (models / "fold0.pt").is_file() and (models / "fold0.predictions.parquet").is_file()
    assert not (models / "fold1.pt").exists() and not (run / "predictions.parquet").exists()
    state = torch.load(models / "fold1.partial.pt", weights_only=True)
    assert state["epoch"] == 0  # the NaN epoch was not checkpointed
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    # another learning rate in the same folder is refused (its run.json has the old settings) ...
    with pytest.raises(RunError, match="was started with other settings"):
        train_run(tiny_study, run, replace(cfg, lr=1e-3), cache_dir=cache, figures=False)
    # ... and the same settings resume fold 1 from its last good epoch
    res = train_run(tiny_study, run, cfg, cache_dir=cache, figures=False)
    assert (res.folds_skipped, res.folds_trained) == (1, 1)
    assert np.isfinite(res.metrics["overall"]["mae"])


def test_nan_validation_predictions_stop_the_run(
    tiny_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # finite training losses, NaN predictions in eval mode: what overflowing batch-norm
    # running statistics do while each batch's own statistics stay finite
    import bodyage.train_fold

    predict = bodyage.train_fold.predict

    def nan_predict(*args: Any, **kwargs: Any) -> np.ndarray:
        return predict(*args, **kwargs) * np.nan

    monkeypatch.setattr(bodyage.train_fold, "predict", nan_predict)
    cfg = replace(TINY, precision="bf16")
    with pytest.raises(
        RunError,
        match=r"^fold 0, epoch 0: inner-validation MAE is nan; lower --lr \(in a new --run folder\), "
        r"train in --precision fp32 or check the scans' intensities$",
    ):
        train_run(tiny_study, tmp_path / "run", cfg, cache_dir=tmp_path / "cache", figures=False)
    assert not (tmp_path / "run" / "models" / "fold0.partial.pt").exists()


def test_cli_a_diverging_learning_rate_is_one_error_line(tiny_study: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(tiny_study), "--run", str(run), *TINY_ARGS, "--lr", "1e30"])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: fold 0, epoch 0: training loss is "), lines
    assert lines[0].endswith("lower --lr (in a new --run folder) or check the scans' intensities")
    assert "Traceback" not in res.output
    assert not (run / "models" / "fold0.pt").exists() and not (run / "models" / "fold0.partial.pt").exists()
