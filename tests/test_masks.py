"""Label maps: counting, precedence, reading both layouts, alignment to the image, writing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from segment_factories import SHAPE, affine, ellipsoid

from bodyage.errors import InputError
from bodyage.masks import (
    MaskMismatchError,
    UnknownLabelError,
    align_to_image,
    combine_label_maps,
    embedded_label_map,
    grid_of,
    label_counts,
    label_dtype,
    read_multilabel,
    read_region_folder,
    read_stamp,
    relabel,
    write_mask,
)
from bodyage.regions import LabelTable, combined_label_table
from bodyage.volumes import Volume, load_volume

TABLE = combined_label_table()
TISSUE_IDS = frozenset({51, 52, 53})


def _vol(data: np.ndarray, aff: np.ndarray | None = None) -> Volume:
    return Volume(data=data, affine=affine() if aff is None else aff)


def test_label_counts_is_a_bincount(rng: np.random.Generator) -> None:
    labels = rng.integers(0, 6, size=(7, 5, 4)).astype(np.uint8)
    counts = label_counts(labels, 10)
    assert counts.shape == (10,)
    for i in range(10):
        assert counts[i] == int((labels == i).sum())


def test_label_dtype() -> None:
    assert label_dtype(53) == np.uint8
    assert label_dtype(300) == np.uint16
    with pytest.raises(InputError, match="does not fit a uint16"):
        label_dtype(70000)


def test_organs_win_over_tissue() -> None:
    organs = np.array([0, 5, 0, 3, 0], dtype=np.uint8)  # liver, kidney_left
    tissue = np.array([51, 53, 0, 53, 52], dtype=np.uint8)
    out = combine_label_maps(organs, tissue, np.uint8)
    np.testing.assert_array_equal(out, [51, 5, 0, 3, 52])
    np.testing.assert_array_equal(combine_label_maps(organs, None, np.uint8), organs)
    np.testing.assert_array_equal(combine_label_maps(None, tissue, np.uint8), tissue)
    with pytest.raises(InputError, match="at least one"):
        combine_label_maps(None, None, np.uint8)


def test_relabel_maps_ids_and_refuses_unknown_ones() -> None:
    data = np.array([0, 1, 2, 3, 2], dtype=np.uint8)
    out = relabel(data, {1: 51, 2: 52, 3: 53}, np.uint8, what="tissue map")
    np.testing.assert_array_equal(out, [0, 51, 52, 53, 52])
    with pytest.raises(UnknownLabelError, match=r"mask X: unknown label id\(s\) 7, 9 \(known ids: 1, 2\)"):
        relabel(np.array([0, 1, 7, 9, 2]), {1: 1, 2: 2}, np.uint8, what="mask X")


def test_relabel_refuses_non_integer_and_negative_labels() -> None:
    with pytest.raises(InputError, match="non-integer values"):
        relabel(np.array([0.0, 1.5]), {1: 1}, np.uint8, what="m")
    with pytest.raises(InputError, match="negative label ids"):
        relabel(np.array([0, -1]), {1: 1}, np.uint8, what="m")
    np.testing.assert_array_equal(relabel(np.array([0.0, 1.0]), {1: 5}, np.uint8, what="m"), [0, 5])


def _caret(img: nib.Nifti1Image, names: dict[int, str]) -> nib.Nifti1Image:
    body = "".join(
        f'<Label Key="{k}" Red="1" Green="0" Blue="0" Alpha="1"><![CDATA[{v}]]></Label>\n' for k, v in names.items()
    )
    xml = (
        '<?xml version="1.0"?><CaretExtension><VolumeInformation Index="0">'
        f"<LabelTable>{body}</LabelTable></VolumeInformation></CaretExtension>"
    )
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml.encode("utf-8")))
    return img


def test_multilabel_with_an_embedded_label_map_is_matched_by_name(tmp_path: Path) -> None:
    # a tissue_types_mr output: ids 1-3 that mean the study's 51-53
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[2:5, 2:5, 2:5] = 1
    data[8:10, 8:10, 8:10] = 3
    path = tmp_path / "tissue.nii.gz"
    nib.save(
        _caret(nib.Nifti1Image(data, affine()), {1: "subcutaneous_fat", 2: "torso_fat", 3: "skeletal_muscle"}), path
    )
    assert embedded_label_map(path) == {1: "subcutaneous_fat", 2: "torso_fat", 3: "skeletal_muscle"}
    vol, notes = read_multilabel(path, TABLE, scan="S1_0")
    assert set(np.unique(vol.data)) == {0, 51, 53}
    assert notes == ["ids mapped by the region names embedded in the file"]


def test_multilabel_embedded_unknown_name_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.nii.gz"
    nib.save(_caret(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), affine()), {1: "liver", 2: "hepatic_tumour"}), path)
    with pytest.raises(UnknownLabelError, match=r"scan S1_0: .* unknown region name\(s\) hepatic_tumour"):
        read_multilabel(path, TABLE, scan="S1_0")


def test_multilabel_without_names_uses_the_study_ids(tmp_path: Path) -> None:
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[1:3, 1:3, 1:3] = 5
    data[5, 5, 5] = 60  # not in the combined table (1-53)
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(data, affine()), path)
    with pytest.raises(UnknownLabelError, match=r"scan S1_0: mask .*m.nii.gz: unknown label id\(s\) 60"):
        read_multilabel(path, TABLE, scan="S1_0")


def _write_regions(folder: Path, regions: dict[str, np.ndarray], aff: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in regions.items():
        nib.save(nib.Nifti1Image(m.astype(np.uint8), affine() if aff is None else aff), folder / f"{name}.nii.gz")
    return folder


def test_region_folder_puts_organs_over_tissue_and_notes_organ_overlap(tmp_path: Path) -> None:
    muscle = ellipsoid(SHAPE, (10, 8, 15), (8, 6, 12))
    liver = ellipsoid(SHAPE, (10, 8, 15), (3, 3, 3))
    spleen = np.zeros(SHAPE, dtype=bool)
    spleen[10, 8, 15] = True  # one voxel claimed by liver and spleen
    folder = _write_regions(tmp_path / "S1_0", {"skeletal_muscle": muscle, "liver": liver, "spleen": spleen})
    (folder / "statistics.json").write_text("{}")  # TotalSegmentator's extra files are ignored
    vol, notes = read_region_folder(folder, TABLE, scan="S1_0", tissue_ids=TISSUE_IDS)
    assert vol.data[10, 8, 15] == 5  # liver (5) beats spleen (1): the higher id wins, as in TotalSegmentator
    assert (vol.data[liver & ~spleen] == 5).all()
    assert (vol.data[muscle & ~liver] == 53).all()
    assert notes == ["1 voxels claimed by two organ files (higher id kept)"]


def test_region_folder_unknown_region_name_is_an_error(tmp_path: Path) -> None:
    cube = np.zeros(SHAPE, dtype=bool)
    folder = _write_regions(tmp_path / "S1_0", {"liver": cube, "lung_upper_lobe_left": cube})
    with pytest.raises(UnknownLabelError, match=r"scan S1_0: .* unknown region\(s\) lung_upper_lobe_left"):
        read_region_folder(folder, TABLE, scan="S1_0")


def test_region_folder_files_on_different_grids_are_an_error(tmp_path: Path) -> None:
    folder = _write_regions(tmp_path / "S1_0", {"liver": np.zeros(SHAPE, bool)})
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), affine()), folder / "spleen.nii.gz")
    with pytest.raises(MaskMismatchError, match=r"scan S1_0: .* are on different grids"):
        read_region_folder(folder, TABLE, scan="S1_0")


# ---------------------------------------------------------------- the three alignment outcomes


def test_alignment_same_grid_is_ok() -> None:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:6, 3:6, 3:6] = 5
    image = _vol(np.zeros(SHAPE, np.int16))
    nudged = affine()
    nudged[0, 3] += 1e-4  # within tolerance
    out = align_to_image(_vol(labels, nudged), image, scan="S1_0", source="m")
    assert not out.resampled and out.note is None
    np.testing.assert_array_equal(out.data, labels)


def test_alignment_same_field_of_view_other_grid_is_resampled_nearest_neighbour() -> None:
    # the image: 4 mm voxels; the mask: 8 mm voxels over the same box
    image = _vol(np.zeros(SHAPE, np.int16))
    coarse_shape = (SHAPE[0] // 2, SHAPE[1] // 2, SHAPE[2] // 2)
    coarse = np.zeros(coarse_shape, dtype=np.uint8)
    coarse[2:4, 2:4, 3:6] = 5
    coarse[6, 6, 10] = 1
    # same box: the first coarse voxel's outer edge = the first fine voxel's outer edge
    a = affine(8.0, origin=(-40.0 + 2.0, -30.0 + 2.0, -60.0 + 2.0))
    out = align_to_image(_vol(coarse, a), image, scan="S1_0", source="m")
    assert out.resampled and out.data.shape == SHAPE and out.data.dtype == np.uint8
    expected = np.repeat(np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(out.data, expected)
    assert out.note is not None and "resampled (nearest neighbour) from a (10, 8, 15) grid" in out.note


def test_alignment_elsewhere_is_a_mismatch_naming_scan_and_numbers() -> None:
    image = _vol(np.zeros(SHAPE, np.int16))
    shifted = affine(origin=(-40.0, -30.0, -20.0))  # 40 mm higher
    with pytest.raises(
        MaskMismatchError,
        match=r"scan S7_1: mask m.nii.gz does not match its image: .* fields of view differ by up to 40.0 mm",
    ):
        align_to_image(_vol(np.zeros(SHAPE, np.uint8), shifted), image, scan="S7_1", source="m.nii.gz")
    other_shape = np.zeros((20, 16, 40), np.uint8)
    with pytest.raises(MaskMismatchError, match=r"shape \(20, 16, 40\) with 4×4×4 mm voxels vs the image's"):
        align_to_image(_vol(other_shape), image, scan="S7_1", source="m.nii.gz")


# ---------------------------------------------------------------- grids and writing


def _lps_affine() -> np.ndarray:
    a = np.diag([-4.0, -4.0, 4.0, 1.0])
    a[:3, 3] = (40.0, 30.0, -60.0)
    return a


def test_grid_of_matches_load_volume_without_reading_voxels(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "img.nii.gz"
    data = rng.integers(0, 1000, size=(6, 5, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(data.transpose(1, 0, 2), _lps_affine()[[1, 0, 2, 3]]), path)  # P, L, S axes
    full = load_volume(path)
    grid = grid_of(path)
    assert grid.shape == full.shape
    np.testing.assert_allclose(grid.affine, full.affine)
    assert grid.orientation == full.orientation == ("P", "L", "S")


def test_grid_of_refuses_singular_affine(tmp_path: Path) -> None:
    path = tmp_path / "img.nii.gz"
    img = nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), None)
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # no qform: nibabel cannot write a singular one
    nib.save(img, path)
    with pytest.raises(InputError, match="singular affine"):
        grid_of(path)


def test_write_mask_uses_the_image_file_orientation_and_stamps(tmp_path: Path) -> None:
    image_path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), _lps_affine()), image_path)
    image = load_volume(image_path)  # RAS+
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[0, 0, 0] = 5  # RAS voxel (0,0,0) is the file's (19,15,0)
    out = write_mask(tmp_path / "m.nii.gz", labels, image, image_path, fingerprint="abc123", dtype=np.uint8)
    on_disk = nib.load(str(out))
    np.testing.assert_allclose(on_disk.affine, _lps_affine())
    assert np.asarray(on_disk.dataobj)[19, 15, 0] == 5
    assert on_disk.get_data_dtype() == np.uint8
    assert read_stamp(out) == "abc123"
    back = load_volume(out)
    np.testing.assert_array_equal(back.data, labels)
    assert not list(tmp_path.glob(".*tmp*"))


def test_read_stamp_of_an_unstamped_or_broken_file_is_none(tmp_path: Path) -> None:
    plain = tmp_path / "p.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), plain)
    assert read_stamp(plain) is None
    broken = tmp_path / "b.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08 not really")
    assert read_stamp(broken) is None


def test_custom_label_table_ids_are_respected(tmp_path: Path) -> None:
    table = LabelTable({1: "liver", 300: "spleen"})
    data = np.zeros(SHAPE, dtype=np.uint16)
    data[2, 2, 2] = 300
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(data, affine()), path)
    vol, _ = read_multilabel(path, table, scan="S1_0")
    assert vol.data.dtype == np.uint16 and vol.data[2, 2, 2] == 300


def test_read_stamp_of_a_damaged_gzip_is_none(tmp_path: Path) -> None:
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(path))
    raw = path.read_bytes()
    for start in range(10, 60, 5):  # damaged deflate data raised zlib.error before
        damaged = bytearray(raw)
        damaged[start : start + 6] = b"\xff" * 6
        path.write_bytes(bytes(damaged))
        assert read_stamp(path) is None
