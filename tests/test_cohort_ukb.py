"""Reading a UK Biobank export (bodyage.ukb, bodyage.ukb_fields): column schemes, fields, codes, chunks."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ukb_factories import PARTICIPANTS, Participant, expected_age, export_frame, write_export

from bodyage.errors import BodyageWarning, InputError
from bodyage.exportrows import BadRow
from bodyage.ukb import iter_export_chunks, read_visits
from bodyage.ukb_fields import FieldColumn, FieldRequest, parse_column, parse_field_option, read_layout

FIELDS = ["2443=diabetes", "4080=sbp:mean", "20002=diabetes_sr:any=1220,1223", "22009.1=pc1:signed"]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_export(tmp_path_factory.mktemp("ukb") / "export.csv")


def _read(path: Path, **kw) -> pd.DataFrame:
    with pytest.warns(BodyageWarning, match="field 22009 \\(pc1\\) has no column at some imaging instances"):
        return read_visits(path, fields=FIELDS, **kw).table


def _row(table: pd.DataFrame, eid: str, visit: int) -> pd.Series:
    hit = table[(table["subject_id"] == eid) & (table["visit"] == visit)]
    assert len(hit) == 1
    return hit.iloc[0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("21003-2.0", FieldColumn(21003, 2, 0, "21003-2.0")),
        ("20002-3.14", FieldColumn(20002, 3, 14, "20002-3.14")),
        ("f.21003.2.0", FieldColumn(21003, 2, 0, "f.21003.2.0")),
        ("p21003_i2", FieldColumn(21003, 2, 0, "p21003_i2")),
        ("participant.p20002_i3_a4", FieldColumn(20002, 3, 4, "participant.p20002_i3_a4")),
        ("p31", FieldColumn(31, 0, 0, "p31")),
        ("eid", None),
        ("age", None),
    ],
)
def test_parse_column_schemes(name: str, expected: FieldColumn | None) -> None:
    assert parse_column(name) == expected


def test_parse_field_option() -> None:
    assert parse_field_option("2443=diabetes") == FieldRequest(2443, "diabetes")
    assert parse_field_option("4080=sbp:mean") == FieldRequest(4080, "sbp", reduce="mean")
    assert parse_field_option("22009.1=pc1:signed") == FieldRequest(22009, "pc1", array=1, signed=True)
    req = parse_field_option("20002=sr:any=1220,1223:signed")
    assert (req.reduce, req.codes, req.signed) == ("any", ("1220", "1223"), True)
    assert req.describe() == "20002=sr:any=1220,1223:signed"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("diabetes", r"expected FIELD\[\.ARRAY\]=NAME"),
        ("2443=1abc", "column name '1abc' must start with a letter"),
        ("2443=diabetes:median", "unknown option 'median'"),
        ("2443=diabetes:mean:max", "not both mean and max"),
        ("20002=sr:any=", "'any=' needs at least one code"),
    ],
)
def test_parse_field_option_errors(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_field_option(text)


def test_layout_reads_only_the_header(export: Path) -> None:
    layout = read_layout(export)
    assert layout.eid_column == "eid"
    assert layout.sep == ","
    assert layout.n_columns > 300  # a few hundred columns, like a small real export
    assert layout.instances_of(21003) == [0, 1, 2, 3]
    assert layout.columns_for(4080, 2) == ["4080-2.0", "4080-2.1"]
    assert layout.resolve_instance(31, 2, fall_back=True) == 0
    assert layout.resolve_instance(31, 2, fall_back=False) is None


def test_age_sex_site_and_fields(export: Path) -> None:
    table = _read(export)
    # one row per participant and instance asked for (2 and 3)
    assert len(table) == 2 * len(PARTICIPANTS)
    r = _row(table, "1000011", 2)
    # born March 1955 (taken as mid-March), seen 20 April 2016 (day 111 of a leap year)
    assert r["age"] == pytest.approx(2016 + 110.5 / 366 - (1955 + 2.5 / 12), abs=1e-9)
    assert (r["sex"], r["site"], r["bmi"], r["diabetes"], r["sbp"], r["diabetes_sr"], r["pc1"]) == (
        "F",
        "Cheadle",
        24.0,
        0.0,
        132.0,
        0.0,
        -1.25,
    )
    assert r["age_source"] == "fractional"
    # repeat imaging: instance 3 has its own age, centre and BMI
    r2, r3 = _row(table, "1000022", 2), _row(table, "1000022", 3)
    assert r3["age"] - r2["age"] == pytest.approx(
        (pd.Timestamp("2019-10-03") - pd.Timestamp("2015-09-01")).days / 365.25, abs=0.01
    )
    assert (r2["bmi"], r3["bmi"], r3["site"], r3["sbp"], r3["diabetes_sr"]) == (31.2, 30.4, "Newcastle", 140.0, 1.0)
    for p in PARTICIPANTS:
        for inst in (2, 3):
            row = _row(table, p.eid, inst)
            if inst in p.visits:
                assert row["age"] == pytest.approx(expected_age(p, inst), abs=0.02), p.eid
            else:
                assert math.isnan(row["age"]), (p.eid, inst)


def test_negative_codes_are_missing_unless_signed(export: Path) -> None:
    table = _read(export)
    r = _row(table, "1000134", 2)
    assert math.isnan(r["bmi"])  # -1: do not know
    assert math.isnan(r["diabetes"])  # -3: prefer not to answer
    assert r["sbp"] == 128.0  # -1 in one of two readings: the mean of the other
    assert r["pc1"] == -1.0  # signed: a negative integer is a value, not a code
    assert r["site"] == "centre_11099"  # not an imaging centre: kept, named by its code
    assert (r["age"], r["age_source"]) == (60.5, "whole_years")  # no visit date: 21003 + 0.5
    assert pd.isna(_row(table, "1000178", 2)["sex"])  # -3 is not a sex


def test_chunks_and_eid_filter_change_nothing(export: Path) -> None:
    whole = _read(export)
    chunked = _read(export, chunksize=3)
    pd.testing.assert_frame_equal(
        whole.sort_values(["subject_id", "visit"]).reset_index(drop=True),
        chunked.sort_values(["subject_id", "visit"]).reset_index(drop=True),
    )
    some = _read(export, eids={"1000022", "1000134", "9999999"}, chunksize=4)
    assert sorted(set(some["subject_id"])) == ["1000022", "1000134"]
    expected = whole[whole["subject_id"].isin(["1000022", "1000134"])]
    pd.testing.assert_frame_equal(
        some.sort_values(["subject_id", "visit"]).reset_index(drop=True),
        expected.sort_values(["subject_id", "visit"]).reset_index(drop=True),
    )


def test_rap_names_tab_separated_and_gzip(export: Path, tmp_path: Path) -> None:
    frame = export_frame()

    def rap(c: str) -> str:
        if c == "eid":
            return "participant.eid"
        f, rest = c.split("-")
        i, a = rest.split(".")
        if f in ("31", "34", "52"):
            return f"participant.p{f}"
        return f"participant.p{f}_i{i}" + (f"_a{a}" if f in ("4080", "20002", "22009") else "")

    path = tmp_path / "rap.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        frame.rename(columns=rap).to_csv(fh, sep="\t", index=False)
    layout = read_layout(path)
    assert (layout.sep, layout.eid_column) == ("\t", "participant.eid")
    pd.testing.assert_frame_equal(_read(path), _read(export))


def test_labels_instead_of_codes(tmp_path: Path) -> None:
    frame = export_frame()
    frame["31-0.0"] = frame["31-0.0"].map({"0": "Female", "1": "Male"})
    frame["54-2.0"] = frame["54-2.0"].map({"11025": "Cheadle (imaging)"}).fillna("")
    path = tmp_path / "labels.csv"
    frame.to_csv(path, index=False)
    table = read_visits(path).table
    r = _row(table, "1000011", 2)
    assert (r["sex"], r["site"]) == ("F", "Cheadle (imaging)")


def test_age_conflicting_with_21003_falls_back(tmp_path: Path) -> None:
    p = Participant("2000001", 0, 1950, 6, {2: PARTICIPANTS[0].visits[2]})
    # PARTICIPANTS[0]'s visit says 21003 = 61 while born 1950 -> 65.9 from the dates: a conflict
    path = write_export(tmp_path / "conflict.csv", (p,))
    table = read_visits(path).table
    r = _row(table, "2000001", 2)
    assert (r["age"], r["age_source"]) == (61.5, "conflict")


@pytest.mark.parametrize(
    ("edit", "fields", "match"),
    [
        (lambda f: f.drop(columns=["31-0.0"]), [], r"no column for field 31 \(sex\)"),
        (lambda f: f.drop(columns=[c for c in f.columns if c.startswith("54-")]), [], "field 54"),
        (
            lambda f: f.drop(columns=[c for c in f.columns if c.startswith(("21003-", "53-"))]),
            [],
            "no column for field 21003",
        ),
        (lambda f: f.rename(columns={"eid": "id"}), [], "no participant id column; expected one of eid"),
        (lambda f: f, ["9999=nothing"], r"--field 9999=nothing: the export .* has no column of field 9999"),
        (lambda f: f, ["4080=sbp"], r"field 4080 has 2 entries per instance \(4080-2.0, 4080-2.1\)"),
        (lambda f: f, ["4080.7=sbp"], "no array 7 of field 4080"),
        (lambda f: f, ["21001=bmi"], "column name 'bmi' is already used by bodyage"),
        (lambda f: f, ["2443=a", "2443=a"], "column name 'a' is also given to --field 2443=a"),
        (lambda f: f.assign(**{"21001-2.0": ["x"] * len(f)}), [], "column 21001-2.0 .* holds 'x', not a number"),
        (lambda f: pd.concat([f, f.iloc[[2]]]), [], "line 18 has an empty or repeated participant id"),
    ],
)
def test_bad_exports_name_the_problem(tmp_path: Path, edit, fields, match: str) -> None:
    path = tmp_path / "bad.csv"
    edit(export_frame()).to_csv(path, index=False)
    with pytest.raises(InputError, match=match):
        read_visits(path, fields=fields)


def test_missing_and_empty_export(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="phenotype export not found"):
        read_layout(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="the phenotype export is empty"):
        read_layout(tmp_path / "empty.csv")


def test_field_without_the_imaging_instance_warns(tmp_path: Path) -> None:
    frame = export_frame().drop(columns=["2443-2.0", "2443-3.0"])
    path = tmp_path / "e.csv"
    frame.to_csv(path, index=False)
    with pytest.warns(BodyageWarning, match="field 2443 \\(diabetes\\) .* using instance 1 for visit 2"):
        visits = read_visits(path, fields=["2443=diabetes"])
    assert visits.instance_sources["diabetes"] == {2: 1, 3: 1}
    assert np.isnan(_row(visits.table, "1000011", 2)["diabetes"])  # instance 1 is empty for everyone


def test_repeated_eid_across_chunks(tmp_path: Path) -> None:
    frame = export_frame()
    path = tmp_path / "dup.csv"
    pd.concat([frame, frame.iloc[[0]]]).to_csv(path, index=False)
    with pytest.raises(InputError, match="line 18 repeats a participant id of an earlier line"):
        read_visits(path, chunksize=5)


# ----------------------------------------------------------------------------- malformed exports (issue 20)


def _with_line(path: Path, line_no: int, edit) -> Path:
    """Rewrite line ``line_no`` (1 = header) of a CSV with ``edit(fields) -> fields``."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = lines[line_no - 1].rstrip("\n").split(",")
    lines[line_no - 1] = ",".join(edit(fields)) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("edit", "n_fields"),
    [(lambda f: [*f[:5], "99", *f[5:]], 307), (lambda f: f[:-2], 304)],
    ids=["extra field mid-row", "two fields short"],
)
def test_a_ragged_row_is_left_out_never_shifted(tmp_path: Path, export: Path, edit, n_fields: int) -> None:
    # line 4 is participant 1000033: with one extra field after 34-0.0 its age, sex and
    # BMI used to be read from the neighbouring columns, exit 0
    path = _with_line(write_export(tmp_path / "ragged.csv"), 4, edit)
    with pytest.warns(
        BodyageWarning, match=rf"1 row\(s\) do not have the header's 306 fields: line 4 \({n_fields} fields\)"
    ):
        visits = read_visits(path)
    assert visits.bad_rows == (BadRow(line=4, eid="1000033", n_fields=n_fields),)
    assert "1000033" not in set(visits.table["subject_id"])
    clean = read_visits(export).table
    pd.testing.assert_frame_equal(
        visits.table.reset_index(drop=True), clean[clean["subject_id"] != "1000033"].reset_index(drop=True)
    )
    layout = read_layout(path)
    with pytest.raises(InputError, match=rf"ragged.csv: line 4 has {n_fields} fields but the header has 306"):
        list(iter_export_chunks(layout, ["21003-2.0"]))


