"""Import a script of ``reports/`` in tests, as it runs: ``python reports/NAME.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def load_report_script(name: str) -> ModuleType:
    """``reports/<name>.py`` as a module (registered in ``sys.modules``; ``reports/`` on the path, so a
    script importing a sibling, as attribution_seeds imports dev_selection, works as when run)."""
    if str(REPORTS) not in sys.path:
        sys.path.insert(0, str(REPORTS))
    spec = importlib.util.spec_from_file_location(name, REPORTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
