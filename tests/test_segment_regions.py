"""The region registry segment relies on: ids from TotalSegmentator's map, groups without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bodyage._typing import SEGMENT_TASKS
from bodyage.regions import (
    REGION_GROUPS,
    SEX_SPECIFIC_REGIONS,
    TISSUE_ID_OFFSET,
    combined_label_table,
    group_of,
)
from bodyage.totalseg import TASK_SPECS

ROOT = Path(__file__).resolve().parent.parent


def test_label_table_comes_from_totalsegmentators_class_map() -> None:
    class_map = pytest.importorskip(
        "totalsegmentator.map_to_binary", reason="TotalSegmentator is not installed (pip install 'bodyage[segment]')"
    ).class_map
    table = combined_label_table()
    for ts_id, name in class_map["total_mr"].items():
        assert table.names[int(ts_id)] == name
    for ts_id, name in class_map["tissue_types_mr"].items():
        assert table.names[TISSUE_ID_OFFSET + int(ts_id)] == name
    assert table.ids == list(range(1, 54))
    assert table.names[51] == "subcutaneous_fat" and table.names[53] == "skeletal_muscle"


def test_task_specs_cover_the_task_choices_and_offsets() -> None:
    assert tuple(TASK_SPECS) == SEGMENT_TASKS
    assert TASK_SPECS["total_mr"].id_offset == 0
    assert TASK_SPECS["tissue_types_mr"].id_offset == TISSUE_ID_OFFSET
    assert not TASK_SPECS["total_mr"].needs_license and TASK_SPECS["tissue_types_mr"].needs_license
    assert TASK_SPECS["total_mr"].has_fast and not TASK_SPECS["tissue_types_mr"].has_fast


def test_groups_name_only_known_regions() -> None:
    known = set(combined_label_table().regions)
    for group, members in REGION_GROUPS.items():
        assert set(members) <= known, group
    assert set(SEX_SPECIFIC_REGIONS) <= known
    assert group_of("kidney_left") == "kidney"
    assert group_of("gluteus_maximus_right") == "gluteus_maximus"
    assert group_of("liver") == "liver"


def test_group_registry_imports_without_torch() -> None:
    code = (
        "import sys, json\n"
        "from bodyage.regions import REGION_GROUPS, combined_label_table, group_of, region_kind\n"
        "import bodyage.masks, bodyage.segment\n"
        "t = combined_label_table()\n"
        "heavy = [m for m in ('torch', 'totalsegmentator.python_api', 'nnunetv2') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'n': len(t.ids), 'kidney': list(REGION_GROUPS['kidney'])}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out == {"heavy": [], "n": 53, "kidney": ["kidney_left", "kidney_right"]}
