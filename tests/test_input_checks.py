"""Input checks that keep bad inputs from escaping, exploding or passing silently (issue 20).

Subject ids and visits (bodyage.study), label ids (labels.json and masks), YAML files
(bodyage.scenario), and the length of what error messages quote (bodyage.errors, cli).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bodyage.errors import InputError, ScenarioError, StudyError, quoted
from bodyage.regions import MAX_LABEL_ID, LabelTable
from bodyage.scenario import MAX_YAML_BYTES, load_scenario, parse_yaml
from bodyage.study import id_problem, load_study
from bodyage.volumes import load_labels, save_volume
from cli.app import app
from cli.errors import MAX_MESSAGE_CHARS, one_line

AFFINE = np.diag([10.0, 10.0, 10.0, 1.0])


def _cohort(folder: Path, **column: object) -> Path:
    """Write a two-scan cohort.csv (no images: load_study does not open them), one cell changed."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        {
            "subject_id": ["S001", "S002"],
            "visit": [0, 0],
            "age": [50.0, 60.0],
            "sex": ["F", "M"],
            "site": ["a", "a"],
            "water": ["images/w1.nii.gz", "images/w2.nii.gz"],
            "fat": ["images/f1.nii.gz", "images/f2.nii.gz"],
        }
    ).astype(object)
    for name, value in column.items():
        frame.loc[1, name] = value
    frame.to_csv(folder / "cohort.csv", index=False)
    return folder


# ----------------------------------------------------------------------------- ids and visits


@pytest.mark.parametrize(
    ("subject_id", "match"),
    [
        ("../../../ESCAPED", r"line 3: subject_id '\.\./\.\./\.\./ESCAPED' holds '/', which ids may not hold"),
        ("a b", r"line 3: subject_id 'a b' holds ' ', which ids may not hold \(allowed: letters A-Z and a-z"),
        ("..", r"line 3: subject_id '\.\.' starts with '\.'"),
        (".hidden", r"line 3: subject_id '\.hidden' starts with '\.'"),
        ("-rf", r"line 3: subject_id '-rf' starts with '-'"),
        ("a\\b", r"line 3: subject_id 'a\\\\b' holds '\\\\'"),
        ("", r"line 3: subject_id '' is empty"),
        ("x" * 65, r"line 3: subject_id 'x{65}' has 65 characters \(at most 64\)"),
    ],
)
def test_unsafe_subject_ids_are_refused_at_study_load(tmp_path: Path, subject_id: str, match: str) -> None:
    # an empty cell used to become the scan 'nan_0'; '../../../ESCAPED' made segment,
    # train and attribute write outside their folders
    study = _cohort(tmp_path / "study", subject_id=subject_id)
    with pytest.raises(StudyError, match=r"cohort.csv: " + match):
        load_study(study)


def test_safe_ids_and_id_problem() -> None:
    for ok in ("1000011", "S00001", "sub-01_ses.2", "A" * 64, "_x"):
        assert id_problem(ok) is None, ok
    assert (
        id_problem("a\x00b")
        == "holds '\\x00', which ids may not hold (allowed: letters A-Z and a-z, digits, '_', '-' and '.')"
    )
    assert id_problem("a\tb") is not None and id_problem("é") is not None


@pytest.mark.parametrize(
    ("visit", "shown"),
    [("1.5", "1.5"), ("1e20", "1e\\+20"), ("two", "'two'"), ("-1", "-1"), ("1000000", "1000000")],
)
def test_visits_must_be_whole_numbers_in_range(tmp_path: Path, visit: str, shown: str) -> None:
    # 1.5 used to become visit 1, 1e20 visit -9223372036854775808
    study = _cohort(tmp_path / "study", visit=visit)
    with pytest.raises(StudyError, match=rf"cohort.csv: line 3: visit {shown} is not a whole number from 0 to 999999"):
        load_study(study)
    with pytest.raises(StudyError, match=r"cohort.csv: line 3: visit is missing$"):
        load_study(_cohort(tmp_path / "empty", visit=""))


def test_whole_float_visits_are_accepted(tmp_path: Path) -> None:
    study = load_study(_cohort(tmp_path / "study", visit="2.0"))
    assert study.cohort["visit"].tolist() == [0, 2] and study.cohort["scan_id"].tolist() == ["S001_0", "S002_2"]


def test_cli_refuses_an_escaping_id_before_writing(tmp_path: Path) -> None:
    study = _cohort(tmp_path / "deep" / "study", subject_id="../../ESCAPED")
    res = CliRunner().invoke(app, ["qc", str(study)])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: ") and "subject_id '../../ESCAPED' holds '/'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cohort.csv", "deep", "study"]


# ----------------------------------------------------------------------------- label ids


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"1": "liver", "4000000000": "huge"}, r"label id '4000000000' is outside 1-65535 \(0 is the background\)"),
        ({"0": "background"}, r"label id '0' is outside 1-65535"),
        ({"-3": "minus"}, r"label id '-3' is outside 1-65535"),
        ({"1.5": "half"}, r"label id '1.5' is not an integer"),
        ({"1": "liver", "2": "liver"}, r"labels.json: region name 'liver' has two ids: 1 and 2"),
    ],
)
def test_labels_json_ids_are_bounded(tmp_path: Path, table: dict[str, str], match: str) -> None:
    # a label id of 4e9 made attribute allocate 96-715 GB for its per-label tables
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(table), encoding="utf-8")
    with pytest.raises(InputError, match=match):
        LabelTable.from_json(path)


