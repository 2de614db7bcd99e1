"""The layer contract (DESIGN.md §2): checked with import-linter and by importing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _fresh_import(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)


def test_import_analysis_does_not_pull_in_torch() -> None:
    code = (
        "import sys, pkgutil, importlib, analysis\n"
        "for m in pkgutil.walk_packages(analysis.__path__, 'analysis.'):\n"
        "    if '.examples' in m.name: continue\n"
        "    importlib.import_module(m.name)\n"
        "heavy = ('torch', 'captum', 'torchvision', 'totalsegmentator.python_api')\n"
        "print(','.join(sorted(k for k in heavy if k in sys.modules)))\n"
    )
    res = _fresh_import(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"analysis pulled in: {res.stdout.strip()}"


def test_cli_help_does_not_import_torch() -> None:
    code = "import sys\nfrom cli.app import app\nprint('torch' in sys.modules)"
    res = _fresh_import(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.skipif(
    shutil.which("lint-imports") is None and not (Path(sys.executable).parent / "lint-imports").exists(),
    reason="import-linter not installed",
)
def test_import_linter_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    res = subprocess.run([exe], capture_output=True, text=True, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken" in res.stdout
