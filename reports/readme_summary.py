"""Refresh the README's one measured line from ``docs/results/demo.json``.

The README holds exactly one measured sentence, between the markers
``<!-- summary:start -->`` and ``<!-- summary:end -->``; this script rewrites what is
between them (``reports/docs_results.py`` calls it after writing ``demo.json``)::

    python reports/readme_summary.py [README.md] [docs/results/demo.json]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- summary:start -->", "<!-- summary:end -->"
NOT_MEASURED = (
    "Not measured yet: run `make demo`, then `python reports/docs_results.py demo` to write this line "
    "and the [validation page](docs/results/validation.md)."
)


def _n(value: Any, digits: int = 2) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return f"{value:.{digits}g}" if 0 < abs(value) < 1e-3 else f"{value:.{digits}f}"


def summary_line(demo: dict[str, Any] | None) -> str:
    """The README's sentence for one ``demo.json`` (or the not-measured sentence)."""
    if not demo or demo.get("mae") is None:
        return NOT_MEASURED
    src = demo.get("source") or {}
    parts = [f"out-of-fold MAE {_n(demo['mae'])} years against the oracle's {_n(demo.get('oracle_mae'))}"]
    methods = ((demo.get("tables") or {}).get("methods") or {}).get("rows") or []
    for row in methods:
        if row[0] == "`ablation`" and row[2] is not None:
            parts.append(f"ablation precision@{row[1]} {row[2]} (best model-free floor {row[3] or 'not measured'})")
    phen = ((demo.get("tables") or {}).get("phenotypes") or {}).get("rows") or []
    for row in phen:
        if row[0] == "`diabetes`" and row[2] is not None:
            parts.append(f"diabetes raises the corrected age gap by {row[2]} years (q {row[4]})")
    if demo.get("goals_met"):
        parts.append(f"goals met {demo['goals_met']}")
    total = (demo.get("minutes") or {}).get("total")
    if total is not None:
        parts.append(f"{_n(total, 1)} minutes in all")
    cpu = (src.get("machine") or {}).get("cpu_model") or "an unnamed CPU"
    return (
        f"Measured by `bodyage demo` (bodyage {src.get('bodyage_version')}, {cpu}): "
        + "; ".join(parts)
        + " ([details](docs/results/validation.md))."
    )


def update_readme(readme: Path, demo_json: Path) -> bool:
    """Rewrite the line between the markers of ``readme``; ``True`` if it changed.

    Raises
    ------
    SystemExit
        If the README lacks the markers.
    """
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {START} ... {END} markers")
    demo = json.loads(demo_json.read_text(encoding="utf-8")) if demo_json.is_file() else None
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{summary_line(demo)}\n{END}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    args = sys.argv[1:]
    readme = Path(args[0]) if args else ROOT / "README.md"
    demo_json = Path(args[1]) if len(args) > 1 else ROOT / "docs" / "results" / "demo.json"
    update_readme(readme, demo_json)
    print(f"updated {readme}")
