"""Short, user-facing sentences about model warnings, for table notes and summaries.

A table note is read by someone deciding whether to trust a number, so it says how many
models had which kind of problem and where the details are, e.g. "Warnings: 2 models
with a random-intercept variance on the boundary (≈ 0); see the warning column of
phenotype_models.csv." The raw texts (statsmodels' own messages, solver fallbacks) stay
in the tidy tables' ``warning`` column.
"""

from __future__ import annotations

from collections.abc import Iterable

#: kinds of warning, in the order a note lists them: (words after "N models",
#: lower-case substrings of a raw warning that mark it)
WARNING_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("with a random-intercept variance on the boundary (≈ 0)", ("boundary", "singular")),
    ("that did not converge at first", ("converge",)),
    ("refitted by the profiled-REML solver", ("refitted",)),
    ("without a random intercept (a single group)", ("single level",)),
    ("with a predictor left out (constant on the rows used)", ("constant on the rows", "left out")),
    ("that could not be estimated (too few scans or a collinear predictor)", ("could not be estimated",)),
    ("with a numerical warning", ("hessian", "positive definite", "overflow", "divide by zero", "invalid value")),
)
OTHER_KIND = "with another warning"


def warning_kinds(text: str) -> list[str]:
    """The kinds (:data:`WARNING_KINDS` words) of one model's warning text, ``"; "``-joined parts."""
    kinds: list[str] = []
    for part in (p.strip() for p in str(text).split(";")):
        if not part:
            continue
        low = part.lower()
        matched = [words for words, marks in WARNING_KINDS if any(m in low for m in marks)]
        kinds.extend(matched or [OTHER_KIND])
    return list(dict.fromkeys(kinds))


def summarise_warnings(texts: Iterable[object], *, unit: str = "model", where: str = "") -> str:
    """One sentence counting the models with each kind of warning ('' when there is none).

    Parameters
    ----------
    texts
        One warning text per model (empty, ``None`` or NaN: no warning); a text may join
        several warnings with ``"; "``.
    unit
        What a text belongs to, singular (``"model"``, ``"region model"``).
    where
        Where the full texts are, e.g. ``"the warning column of phenotype_models.csv"``.

    Returns
    -------
    str
        e.g. ``"Warnings: 2 models with a random-intercept variance on the boundary (≈ 0),
        1 model refitted by the profiled-REML solver; see the warning column of
        phenotype_models.csv."``
    """
    counts: dict[str, int] = {}
    for text in texts:
        if text is None or text != text or not str(text).strip():  # None, NaN, ""
            continue
        for kind in warning_kinds(str(text)):
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return ""
    order = [words for words, _ in WARNING_KINDS] + [OTHER_KIND]
    parts = [f"{counts[k]} {unit if counts[k] == 1 else unit + 's'} {k}" for k in order if k in counts]
    return "Warnings: " + ", ".join(parts) + (f"; see {where}." if where else ".")