def test_line_numbers_count_quoted_newlines_and_blank_lines(tmp_path: Path, export: Path) -> None:
    frame = export_frame()
    frame["3000-0.0"] = frame["3000-0.0"].astype(object)
    frame.loc[1, "3000-0.0"] = "two,\nlines"  # quoted by pandas: one record over two lines
    path = tmp_path / "quoted.csv"
    frame.to_csv(path, index=False)
    text = path.read_text(encoding="utf-8").splitlines(keepends=True)
    text.insert(4, "\n")  # a blank line 5
    path.write_text("".join(text), encoding="utf-8")
    _with_line(path, 6, lambda f: [*f[:5], "99", *f[5:]])  # participant 1000033
    with pytest.warns(BodyageWarning, match=r"line 6 \(307 fields\)"):
        visits = read_visits(path)
    assert [(r.line, r.eid) for r in visits.bad_rows] == [(6, "1000033")]
    clean = read_visits(export).table
    for eid in ("1000022", "1000044"):  # around the quoted field, the blank line and the bad line
        pd.testing.assert_series_equal(_row(visits.table, eid, 2), _row(clean, eid, 2), check_names=False)
    chunks = list(iter_export_chunks(read_layout(path), ["21003-2.0"], chunksize=3, bad_rows=[]))
    # record 1000022 spans lines 3-4, line 5 is blank, line 6 is left out
    assert [list(c.index) for c in chunks[:2]] == [[2, 3], [7, 8, 9]]


def test_truncated_gzip_export_is_an_input_error(tmp_path: Path, export: Path) -> None:
    data = gzip.compress(export.read_bytes())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(
        InputError, match=r"cut.csv.gz: cannot be read to the end after line \d+ \(truncated or corrupt"
    ):
        read_visits(path)


def test_export_with_a_byte_order_mark_is_read(tmp_path: Path, export: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + export.read_bytes())
    assert read_layout(path).eid_column == "eid"
    pd.testing.assert_frame_equal(read_visits(path).table, read_visits(export).table)


def test_export_not_utf8_names_the_line(tmp_path: Path, export: Path) -> None:
    path = tmp_path / "latin1.csv"
    raw = export.read_bytes().split(b"\n")
    raw[-2] = raw[-2].replace(b",", b",\xe9", 1)  # the last row: past the header's read buffer
    path.write_bytes(b"\n".join(raw))
    with pytest.raises(InputError, match=r"latin1.csv: not UTF-8 text after line \d+ .*save the export as UTF-8"):
        read_visits(path)
