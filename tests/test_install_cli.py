"""The install variants and the command line's shared spellings (issue 18 items 3 and 4).

TotalSegmentator is an optional extra: ``segment`` without it says how to install it,
``segment --from`` and the label table work without it. ``--device`` takes the same values
on every compute command (``gpu`` an alias of ``cuda``), ``--threads`` sets torch's threads
before the library call, folds are numbered alike on screen and in files, and figures and
LaTeX tables show readable region names.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from segment_factories import export_region_folders, make_study
from typer.testing import CliRunner

from bodyage._typing import DEVICES, QC_FLAGS
from bodyage.device import DEVICE_HELP, normalize_device, resolve_device, resolve_threads
from bodyage.errors import InputError
from bodyage.regions import TISSUE_ID_OFFSET, combined_label_table, display_name, totalsegmentator_class_map
from bodyage.ts_classes import CLASS_MAPS
from cli.app import app

runner = CliRunner()

#: the compute commands (clocks where present): each takes --device and --threads
COMPUTE_COMMANDS = tuple(
    c
    for c in ("train", "attribute", "segment", "bench", "demo", "clocks")
    if c in {cmd.name for cmd in app.registered_commands}
)


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def keep_threads():
    """Restore torch's thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_totalsegmentator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import totalsegmentator...`` fail as in the minimal install (``None`` in sys.modules)."""
    for name in [m for m in sys.modules if m == "totalsegmentator" or m.startswith("totalsegmentator.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "totalsegmentator", None)
    monkeypatch.setitem(sys.modules, "totalsegmentator.map_to_binary", None)
    with pytest.raises(ImportError):
        import totalsegmentator.map_to_binary  # noqa: F401


# ---------------------------------------------------------------- --device


def test_device_registry_accepts_gpu_for_cuda() -> None:
    assert [normalize_device(d) for d in (*DEVICES, "gpu")] == ["auto", "cpu", "cuda", "cuda"]
    with pytest.raises(InputError, match=r"--device must be auto, cpu or cuda, got 'tpu' \(gpu is accepted for cuda\)"):
        normalize_device("tpu")


def test_gpu_resolves_to_the_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from bodyage import totalseg

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("gpu", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert totalseg.resolve_device("cuda", local_rank=1) == totalseg.resolve_device("gpu", local_rank=1) == "gpu:1"


def test_no_cuda_is_one_error_for_both_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    from bodyage import totalseg

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "gpu"):
        with pytest.raises(InputError, match="--device cuda was requested but torch sees no CUDA device"):
            resolve_device(name)
        with pytest.raises(InputError, match=rf"--device {name}: no CUDA device is visible"):
            totalseg.resolve_device(name)


@pytest.mark.parametrize("command", COMPUTE_COMMANDS)
def test_every_compute_command_documents_the_same_device_and_threads(command: str) -> None:
    res = runner.invoke(app, [command, "--help"])
    assert res.exit_code == 0, res.output
    text = _flat(res.output)
    assert _flat(DEVICE_HELP) in text, f"{command} --help: {text}"
    assert "--threads" in text


def _recorder(calls: dict[str, Any], result: Any):
    def fake(*args: Any, **kwargs: Any) -> Any:
        calls.update(kwargs, threads=torch.get_num_threads(), device=normalize_device(kwargs.get("device", "auto")))
        return result

    return fake


def _invoke(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str]) -> dict[str, Any]:
    """Run ``command`` with its library call replaced; return what the library received."""
    calls: dict[str, Any] = {}
    if command == "train":
        monkeypatch.setattr("bodyage.train.train_run", _recorder(calls, SimpleNamespace(metrics={})))
        args = ["train", str(tmp_path / "study"), "--run", str(tmp_path / "run")]
    elif command == "attribute":
        monkeypatch.setattr("bodyage.attribute.attribute_run", _recorder(calls, SimpleNamespace(merged=False)))
        args = ["attribute", str(tmp_path / "run")]
    elif command == "segment":
        summary = SimpleNamespace(line=lambda: "segmented")
        monkeypatch.setattr("bodyage.segment.segment_study", _recorder(calls, summary))
        args = ["segment", str(tmp_path / "study")]
    elif command == "bench":
        monkeypatch.setattr("bodyage.bench.run_bench", _recorder(calls, {}))
        args = ["bench", "--json"]
    else:
        raise AssertionError(command)
    res = runner.invoke(app, [*args, *extra])
    assert res.exit_code == 0, res.output
    return calls


@pytest.mark.parametrize("command", ["train", "attribute", "segment", "bench"])
def test_gpu_and_threads_parse_on_every_command(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_threads: None
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    calls = _invoke(command, tmp_path, monkeypatch, ["--device", "gpu", "--threads", "3"])
    assert calls["device"] == "cuda" and calls["threads"] == 3


def test_threads_default_follows_omp_then_slurm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_threads: None
) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _invoke("train", tmp_path, monkeypatch, [])["threads"] == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _invoke("train", tmp_path, monkeypatch, [])["threads"] == 3
    assert _invoke("train", tmp_path, monkeypatch, ["--threads", "2"])["threads"] == 2


def test_resolve_threads_names_a_bad_variable() -> None:
    assert resolve_threads(None, {}) is None
    assert resolve_threads(4, {"OMP_NUM_THREADS": "1"}) == 4
    with pytest.raises(InputError, match=r"OMP_NUM_THREADS='two' is not a positive integer"):
        resolve_threads(None, {"OMP_NUM_THREADS": "two"})
    with pytest.raises(InputError, match="--threads must be at least 1, got 0"):
        resolve_threads(0, {})


def test_threads_below_one_is_a_usage_error() -> None:
    res = runner.invoke(app, ["bench", "--threads", "0"])
    assert res.exit_code == 2


@pytest.mark.parametrize("command", ["train", "attribute", "bench"])
def test_unknown_device_is_one_line_on_every_command(command: str, tmp_path: Path) -> None:
    args = {
        "train": ["train", str(tmp_path / "study"), "--run", str(tmp_path / "run")],
        "attribute": ["attribute", str(tmp_path / "run")],
        "bench": ["bench", "--quick"],
    }[command]
    res = runner.invoke(app, [*args, "--device", "tpu"])
    assert res.exit_code == 1, res.output
    assert "--device must be auto, cpu or cuda, got 'tpu'" in res.output


def test_segment_takes_cuda_and_refuses_tpu(tmp_path: Path) -> None:
    res = runner.invoke(app, ["segment", str(tmp_path / "study"), "--device", "tpu"])
    assert res.exit_code == 1
    assert "--device must be auto, cpu or cuda, got 'tpu'" in res.output


# ---------------------------------------------------------------- TotalSegmentator is optional


def test_segment_without_totalsegmentator_says_how_to_install_it(tmp_path: Path, no_totalsegmentator: None) -> None:
    res = runner.invoke(app, ["segment", str(tmp_path / "study")])
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: TotalSegmentator is not installed")
    assert "pip install 'bodyage[segment]'" in lines[0] and "--from DIR" in lines[0]


def test_segment_from_masks_works_without_totalsegmentator(tmp_path: Path, no_totalsegmentator: None) -> None:
    study = make_study(tmp_path / "study")
    export_region_folders(study, tmp_path / "ts")
    res = runner.invoke(app, ["--quiet", "segment", str(study), "--from", str(tmp_path / "ts")])
    assert res.exit_code == 0, res.output
    assert (study / "masks" / "qc.csv").is_file()


def test_label_table_falls_back_to_the_shipped_copy(no_totalsegmentator: None) -> None:
    table = combined_label_table()
    assert table.ids == list(range(1, 54))
    assert table.names[1] == "spleen" and table.names[51] == "subcutaneous_fat"
    assert totalsegmentator_class_map("total_mr") == CLASS_MAPS["total_mr"]
    with pytest.raises(InputError, match=r"task 'total_ct' is not one of .* pip install 'bodyage\[segment\]'"):
        totalsegmentator_class_map("total_ct")


def test_shipped_label_table_equals_totalsegmentators() -> None:
    ts = pytest.importorskip(
        "totalsegmentator.map_to_binary", reason="TotalSegmentator is not installed (pip install 'bodyage[segment]')"
    )
    for task, shipped in CLASS_MAPS.items():
        theirs = {int(k): str(v) for k, v in ts.class_map[task].items()}
        assert shipped == theirs, f"bodyage/ts_classes.py differs from TotalSegmentator's class_map[{task!r}]"
    table = combined_label_table()
    for ts_id, name in CLASS_MAPS["tissue_types_mr"].items():
        assert table.names[TISSUE_ID_OFFSET + ts_id] == name


# ---------------------------------------------------------------- help, folds, names


def test_train_help_lists_only_existing_qc_flags() -> None:
    res = runner.invoke(app, ["train", "--help"])
    text = _flat(res.output)
    start = text.index("--exclude-qc")
    part = text[start : text.index("--", start + 5)]
    for flag in QC_FLAGS:
        assert flag in part
    assert "nan" not in part.replace("nonfinite", "")


def test_display_name() -> None:
    assert display_name("gluteus_maximus_left") == "gluteus maximus (left)"
    assert display_name("kidney_right") == "kidney (right)"
    assert display_name("portal_vein_and_splenic_vein") == "portal vein and splenic vein"
    assert display_name("liver") == "liver"
    assert display_name("(whole body)") == "(whole body)"
    assert display_name("left") == "left"
    assert all("_" not in display_name(r) for r in combined_label_table().regions)


def test_folds_are_numbered_alike_on_screen_and_in_files(tiny_study: Path, tmp_path: Path) -> None:
    import pandas as pd

    from bodyage.train import TrainConfig, train_run

    labels: list[str] = []

    class Recording:
        def task(self, description: str, total: int | None) -> Any:
            labels.append(description)
            return SimpleNamespace(advance=lambda *a, **k: None, close=lambda: None)

    run = tmp_path / "run"
    cfg = TrainConfig(folds=2, epochs=1, grid=(16, 12, 32), batch_size=4, model_kwargs={"widths": [4, 8, 8]})
    train_run(tiny_study, run, cfg, device="cpu", progress=Recording())
    shown = sorted(d for d in labels if d.startswith("fold "))
    assert shown == ["fold 0 (folds 0-1)", "fold 1 (folds 0-1)"]
    assert sorted(p.name for p in (run / "models").glob("fold?.pt")) == ["fold0.pt", "fold1.pt"]
    assert set(pd.read_parquet(run / "predictions.parquet")["fold"]) == {0, 1}
