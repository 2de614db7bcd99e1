"""Compare two cohorts of a run from Python: ``python compare_cohorts.py RUN``.

The same as ``bodyage compare RUN --cohort "diabetes == 1" --reference "diabetes == 0"
--match age,sex``, as a few lines a thesis script can build on.
"""

import sys

from analysis import compare, load_run


def main(run_dir: str) -> None:
    """Compare carriers of diabetes with matched non-carriers and print the findings."""
    run = load_run(run_dir)
    res = compare(run, cohort="diabetes == 1", reference="diabetes == 0", match="age,sex")
    print(f"{res.cohort} vs {res.reference}: {res.n_cohort} vs {res.n_reference} subjects")
    print(res.balance[["variable", "level", "smd_before", "smd_after"]].to_string(index=False))
    hits = res.significant()
    print(hits[["outcome", "method", "region", "difference", "hedges_g", "q"]].to_string(index=False))


if __name__ == "__main__":
    main(sys.argv[1])
