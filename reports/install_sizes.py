"""Measure each install variant in a fresh virtual environment -> ``docs/results/install.json``.

Each variant is installed from a clean export of the committed tree (``git archive HEAD``)
into its own new venv with the same ``pip install`` commands the Makefile runs; the script
records the wall time of the install, the size of the venv (``du``), its largest packages,
and the machine (CPUs, load average before and after). Run from the repository root::

    python3 reports/install_sizes.py            # every variant, several minutes each
    python3 reports/install_sizes.py demo       # only some

The numbers depend on the package index (a local mirror installs faster than the internet)
and on the machine's load, which is why both are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import RESULTS, ROOT, load_average, short_revision, write_json

OUT = RESULTS / "install.json"


def make_variable(name: str) -> str:
    """The default of a ``?=`` variable of the Makefile (one source for the torch pins)."""
    match = re.search(rf"^{name}\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"Makefile: no variable {name}")
    return match.group(1).strip()


def variants() -> dict[str, dict[str, Any]]:
    """The install variants: name -> description and the pip commands (``{src}`` is the source tree)."""
    torch_cpu = make_variable("TORCH_SPEC").split()
    torch_pair = make_variable("TORCHVISION_SPEC").split()
    test_extras = make_variable("TEST_EXTRAS")
    return {
        "demo": {
            "what": "make demo / make install: CPU torch, no TotalSegmentator",
            "commands": [torch_cpu, ["{src}"]],
        },
        "cuda": {
            "what": "torch's default (CUDA) build, no TotalSegmentator: a GPU cluster with imported masks",
            "commands": [torch_pair[:1], ["{src}"]],
        },
        "segment": {
            "what": "make install-segment: the torch/torchvision pair and bodyage[segment] (TotalSegmentator)",
            "commands": [[*torch_pair, "{src}[segment]"]],
        },
        "test": {
            "what": f"make test: the torch/torchvision pair and bodyage[{test_extras},docs]",
            "commands": [[*torch_pair, f"{{src}}[{test_extras},docs]"]],
        },
    }


def du_bytes(path: Path) -> int:
    """Disk usage of ``path`` in bytes (``du -sb``)."""
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def largest_packages(venv: Path, n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` largest folders of the venv's site-packages, in MB."""
    site = next(venv.glob("lib/python*/site-packages"))
    sizes = [(p.name, du_bytes(p)) for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")]
    sizes.sort(key=lambda t: -t[1])
    return [{"package": name, "mb": round(b / 1e6, 1)} for name, b in sizes[:n]]


def measure(name: str, spec: dict[str, Any], src: Path, work: Path) -> dict[str, Any]:
    """Install one variant into a fresh venv and return its time and size."""
    venv = work / f"venv-{name}"
    load_before = load_average(2)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--no-cache-dir"]
    commands = []
    for args in spec["commands"]:
        argv = [a.replace("{src}", str(src)) for a in args]
        commands.append("pip install " + " ".join(a.replace(str(src), ".") for a in argv))
        subprocess.run(pip + argv, check=True)
    seconds = time.perf_counter() - t0
    check = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import torch, bodyage, importlib.util as u; "
            "print(torch.__version__, u.find_spec('totalsegmentator') is not None)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    size = du_bytes(venv)
    row = {
        "what": spec["what"],
        "commands": commands,
        "minutes": round(seconds / 60.0, 1),
        "size_gb": round(size / 1e9, 2),
        "torch": check[0],
        "totalsegmentator": check[1] == "True",
        "largest_packages": largest_packages(venv),
        "load_average_before": load_before,
        "load_average_after": load_average(2),
    }
    shutil.rmtree(venv)
    return row


def main() -> None:
    """Measure the variants named on the command line (all by default) and write the JSON."""
    known = variants()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help=f"variants to measure: {', '.join(known)} [default: all]")
    args = parser.parse_args()
    names = args.variants or list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    revision = short_revision()
    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    rows: dict[str, Any] = old.get("variants", {})
    with tempfile.TemporaryDirectory(prefix="bodyage-install-") as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        for name in names:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            rows[name] = measure(name, known[name], src, work)
            rows[name]["revision"] = revision
            print(f"  {rows[name]['minutes']} min, {rows[name]['size_gb']} GB", file=sys.stderr, flush=True)
    order = [n for n in known if n in rows]
    result = {
        "script": "reports/install_sizes.py",
        "revision": revision,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
            "index": "a local mirror of the package index (no download time)",
        },
        "variants": {n: rows[n] for n in order},
        "table": {
            "columns": ["variant", "what", "minutes", "size (GB)", "torch", "TotalSegmentator", "load before/after"],
            "rows": [
                [
                    n,
                    rows[n]["what"],
                    rows[n]["minutes"],
                    rows[n]["size_gb"],
                    rows[n]["torch"],
                    "yes" if rows[n]["totalsegmentator"] else "no",
                    f"{rows[n]['load_average_before'][0]} / {rows[n]['load_average_after'][0]}",
                ]
                for n in order
            ],
        },
    }
    write_json(OUT, result)
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