def test_label_table_bound_and_utf8(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"label id 65536 of 'x' is larger than 65535"):
        LabelTable({MAX_LABEL_ID + 1: "x"})
    assert LabelTable({MAX_LABEL_ID: "x"}).max_id == 65535
    path = tmp_path / "labels.json"
    path.write_bytes('{"1": "f\u00e9mur"}'.encode("latin-1"))
    with pytest.raises(InputError, match=r"labels.json: not UTF-8 text \(invalid continuation byte at byte 8\)"):
        LabelTable.from_json(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"1": "liver"}).encode())  # a byte-order mark is fine
    assert LabelTable.from_json(path).names == {1: "liver"}


def test_mask_values_must_be_label_ids(tmp_path: Path) -> None:
    labels = np.zeros((4, 4, 4), dtype=np.float32)
    labels[1, 1, 1], labels[2, 2, 2] = 5.0, 53.0
    ok = load_labels(save_volume(tmp_path / "ok.nii.gz", labels, AFFINE))
    assert ok.data.dtype == np.uint8 and sorted(np.unique(ok.data)) == [0, 5, 53]
    labels[3, 3, 3] = 2.7  # used to be truncated to label 2 on its way into the cache
    with pytest.raises(InputError, match=r"frac.nii.gz: mask holds non-integer values \(e.g. 2.7 in 1 voxels\)"):
        load_labels(save_volume(tmp_path / "frac.nii.gz", labels, AFFINE))
    labels[3, 3, 3] = 70000.0
    with pytest.raises(InputError, match=r"big.nii.gz: mask holds label id 70000, above the largest allowed \(65535\)"):
        load_labels(save_volume(tmp_path / "big.nii.gz", labels, AFFINE))
    labels[3, 3, 3] = np.nan
    with pytest.raises(InputError, match=r"nan.nii.gz: mask holds 1 NaN or infinite voxels"):
        load_labels(save_volume(tmp_path / "nan.nii.gz", labels, AFFINE))


def test_preprocess_refuses_a_non_integer_mask(tmp_path: Path) -> None:
    # train and attribute used to truncate a mask value of 2.7 to label 2
    from bodyage.preprocess import PreprocessSettings, preprocess_scan

    study = _cohort(tmp_path / "study")
    rng = np.random.default_rng(0)
    for name in ("w1", "w2", "f1", "f2"):
        save_volume(study / "images" / f"{name}.nii.gz", rng.uniform(0.5, 1.0, (8, 8, 8)), AFFINE)
    mask = np.zeros((8, 8, 8), dtype=np.float32)
    mask[2:6, 2:6, 2:6] = 5.0
    mask[4, 4, 4] = 2.7
    save_volume(study / "masks" / "m1.nii.gz", mask, AFFINE)
    cohort = pd.read_csv(study / "cohort.csv")
    cohort["mask"] = ["masks/m1.nii.gz", ""]
    cohort.to_csv(study / "cohort.csv", index=False)
    loaded = load_study(study)
    with pytest.raises(InputError, match=r"scan S001_0, mask: .*m1.nii.gz: mask holds non-integer values \(e.g. 2.7"):
        preprocess_scan(loaded, loaded.cohort.iloc[0], PreprocessSettings(grid=(8, 8, 8), channels=("water", "fat")))


# ----------------------------------------------------------------------------- YAML

BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
subjects: [*c, *c, *c, *c, *c, *c, *c, *c, *c]
"""


def test_yaml_aliases_are_refused(tmp_path: Path) -> None:
    # an alias bomb under a known key printed a 4.3 MB error line (and bigger ones ran for minutes)
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB, encoding="utf-8")
    with pytest.raises(
        ScenarioError, match=r"^scenario bomb.yaml: line 1: YAML anchors and aliases \(&name, \*name\) are not allowed$"
    ):
        load_scenario(path)
    with pytest.raises(ScenarioError, match="line 2: YAML anchors and aliases"):
        parse_yaml("subjects: 10\nseed: &s 3\n", what="x")


def test_cli_alias_bomb_is_one_short_line(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB, encoding="utf-8")
    res = subprocess.run(
        [sys.executable, "-m", "cli.app", "simulate", str(tmp_path / "s"), "--scenario", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        "error: scenario bomb.yaml: line 1: YAML anchors and aliases (&name, *name) are not allowed"
    ]


def test_yaml_size_encoding_and_depth(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("subjects: 10\n" + "#" * MAX_YAML_BYTES + "\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"scenario big.yaml: 1,000,014 bytes, larger than the 1,000,000"):
        load_scenario(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("subjects: 10\nsites: {name: M\u00fcnster}\n".encode("latin-1"))
    with pytest.raises(ScenarioError, match=r"scenario latin.yaml: not UTF-8 text \(invalid start byte at byte 28\)"):
        load_scenario(latin)
    # PyYAML needs minutes for 50,000 nested brackets (time grows with the square of the depth)
    with pytest.raises(ScenarioError, match=r"^x: line 1: nested more than 32 levels deep$"):
        parse_yaml("[" * 50_000, what="x")
    with pytest.raises(ScenarioError, match=r"^x: line 33: nested more than 32 levels deep$"):
        parse_yaml("".join(" " * i + "a:\n" for i in range(40)), what="x")
    assert parse_yaml("a: [[1, 2], {b: [3]}]", what="x") == {"a": [[1, 2], {"b": [3]}]}


# ----------------------------------------------------------------------------- quoting in messages


def test_quoted_values_are_cut() -> None:
    assert quoted("short") == "'short'"
    long = quoted("x" * 5000)
    assert long == "'" + "x" * 79 + "... (5002 characters)"


def test_error_lines_are_cut() -> None:
    line = one_line("a  b\n" + "y" * 4_000_000)
    assert line.startswith("a b y") and len(line) < MAX_MESSAGE_CHARS + 60
    assert line.endswith(f"... (message cut at {MAX_MESSAGE_CHARS} of 4000004 characters)")
    assert one_line("fine\nmessage") == "fine message"
