"""Literal aliases for option strings: one place, so choices cannot drift."""

from __future__ import annotations

from typing import Literal

Sex = Literal["F", "M"]
Device = Literal["auto", "cpu", "cuda"]
AgeingEffect = Literal["volume", "fat_fraction", "water_signal", "texture", "shape"]
PhenotypeType = Literal["binary", "continuous"]
AttributionMethod = Literal["gradcam", "integrated_gradients", "ablation", "shapley"]
ImportanceMeasure = Literal["share", "enrichment", "density", "abs_mass", "abs_density"]
ImagesAs = Literal["link", "path", "copy"]
QcFlag = Literal["unreadable", "nonfinite", "fat_water_swap", "missing_coverage", "extreme_intensity"]
SegmentTask = Literal["total_mr", "tissue_types_mr"]

SEXES: tuple[Sex, ...] = ("F", "M")
#: `--device` on every command (`gpu` is accepted for `cuda`: bodyage.device.DEVICE_ALIASES)
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")
AGEING_EFFECTS: tuple[AgeingEffect, ...] = ("volume", "fat_fraction", "water_signal", "texture", "shape")
#: the effects a phenotype's `anatomy` may have (texture and shape are ageing-only)
ANATOMY_EFFECTS: tuple[AgeingEffect, ...] = ("volume", "fat_fraction", "water_signal")
PHENOTYPE_TYPES: tuple[PhenotypeType, ...] = ("binary", "continuous")
#: how `cohort ukb` refers to the source NIfTIs: symlinks in STUDY/images, absolute paths, copies
IMAGES_AS: tuple[ImagesAs, ...] = ("link", "path", "copy")
#: the image-quality flags of `bodyage qc` (one boolean column each in STUDY/qc.csv)
QC_FLAGS: tuple[QcFlag, ...] = ("unreadable", "nonfinite", "fat_water_swap", "missing_coverage", "extreme_intensity")
#: TotalSegmentator tasks `bodyage segment` runs (organs; tissue classes, licence needed)
SEGMENT_TASKS: tuple[SegmentTask, ...] = ("total_mr", "tissue_types_mr")
