"""Covariates add to age, age² and sex; excluded scans are counted by reason everywhere (issue 15, items 3 and 6)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import make_tables, write_run
from typer.testing import CliRunner

from analysis.design import (
    MISSING_COVARIATE,
    MISSING_GROUP,
    MISSING_PHENOTYPE,
    OTHER,
    build_design,
    covariate_block,
    covariate_list,
)
from analysis.phenotypes import PHENOTYPE_MODEL_COLUMNS, phenotype_models, resolve_covariates
from analysis.regionmodels import region_models
from analysis.run import RunTables
from analysis.stats import run_stats
from analysis.tables import exclusion_note, exclusions_note, phenotype_table, region_table
from cli.app import app

runner = CliRunner()


def _tables(cohort: pd.DataFrame, frames) -> RunTables:  # type: ignore[no-untyped-def]
    return RunTables.from_frames(cohort, frames.predictions, frames.attributions, region_order=frames.regions)


@pytest.fixture(scope="module")
def frames():  # type: ignore[no-untyped-def]
    return make_tables(400, seed=11, gap_effects={}, n_sites=3)


@pytest.fixture(scope="module")
def age_linked(frames) -> RunTables:  # type: ignore[no-untyped-def]
    """A null phenotype ``p`` that follows age (r ~ 0.9) and an unrelated covariate ``x``."""
    rng = np.random.default_rng(5)
    age = frames.cohort["age"].to_numpy(float)
    cohort = frames.cohort.assign(p=(age - age.mean()) / age.std() + rng.normal(0, 0.5, len(age)))
    cohort["x"] = rng.normal(0, 1, len(age))
    return _tables(cohort, frames)


# ----------------------------------------------------------------------------- item 3: covariates add, never replace


def test_a_covariate_is_added_to_age_so_an_age_linked_null_phenotype_stays_null(age_linked: RunTables) -> None:
    """With no gap correction the gap carries the age bias; replacing age by x let ``p`` take it (issue: p 8e-109)."""
    res = phenotype_models(age_linked, phenotypes=["p"], covariates=["x"], correction="none", group=None)
    row = res.iloc[0]
    assert row["covariates"] == "age, sex, x"
    assert abs(row["estimate"]) < 0.5 and row["p"] > 0.05
    # what --covariate x did before: age and sex replaced by x
    replaced = phenotype_models(
        age_linked, phenotypes=["p"], covariates=["x"], default_covariates=False, correction="none", group=None
    ).iloc[0]
    assert replaced["covariates"] == "x"
    assert replaced["estimate"] < -2.0 and replaced["p"] < 1e-20


def test_resolve_covariates_adds_to_the_defaults_and_only_the_flag_removes_them(age_linked: RunTables) -> None:
    assert resolve_covariates(age_linked, None, ["p"])[1] == ("age", "sex")
    assert resolve_covariates(age_linked, ["x"], ["p"])[1] == ("age", "sex", "x")
    assert resolve_covariates(age_linked, ["x", "age", "x"], ["p"])[1] == ("age", "sex", "x")
    assert resolve_covariates(age_linked, ["x"], ["p"], default_covariates=False)[1] == ("x",)
    block, names = resolve_covariates(age_linked, None, ["p"], default_covariates=False)
    assert names == () and block.shape[1] == 0
    assert list(resolve_covariates(age_linked, ["age"], ["p"], default_covariates=False)[0]) == ["age", "age^2"]


def test_no_covariate_at_all_fits_the_phenotype_alone(age_linked: RunTables) -> None:
    res = phenotype_models(age_linked, phenotypes=["p"], default_covariates=False, correction="none", group=None)
    _, table = phenotype_table(res, 0.05)
    assert res["covariates"].iloc[0] == ""
    assert "adjusted for no covariate" in table.notes[0]


def test_notes_list_the_covariates_used_and_age_squared_only_with_age(age_linked: RunTables) -> None:
    res = phenotype_models(age_linked, phenotypes=["p"], covariates=["x"], group=None, correction="none")
    _, table = phenotype_table(res, 0.05)
    assert "adjusted for age, age², sex, x, no random intercept; OLS" in table.notes[0]
    assert "also squared" not in " ".join(table.notes)
    assert "and on all jointly" not in table.notes[0]  # one phenotype: no joint model
    res = phenotype_models(
        age_linked, phenotypes=["p"], covariates=["x"], default_covariates=False, group=None, correction="none"
    )
    _, table = phenotype_table(res, 0.05)
    assert "adjusted for x, no random intercept" in table.notes[0]
    assert "age" not in table.notes[0].split("adjusted for")[1]
    assert covariate_list("age, sex") == "age, age², sex"
    assert covariate_list(["sex"]) == "sex"


def test_region_models_take_the_same_covariates_and_say_so(age_linked: RunTables) -> None:
    added = region_models(age_linked, phenotypes=["p"], covariates=["x"], methods=["ablation"])
    assert set(added["covariates"]) == {"age, sex, x"}
    only = region_models(age_linked, phenotypes=["p"], covariates=["x"], default_covariates=False, methods=["ablation"])
    assert set(only["covariates"]) == {"x"}
    _, table = region_table(only, "ablation", 0.05)
    assert "adjusted for x and site (fixed effects)" in table.notes[0]
    _, table = region_table(added, "ablation", 0.05)
    assert "adjusted for age, age², sex, x and site" in table.notes[0]


def test_cli_covariate_adds_and_no_default_covariates_removes(tmp_path: Path, frames) -> None:  # type: ignore[no-untyped-def]
    cohort = frames.cohort.assign(x=np.random.default_rng(0).normal(size=len(frames.cohort)))
    run = write_run(tmp_path, replace(frames, cohort=cohort))
    common = ["stats", str(run), "--phenotype", "diabetes", "--no-figures", "--method", "ablation"]
    res = runner.invoke(app, [*common, "--covariate", "x"])
    assert res.exit_code == 0, res.output
    pheno = pd.read_csv(run / "stats" / "phenotype_models.csv", keep_default_na=False)
    assert set(pheno["covariates"]) == {"age, sex, x"}
    res = runner.invoke(app, [*common, "--covariate", "x", "--no-default-covariates"])
    assert res.exit_code == 0, res.output
    pheno = pd.read_csv(run / "stats" / "phenotype_models.csv", keep_default_na=False)
    assert set(pheno["covariates"]) == {"x"}
    record = json.loads((run / "stats" / "run.json").read_text())
    assert record["arguments"]["default_covariates"] is False
    assert "adjusted for x," in (run / "stats" / "phenotype_models.tex").read_text()


# ----------------------------------------------------------------------------- item 6: exclusions by reason


@pytest.fixture(scope="module")
def holey(frames) -> RunTables:  # type: ignore[no-untyped-def]
    """bmi missing in scans 0-3; x in 2-8 (2-3 already lack bmi); the group ``centre`` in 8-10 (8 lacks x)."""
    cohort = frames.cohort.copy()
    cohort["x"] = np.random.default_rng(1).normal(size=len(cohort))
    cohort["bmi"] = cohort["bmi"].astype(float)
    cohort.loc[0:3, "bmi"] = np.nan
    cohort.loc[2:8, "x"] = np.nan
    cohort["centre"] = cohort["site"].astype(object)
    cohort.loc[8:10, "centre"] = np.nan
    return _tables(cohort, frames)


def test_every_model_row_counts_its_exclusions_by_reason(holey: RunTables) -> None:
    res = phenotype_models(holey, phenotypes=["bmi", "diabetes"], covariates=["x"], group="centre")
    sep = res[res["model"] == "separate"].set_index("phenotype")
    n = len(holey.scans)
    assert sep.at["bmi", "n_missing_phenotype"] == 4
    assert sep.at["bmi", "n_missing_covariate"] == 5  # scans 4-8
    assert json.loads(sep.at["bmi", "missing_by_covariate"]) == {"age": 0, "sex": 0, "x": 5}
    assert sep.at["bmi", "n_missing_group"] == 2  # scans 9-10
    assert sep.at["bmi", "n"] == n - 11
    assert sep.at["diabetes", "n_missing_phenotype"] == 0
    assert sep.at["diabetes", "n_missing_covariate"] == 7
    assert sep.at["diabetes", "n_missing_group"] == 2
    assert sep.at["diabetes", "n"] == n - 9
    joint = res[res["model"] == "joint"].iloc[0]
    assert (joint["n_missing_phenotype"], joint["n_missing_covariate"], joint["n_missing_group"]) == (4, 5, 2)
    for _, row in res.iterrows():
        reasons = ["n_missing_phenotype", "n_missing_covariate", "n_missing_group", "n_missing_other"]
        assert row["n"] + row[reasons].sum() == n


def test_the_table_notes_name_every_reason(holey: RunTables) -> None:
    res = phenotype_models(holey, phenotypes=["bmi", "diabetes"], covariates=["x"], group="centre")
    _, table = phenotype_table(res, 0.05)
    assert (
        "Scans excluded: bmi 4 (missing phenotype), 5 (missing x), 2 (missing group); diabetes 7 (missing x), "
        "2 (missing group); the joint model 4 (missing phenotype), 5 (missing x), 2 (missing group)."
    ) in table.notes
    assert not any(note.startswith("No scan was excluded") for note in table.notes)
    regions = region_models(holey, phenotypes=["bmi"], covariates=["x"], group="centre", methods=["ablation"])
    _, table = region_table(regions, "ablation", 0.05)
    assert "Scans excluded: bmi 4 (missing phenotype), 5 (missing x), 2 (missing group)." in table.notes


def test_a_missing_outcome_is_counted_as_other(holey: RunTables) -> None:
    scans = holey.scans
    outcome = pd.Series(1.0, index=scans.index)
    outcome.iloc[[0, 20, 21]] = np.nan  # scan 0 already lacks bmi
    design = build_design(scans, ["bmi"], covariate_block(scans, ["age", "x"]), outcome=outcome)
    assert dict(design.exclusions) == {
        MISSING_PHENOTYPE: 4,
        MISSING_COVARIATE + "age": 0,
        MISSING_COVARIATE + "x": 5,
        MISSING_GROUP: 0,
        OTHER: 2,
    }
    assert design.n == len(scans) - 11
    assert exclusion_note(design.exclusions) == (
        "Scans excluded: 4 (missing phenotype), 5 (missing x), 2 (other reasons (e.g. no age gap))."
    )


def test_no_exclusion_says_so_only_when_every_reason_was_counted() -> None:
    full = {MISSING_PHENOTYPE: 0, MISSING_COVARIATE + "age": 0, MISSING_GROUP: 0, OTHER: 0}
    assert exclusion_note(full) == "No scan was excluded."
    assert exclusions_note({"bmi": full, "diabetes": full}) == "No scan was excluded."
    assert exclusions_note({"bmi": {MISSING_PHENOTYPE: 0}}) == "No scan was excluded for a missing phenotype."
    assert exclusions_note({"bmi": {**full, OTHER: 3}, "smoking": full}) == (
        "Scans excluded: bmi 3 (other reasons (e.g. no age gap)); none from the other models."
    )


def test_run_json_records_the_exclusions(tmp_path: Path, holey: RunTables) -> None:
    result = run_stats(
        holey, phenotypes=["bmi"], covariates=["x"], group="centre", methods=["ablation"], figures=False, out=tmp_path
    )
    record = json.loads((tmp_path / "stats" / "run.json").read_text())
    expected = {MISSING_PHENOTYPE: 4, MISSING_COVARIATE + "age": 0, MISSING_COVARIATE + "sex": 0}
    expected |= {MISSING_COVARIATE + "x": 5, MISSING_GROUP: 2, OTHER: 0}
    assert record["exclusions"]["phenotype_models"] == {"separate": {"bmi": expected}}
    assert record["exclusions"]["region_models"] == {"bmi": expected}
    assert result.phenotypes["n"].iloc[0] == len(holey.scans) - 11


# ----------------------------------------------------------------------------- item 2, table side: df and the choice


def test_df_column_and_the_small_sample_choice_in_the_notes(age_linked: RunTables) -> None:
    assert PHENOTYPE_MODEL_COLUMNS.index("df") == PHENOTYPE_MODEL_COLUMNS.index("stat") + 1
    ols = phenotype_models(age_linked, phenotypes=["p"], group=None)
    n_terms = 1 + 1 + 2 + 1  # intercept, p, age, age², sex
    assert ols["df"].iloc[0] == ols["n"].iloc[0] - n_terms
    _, table = phenotype_table(ols, 0.05)
    assert any(note.startswith("Tests: ") for note in table.notes)
    mixed = phenotype_models(age_linked, phenotypes=["p"])
    _, table = phenotype_table(mixed, 0.05)
    tests = [note for note in table.notes if note.startswith("Tests: ")]
    assert tests == [f"Tests: {mixed['df_note'].iloc[0].rstrip('.')}."]
