"""TotalSegmentator's class maps of the tasks bodyage uses, shipped so the minimal install has them.

``bodyage`` reads the names from :mod:`totalsegmentator.map_to_binary` when TotalSegmentator is
installed (``pip install 'bodyage[segment]'``) and from this copy otherwise (simulate, masks
imported with ``segment --from``, ``cohort ukb``). A test compares the two whenever TotalSegmentator
is installed, so the copy cannot drift unnoticed; after a TotalSegmentator upgrade that changes
them, copy ``class_map["total_mr"]`` and ``class_map["tissue_types_mr"]`` here again.
"""

from __future__ import annotations

#: the TotalSegmentator version the maps below were copied from
TOTALSEGMENTATOR_VERSION = "2.18.0"

#: task -> {label id: region name}, as ``totalsegmentator.map_to_binary.class_map[task]``
CLASS_MAPS: dict[str, dict[int, str]] = {
    "total_mr": {
        1: "spleen",
        2: "kidney_right",
        3: "kidney_left",
        4: "gallbladder",
        5: "liver",
        6: "stomach",
        7: "pancreas",
        8: "adrenal_gland_right",
        9: "adrenal_gland_left",
        10: "lung_left",
        11: "lung_right",
        12: "esophagus",
        13: "small_bowel",
        14: "duodenum",
        15: "colon",
        16: "urinary_bladder",
        17: "prostate",
        18: "sacrum",
        19: "vertebrae",
        20: "intervertebral_discs",
        21: "spinal_cord",
        22: "heart",
        23: "aorta",
        24: "inferior_vena_cava",
        25: "portal_vein_and_splenic_vein",
        26: "iliac_artery_left",
        27: "iliac_artery_right",
        28: "iliac_vena_left",
        29: "iliac_vena_right",
        30: "humerus_left",
        31: "humerus_right",
        32: "scapula_left",
        33: "scapula_right",
        34: "clavicula_left",
        35: "clavicula_right",
        36: "femur_left",
        37: "femur_right",
        38: "hip_left",
        39: "hip_right",
        40: "gluteus_maximus_left",
        41: "gluteus_maximus_right",
        42: "gluteus_medius_left",
        43: "gluteus_medius_right",
        44: "gluteus_minimus_left",
        45: "gluteus_minimus_right",
        46: "autochthon_left",
        47: "autochthon_right",
        48: "iliopsoas_left",
        49: "iliopsoas_right",
        50: "brain",
    },
    "tissue_types_mr": {
        1: "subcutaneous_fat",
        2: "torso_fat",
        3: "skeletal_muscle",
    },
}
