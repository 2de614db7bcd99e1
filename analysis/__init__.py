"""Statistics on bodyage's tables: age gap, mixed models, comparisons, LaTeX, figures.

This package never imports torch (nor captum or TotalSegmentator), so a statistician can
run ``bodyage stats`` on the tables of a run without the deep-learning stack. The
contract is checked by import-linter and by ``tests/test_layers.py``.
"""
