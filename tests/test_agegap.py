"""age_accuracy with a missing site: counted as a level of their own, never a level named 'nan'."""

from __future__ import annotations

import warnings

import numpy as np
from factories import make_tables

from analysis.agegap import age_accuracy, correct_gap
from analysis.run import RunTables


def test_a_missing_site_is_a_level_of_its_own() -> None:
    frames = make_tables(40, seed=2)
    cohort = frames.cohort.copy()
    cohort.loc[cohort.index[:3], "site"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'Mean of empty slice' on the old code
        acc = age_accuracy(correct_gap(RunTables.from_frames(cohort, frames.predictions)))
    assert "nan" not in set(acc["level"])
    missing = acc[acc["level"] == "missing"].set_index("subset")["n"]
    scans = RunTables.from_frames(cohort, frames.predictions).scans
    assert missing["site"] == scans["site"].isna().sum() > 0
    site_rows = acc[acc["subset"] == "site"]
    assert site_rows["n"].sum() == len(scans)
