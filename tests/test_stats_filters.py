"""The restricted filter grammar of --cohort/--reference: parsing, matching, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.filters import parse_filter
from bodyage.errors import InputError


@pytest.fixture
def scans() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [50.0, 61.5, 70.0, 82.0, np.nan],
            "sex": ["F", "M", "M", "F", "F"],
            "site": ["11025", "11026", "11027", "11025", None],
            "diabetes": [0, 1, 1, 0, 1],
            "smoker": [True, False, True, False, True],
            "waist cm": [80.0, 90.0, 100.0, 110.0, 95.0],
        }
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("diabetes == 1", [False, True, True, False, True]),
        ("diabetes != 1", [True, False, False, True, False]),
        ("age >= 61.5", [False, True, True, True, False]),
        ("age < 61.5 and sex == F", [True, False, False, False, False]),
        ("age > 60 and diabetes == 1 and sex == 'M'", [False, True, True, False, False]),
        ("sex in [M]", [False, True, True, False, False]),
        ("site in ['11025', 11027]", [True, False, True, True, False]),
        ("site not in [11025]", [False, True, True, False, False]),  # a missing site matches nothing
        ("site == 11025", [True, False, False, True, False]),  # numbers match text columns as written
        ("smoker == true", [True, False, True, False, True]),
        ("diabetes == true", [False, True, True, False, True]),
        ("`waist cm` > 95", [False, False, True, True, False]),
        ("age <= 1e2", [True, True, True, True, False]),
        ("age != 50", [False, True, True, True, False]),  # missing age matches nothing, not even !=
    ],
)
def test_filters_select_rows(scans: pd.DataFrame, text: str, expected: list[bool]) -> None:
    assert parse_filter(text).mask(scans).tolist() == expected


def test_filter_is_printed_normalised() -> None:
    flt = parse_filter("diabetes==1 and  sex in [F,'M'] and `waist cm`>=90")
    assert str(flt) == "diabetes == 1 and sex in ['F', 'M'] and `waist cm` >= 90"
    assert flt.columns == ("diabetes", "sex", "waist cm")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"--cohort '': empty filter"),
        ("diabetes == 1 or sex == F", r"only 'and' joins conditions \('or' at position 14\)"),
        ("diabetes = 1", r"unexpected '=' at position 9"),
        ("diabetes ==", r"the filter ends too early"),
        ("== 1", r"expected a column name at position 0, found '=='"),
        ("diabetes 1", r"expected one of ==, !=, <, <=, >, >=, 'in' or 'not in' after 'diabetes'"),
        ("sex in M", r"expected '\[' starting a list of values"),
        ("sex in [M F]", r"expected ',' or '\]'"),
        ("__import__('os').system('ls')", r"unexpected '\(' at position 10"),
        ("age > 60; import os", r"unexpected ';' at position 8"),
        ("age > 60 sex == F", r"expected 'and' at position 9, found 'sex'"),
    ],
)
def test_malformed_filters(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_filter(text, option="--cohort")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("diabetis == 1", r"--reference 'diabetis == 1': column 'diabetis' does not exist; columns: age, sex"),
        ("age > old", r"column 'age' is numeric but 'old' is not a number"),
        ("sex > F", r"'>' needs a numeric column; 'sex' holds text"),
    ],
)
def test_filters_checked_against_columns(scans: pd.DataFrame, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_filter(text, option="--reference").mask(scans, option="--reference")
