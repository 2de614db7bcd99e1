"""Global command-line flags set by the top-level callback."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class State:
    debug: bool = False
    quiet: bool = False


STATE = State()
