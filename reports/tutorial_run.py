"""Run the tutorial's commands as written -> ``docs/results/tutorial.json`` (minutes per step, the accuracy).

The commands are read from ``docs/getting-started/tutorial.md`` (the lines starting with
``bodyage`` in its ``bash`` code blocks), so the page and what is measured cannot drift;
``tests/test_tutorial.py`` runs the same commands. Run from the repository root::

    python3 reports/tutorial_run.py            # a few minutes on a laptop CPU

It works in a temporary folder and records the machine (CPUs, load average before and
after, torch's threads) with the numbers.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import RESULTS, ROOT, load_average, short_revision, write_json

PAGE = ROOT / "docs" / "getting-started" / "tutorial.md"
OUT = RESULTS / "tutorial.json"


def tutorial_commands(page: Path = PAGE) -> list[list[str]]:
    """The ``bodyage`` command lines of the page's ``bash`` blocks, in order, split like a shell."""
    commands: list[list[str]] = []
    in_bash = False
    for line in page.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = not in_bash and stripped[3:].strip() in ("bash", "sh", "console")
            continue
        if in_bash and stripped.startswith("bodyage "):
            commands.append(shlex.split(stripped))
    return commands


def main() -> None:
    """Run every command in a temporary folder, timing each, and write the JSON."""
    exe = shutil.which("bodyage") or str(Path(sys.executable).with_name("bodyage"))
    revision = short_revision()
    import torch

    steps: list[dict[str, Any]] = []
    load_before = load_average(2)
    with tempfile.TemporaryDirectory(prefix="bodyage-tutorial-") as tmp:
        for argv in tutorial_commands():
            t0 = time.perf_counter()
            subprocess.run([exe, "--quiet", *argv[1:]], cwd=tmp, check=True)
            steps.append({"command": " ".join(argv), "minutes": round((time.perf_counter() - t0) / 60.0, 2)})
            print(f"{steps[-1]['minutes']:6.2f} min  {steps[-1]['command']}", file=sys.stderr, flush=True)
        run = next(Path(tmp).glob("*/run/metrics.json"), None)
        metrics = json.loads(run.read_text()) if run is not None else {}
    overall = metrics.get("overall", {})
    result = {
        "script": "reports/tutorial_run.py",
        "revision": revision,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
            "load_average_before": load_before,
            "load_average_after": load_average(2),
        },
        "total_minutes": round(sum(s["minutes"] for s in steps), 1),
        "mae": overall.get("mae"),
        "oracle_mae": metrics.get("oracle_mae"),
        "steps": steps,
        "table": {
            "columns": ["command", "minutes"],
            "rows": [[f"`{s['command']}`", s["minutes"]] for s in steps],
        },
    }
    write_json(OUT, result)
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
