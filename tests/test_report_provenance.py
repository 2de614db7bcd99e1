"""reports/provenance.py: the revision, machine, load, time and command the scripts of reports/ record."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from report_scripts import REPORTS, load_report_script

ROOT = Path(__file__).resolve().parents[1]

prov = load_report_script("provenance")
dev = load_report_script("dev_selection")

#: an absolute path of a machine (POSIX or Windows), as tests/test_docs.py looks for in documents
MACHINE_PATH = re.compile(r"(?<![\w.])(/[A-Za-z]+/|[A-Za-z]:\\)")


def test_neutral_command_leaves_no_machine_path() -> None:
    argv = ["/opt/venv/bin/bodyage", "train", "/scratch/x/study", "--run", "/scratch/x/study_runs/s1"]
    names = {"/scratch/x/study": "study", "/scratch/x/study_runs/s1": "run_s1"}
    cmd = prov.neutral_command(argv, names)
    # the program by its name; the longer path first, so the run is not read as the study plus a tail
    assert cmd == "bodyage train study --run run_s1"
    assert not MACHINE_PATH.search(cmd)
    assert prov.neutral_command("bodyage qc /scratch/x/study", names) == "bodyage qc study"


def test_machine_has_the_keys_the_committed_results_carry() -> None:
    plain, bf16 = prov.machine(), prov.machine(bf16=True)
    assert list(plain) == ["cpu_model", "cpu_count", "platform"]
    assert list(bf16) == ["cpu_model", "cpu_count", "amx_bf16", "avx512_bf16", "platform"]
    assert isinstance(bf16["amx_bf16"], bool) and isinstance(bf16["avx512_bf16"], bool)
    assert plain["cpu_count"] >= 1 and plain["platform"]
    # docs_results writes machine() into demo.json, learning_curve machine(bf16=True) into each row
    demo = json.loads((ROOT / "docs" / "results" / "demo.json").read_text(encoding="utf-8"))
    assert list(demo["source"]["machine"]) == list(plain)
    for row in json.loads((ROOT / "docs" / "results" / "learning_curve.json").read_text(encoding="utf-8")):
        assert list(row["machine"]) == list(bf16)


def test_dev_selection_machine_keys_are_those_attribution_seeds_committed() -> None:
    seeds = json.loads((ROOT / "docs" / "results" / "attribution_seeds.json").read_text(encoding="utf-8"))
    committed = list(seeds["source"]["machine"])
    assert list(dev.machine()) == committed[: len(dev.machine())]


def test_revision_is_the_short_hash_and_git_failing_is_empty() -> None:
    short = prov.git("rev-parse", "--short", "HEAD")
    if not short:
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{4,40}", short)
    assert prov.short_revision() == short
    assert prov.revision() in (short, short + "+dirty")  # others may commit between the calls: either
    assert isinstance(prov.uncommitted_changes(), bool)
    assert prov.git("no-such-subcommand") == ""


def test_uptime_loads_summarises_the_one_minute_load() -> None:
    text = (
        " 10:00:01 up 1 day,  2 users,  load average: 1.00, 0.50, 0.25\n"
        "noise\n"
        " 10:01:01 up 1 day,  2 users,  load average: 2.50, 0.60, 0.30\n"
    )
    assert prov.uptime_loads(text, digits=1) == {"n": 2, "min": 1.0, "mean": 1.8, "max": 2.5}
    assert prov.uptime_loads(text, digits=2)["mean"] == 1.75
    assert prov.uptime_loads("no load here\n", digits=1) is None


def test_load_average_and_times() -> None:
    load = prov.load_average(1)
    assert len(load) == 3 and all(x == round(x, 1) for x in load)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", prov.utc_minute())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", prov.now_iso())


def test_write_json_makes_the_folder_and_passes_options_on(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    prov.write_json(path, {"x": "ü"}, indent=1, ensure_ascii=False)
    assert path.read_text(encoding="utf-8") == '{\n "x": "ü"\n}\n'
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        prov.write_json(path, {"x": math.nan}, allow_nan=False)


def test_only_provenance_asks_git_and_lscpu() -> None:
    """The scripts take the revision and the CPU from the shared module instead of a copy of their own."""
    offenders = [
        p.name
        for p in sorted(REPORTS.glob("*.py"))
        if p.name != "provenance.py" and re.search(r'"lscpu"|"rev-parse"|def _git\b', p.read_text(encoding="utf-8"))
    ]
    assert offenders == []


@pytest.mark.parametrize("script", ["clock_borders", "docs_results", "learning_curve", "attribution_seeds"])
def test_scripts_import_the_shared_module_when_run_as_files(script: str, tmp_path: Path) -> None:
    # as `python reports/NAME.py`, here from another folder: reports/ is on the path through the script's own
    res = subprocess.run(
        [sys.executable, str(REPORTS / f"{script}.py"), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:")


def test_cpu_flags_reads_the_named_lscpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prov, "_lscpu", lambda: ("AMD EPYC", frozenset({"avx2", "avx512f"})))
    assert prov.cpu_flags(["avx2", "amx_bf16"]) == {"avx2": True, "amx_bf16": False}
    monkeypatch.setattr(prov, "_lscpu", lambda: (None, frozenset()))
    assert prov.cpu_flags(["avx2"]) == {}
