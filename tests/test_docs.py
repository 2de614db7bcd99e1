"""The documentation: measured numbers come from scripts, pages fill them in, nothing points outside.

The strict site build itself runs in ``make docs`` (part of ``make test``); these tests
check the pieces that make it honest, in milliseconds and without MkDocs installed.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from report_scripts import load_report_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


hooks = load_report_script("docs_hooks")
docs_results = load_report_script("docs_results")
readme_summary = load_report_script("readme_summary")


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def demo_dir(tmp_path: Path) -> Path:
    """A demo folder with the files docs_results.py reads, shaped like the real ones."""
    demo = tmp_path / "demo"
    record = {"bodyage_version": "9.9.9", "git_revision": "abc1234", "packages": {"torch": "2.0"}}
    times = {"started": "2026-01-01T10:00:00+00:00", "finished": "2026-01-01T10:01:00+00:00"}
    _write(demo / "study" / "study.json", times)
    _write(
        demo / "run" / "run.json",
        record | {"started": "2026-01-01T10:01:00+00:00", "finished": "2026-01-01T10:07:00+00:00"},
    )
    _write(
        demo / "run" / "metrics.json",
        {
            "overall": {"n": 347, "mae": 2.4, "rmse": 3.0, "r2": 0.92, "pearson_r": 0.96},
            "folds": {"1": {"n": 70, "mae": 2.3, "r2": 0.9, "pearson_r": 0.95}, "0": {"n": 69, "mae": 2.5}},
            "oracle_mae": 1.6,
            "mae_ratio": 1.5,
            "baseline_mae": 9.1,
            "informative": True,
        },
    )
    floors = {"volume": 0.25, "volume_intensity": 0.375, "signal_spread": 0.5, "univariate_screen": 0.5}
    nulls = {
        "random_weights": {"precision_at_k": 0.25, "ci_low": 0.1, "ci_high": 0.4},
        "permuted_labels": {"precision_at_k": 0.125, "ci_low": 0.0, "ci_high": 0.3},
    }
    _write(
        demo / "run" / "recovery.json",
        {
            "scenario": "default",
            "n_scans": 347,
            "methods": {
                "ablation": {
                    "k": 8,
                    "precision_at_k": 0.875,
                    "spearman": 0.6,
                    "top_regions": ["liver", "torso_fat"] + ["r"] * 10,
                    "agreement_with_ablation": 1.0,
                    "floors": floors,
                    "nulls": nulls,
                },
                "gradcam": {"k": 8, "precision_at_k": 0.5, "spearman": float("nan"), "top_regions": []},
            },
            "phenotypes": {
                "diabetes": {
                    "planted": True,
                    "gap_effect": 2.1,
                    "ci_low": 1.3,
                    "ci_high": 3.0,
                    "q": 5e-6,
                    "planted_regions": ["liver", "pancreas"],
                    "significant_regions": {"ablation": ["liver"], "gradcam": []},
                },
                "smoking": {"planted": False, "gap_effect": -0.3, "ci_low": -1.2, "ci_high": 0.6, "q": 0.7},
            },
            "goals": {
                "mae_ratio": {"goal": "MAE / oracle MAE <= 1.55", "value": 1.5, "met": True},
                "smoking_null": {"goal": "smoking significant nowhere", "value": {"q": 0.7}, "met": True},
                "gradcam_precision_at_k": {"goal": "...", "value": None, "met": None},
            },
        },
    )
    _write(
        demo / "run" / "sanity.json",
        {
            "methods": {
                "gradcam": {
                    "importance_measure": "abs_mass",
                    "by_measure": {"abs_mass": {"cohort_rho_trained_random": 0.8, "passed": False}},
                }
            }
        },
    )
    _write(
        demo / "run" / "attribute.json",
        {
            "arguments": {"nulls": {"copies": 3, "permuted": True, "scans": 100, "permuted_folds": 2}},
            "cost": {"trained_attribute": {"wall": 50.0, "cpu": 97.0}, "permuted_train": {"wall": 60.0, "cpu": 119.0}},
        },
    )
    (demo / "run" / "figures").mkdir(parents=True)
    (demo / "run" / "figures" / "predicted_vs_age.png").write_bytes(b"\x89PNG")
    return demo


def test_fill_renders_values_formats_tables_and_missing_results() -> None:
    results = {"demo": {"mae": 2.4049, "flag": True, "none": None, "t": {"columns": ["a", "b|c"], "rows": [[1, None]]}}}
    text = "MAE {{ results.demo.mae:.2f }}, {{ results.demo.flag }}, {{ results.demo.none }}\n{{ results.demo.t }}"
    out = hooks.fill(text, results, DOCS, "results/validation.md")
    assert out.startswith("MAE 2.40, yes, *not measured yet*")
    assert "| a | b\\|c |" in out and "| 1 | *not measured yet* |" in out
    # a results file that is not there yet: the page still builds and says so (no emphasis inside code)
    assert hooks.fill("{{ results.bench.seconds }}", results, DOCS) == hooks.NOT_MEASURED
    assert hooks.fill("run `{{ results.bench.command }}`", results, DOCS) == "run `not measured yet`"


def test_fill_warns_for_a_key_the_results_file_lacks(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.results"):
        out = hooks.fill("{{ results.demo.maee }}", {"demo": {"mae": 1.0}}, DOCS, "results/validation.md")
    assert out == hooks.NOT_MEASURED
    assert "results/validation.md: docs/results/demo.json has no key 'maee'" in caplog.text


def test_figure_placeholder_links_an_existing_file_relative_to_the_page(tmp_path: Path) -> None:
    (tmp_path / "results" / "figures").mkdir(parents=True)
    (tmp_path / "results" / "figures" / "a.png").write_bytes(b"")
    page = "{{ figure results/figures/a.png | Caption here }} {{ figure results/figures/b.png | B }}"
    out = hooks.fill(page, {}, tmp_path, "results/validation.md")
    assert "![Caption here](../results/figures/a.png)" in out
    assert "*not measured yet* (figure `results/figures/b.png`)" in out


def test_design_mentions_in_docstrings_link_to_the_design_page() -> None:
    html = "<p>the study folder (DESIGN.md §3) and DESIGN §7; see DESIGN.md. DESIGNER stays.</p>"
    out = hooks.link_design(html, "api/bodyage.md")
    assert '<a href="../design.html#s3">design §3</a>' in out
    assert '<a href="../design.html#s7">design §7</a>' in out
    assert '<a href="../design.html">design notes</a>' in out and "DESIGNER" in out
    newer = hooks.link_design("see docs/design.md §6.", "api/analysis.md")
    assert newer == 'see <a href="../design.html#s6">design §6</a>.'
    sections = set(re.findall(r"\{#s(\d+)\}", (DOCS / "design.md").read_text(encoding="utf-8")))
    assert sections == {str(i) for i in range(1, 10)}


def test_docs_results_writes_every_number_the_results_pages_use(demo_dir: Path, tmp_path: Path) -> None:
    bench = {
        "quick": True,
        "seconds": 12.5,
        "machine": {"torch": "2.0", "torch_threads": 1, "device": "cpu", "gpu": None, "load_average": [1, 1, 1]},
        "comparisons": [
            {"name": "x", "ours": "a", "reference": "b", "ours_s": 0.01, "reference_s": 0.3, "ratio": 30.0, "met": None}
        ],
        "goals": [{"name": "x", "goal": ">= 50", "value": 30.0, "met": False, "reason": "why"}],
        "projection": {"hours": {"train": 7.5, "attribute": {"gradcam": 0.05}}, "total_hours_default_methods": 21.6},
        "peak_memory": {"gradcam": {"rss_mb": 3739.0, "gpu_mb": None}},
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench), encoding="utf-8")
    out = tmp_path / "results"
    args = [str(demo_dir), "--bench", str(tmp_path / "bench.json"), "--out", str(out), "--no-readme"]
    assert docs_results.main(args) == 0
    demo = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert demo["mae"] == 2.4 and demo["source"]["bodyage_version"] == "9.9.9" and demo["goals_met"] == "2 of 2"
    assert demo["minutes"]["simulate"] == pytest.approx(1.0) and demo["minutes"]["total"] == pytest.approx(7.0)
    assert [r[0] for r in demo["tables"]["folds"]["rows"]] == ["0", "1"]
    ablation = demo["tables"]["methods"]["rows"][0]
    assert ablation[:6] == ["`ablation`", 8, "0.88", "0.50", "0.25", "0.12"]
    assert ablation[8] == "liver, torso_fat, r, r, r, r, r, r"
    assert demo["tables"]["methods"]["rows"][1][6] is None  # NaN Spearman: not measured, not "nan"
    assert demo["tables"]["phenotypes"]["rows"][0][4] == "5.0e-06"
    assert demo["tables"]["sanity"]["rows"] == [["`gradcam`", "abs_mass", "0.80", None, None, None, "no"]]
    assert demo["figures"] == ["predicted_vs_age.png"]
    assert demo["null_models"]["settings"]["permuted_folds"] == 2  # the demo's documented subset, named
    assert demo["tables"]["null_cost"]["rows"] == [
        ["the trained model's attribution", "0.8"],
        ["permuted-label model: training", "1.0"],
    ]
    results = hooks.load_results(out)
    assert results["bench"]["tables"]["projection"]["rows"][-1] == ["**total** (default methods)", "21.6"]
    # every placeholder of the results pages names a key the script writes
    for page in ("results/validation.md", "results/performance.md"):
        text = hooks.fill((DOCS / page).read_text(encoding="utf-8"), results, out.parent, page)
        assert "{{" not in text, page


def test_docs_results_refuses_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no run/metrics.json; give the folder `bodyage demo DIR` wrote"):
        docs_results.main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-readme"])


def test_readme_summary_rewrites_only_the_marked_line(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- summary:start -->\nold\n<!-- summary:end -->\nrest\n", encoding="utf-8")
    assert readme_summary.update_readme(readme, tmp_path / "missing.json")
    assert "Not measured yet" in readme.read_text(encoding="utf-8")
    demo = {
        "mae": 2.4,
        "oracle_mae": 1.6,
        "goals_met": "5 of 6",
        "minutes": {"total": 8.04},
        "source": {"bodyage_version": "9.9.9", "machine": {"cpu_model": "Some CPU"}},
        "tables": {"methods": {"rows": [["`ablation`", 8, "0.88", "0.50"]]}},
    }
    (tmp_path / "demo.json").write_text(json.dumps(demo), encoding="utf-8")
    readme_summary.update_readme(readme, tmp_path / "demo.json")
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# x\n<!-- summary:start -->\nMeasured by `bodyage demo` (bodyage 9.9.9, Some CPU):")
    assert "ablation precision@8 0.88 (best model-free floor 0.50)" in text and text.endswith("end -->\nrest\n")
    with pytest.raises(SystemExit, match="has no <!-- summary:start -->"):
        readme_summary.update_readme(tmp_path / "demo.json", tmp_path / "demo.json")


# ------------------------------------------------------------------ documents stay inside the repository
#: what a user's document must not contain: the project's private notes, sibling folders, machine paths
OUTSIDE = [
    (re.compile(r"DESIGN(\.md)?\s*§"), "a section of design notes the repository does not hold (use docs/design.md)"),
    (re.compile(r"\bDESIGN\.md\b|\bSTYLE\.md\b"), "a file the repository does not hold"),
    (re.compile(r"\.\./shared\b"), "a folder outside the repository"),
    (re.compile(r"(?<![\w.])/(work|tmp|home|Users|root)/"), "an absolute path of a machine"),
]


def _documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "mkdocs.yml", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("path", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_document_points_outside_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for pattern, what in OUTSIDE:
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            pytest.fail(f"{path.relative_to(ROOT)}:{line}: {match.group(0)!r} points to {what}")


def test_readme_links_resolve_inside_the_repository() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        assert (ROOT / target).exists(), f"README.md links to {target}, which the repository does not hold"


def test_readme_fits_on_a_few_screens() -> None:
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; the user guide belongs in docs/"


def test_docs_results_puts_each_method_beside_every_floor_and_null(demo_dir: Path, tmp_path: Path) -> None:
    path = demo_dir / "run" / "recovery.json"
    rec = json.loads(path.read_text(encoding="utf-8"))
    rec["methods"]["ablation"] |= {"beats_floors_by": 0.375, "beats_nulls_by": 0.625, "clears_nulls": ["liver", "x"]}
    _write(path, rec)
    _write(
        demo_dir / "run" / "attribution_recovery.json", {"methods": {"ablation": {"stability": {"kendall_w": 0.81}}}}
    )
    out = tmp_path / "results"
    assert docs_results.main([str(demo_dir), "--out", str(out), "--no-readme"]) == 0
    demo = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    tab = demo["tables"]["floors_nulls"]
    assert tab["columns"] == docs_results.FLOOR_NULL_COLUMNS
    ablation, gradcam = tab["rows"]
    floors_and_nulls = ["0.25", "0.38", "0.50", "0.50", "0.25 [0.10, 0.40]", "0.12"]
    assert ablation == ["`ablation`", 8, "0.88", *floors_and_nulls, "0.38", "0.62", 2, "0.81"]
    assert gradcam[:3] == ["`gradcam`", 8, "0.50"] and set(gradcam[3:]) == {None}  # no floors or nulls: not measured
    # the attribution page's placeholders name keys the script writes
    page = "methods/attribution.md"
    text = hooks.fill((DOCS / page).read_text(encoding="utf-8"), hooks.load_results(out), out.parent, page)
    assert "{{" not in text and "| `ablation` | 8 | 0.88 | 0.25 |" in text


def test_docs_results_no_times_records_no_stage_minutes(demo_dir: Path, tmp_path: Path) -> None:
    # a resumed demo's stage records time the resumption (seconds), not the pipeline: --no-times
    out = tmp_path / "results"
    assert docs_results.main([str(demo_dir), "--out", str(out), "--no-readme", "--no-times"]) == 0
    demo = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert demo["minutes"] == {"total": None} and demo["tables"]["stages"] is None
    assert "minutes in all" not in readme_summary.summary_line(demo)
