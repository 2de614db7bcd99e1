"""The synthetic cohort with planted ageing: the demo and the validation harness.

:func:`simulate_study` writes a study folder (docs/design.md §3) from a scenario (§5); the
oracle (:mod:`bodyage.simulate.oracle`) gives the floor models are judged against.
"""

from bodyage.simulate.cohort import SimulationResult, simulate_study

__all__ = ["SimulationResult", "simulate_study"]
