"""MkDocs hooks: measured numbers and figures come from ``docs/results/*.json``, never typed by hand.

Pages write placeholders that this hook fills in when the site is built:

``{{ results.demo.mae }}``
    The value at that path of ``docs/results/demo.json`` (written by ``reports/docs_results.py``).
``{{ results.demo.mae:.2f }}``
    The same, formatted with a Python format specification.
``{{ results.bench.tables.comparisons }}``
    A table: a value ``{"columns": [...], "rows": [[...], ...]}`` becomes a Markdown table.
``{{ figure results/figures/predicted_vs_age.png | Predicted against chronological age }}``
    An image (path relative to ``docs/``) with its caption, if the file exists.

A results file that does not exist yet, or a ``null`` value, renders as *not measured yet*, so the
site builds from a fresh clone. A key that the file lacks is a typo in a page: it is logged as a
warning, which fails ``mkdocs build --strict``.

Docstrings cite the design notes as "DESIGN.md §N"; in the built pages (the API reference) each
such mention becomes a link to the same section of ``docs/design.md``, whose sections carry the
same numbers.

The hook also publishes ``reports/demo_overview.png`` (the README's picture) as
``assets/demo_overview.png``, so the site and the README show the same file.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.results")

#: the placeholder of a value: ``{{ results.<file>.<key>[.<key>...][:<format>] }}``
VALUE = re.compile(r"\{\{\s*results\.([A-Za-z0-9_-]+)((?:\.[A-Za-z0-9_@-]+)*)\s*(?::([^}\s]+))?\s*\}\}")
#: the placeholder of a figure: ``{{ figure <path> | <caption> }}``
FIGURE = re.compile(r"\{\{\s*figure\s+([^|}\s]+)\s*(?:\|\s*([^}]*?))?\s*\}\}")
NOT_MEASURED = "*not measured yet*"
#: files outside ``docs/`` that the site publishes: repository path -> site path
PUBLISHED = {"reports/demo_overview.png": "assets/demo_overview.png"}

#: a docstring's mention of the design page, e.g. "docs/design.md §3" (older: "DESIGN.md §3", "DESIGN §7")
DESIGN_MENTION = re.compile(
    r"(?:\bDESIGN(?:\.md)?|\bdocs/design\.md)\s*(?:§|&sect;)\s*(\d+)|\bDESIGN\.md\b|\bdocs/design\.md\b"
)

_MISSING = object()


def load_results(results_dir: Path) -> dict[str, Any]:
    """Read every ``*.json`` of ``results_dir`` into ``{stem: content}`` (no folder: ``{}``).

    Raises
    ------
    ValueError
        If a file is not valid JSON (named in the message).
    """
    out: dict[str, Any] = {}
    if not results_dir.is_dir():
        return out
    for path in sorted(results_dir.glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path.name}: not valid JSON ({err}); run reports/docs_results.py again") from err
    return out


def lookup(data: Any, keys: list[str]) -> Any:
    """Follow ``keys`` into nested dicts (and lists, by index); ``_MISSING`` if a key is absent."""
    for key in keys:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        else:
            return _MISSING
    return data


def markdown_table(table: dict[str, Any]) -> str:
    """A ``{"columns": [...], "rows": [[...]]}`` value as a Markdown table (``|`` escaped in cells)."""

    def cell(v: Any) -> str:
        text = NOT_MEASURED if v is None else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    columns = [cell(c) for c in table["columns"]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def render_value(value: Any, spec: str | None) -> str:
    """Text of one value: tables as Markdown, numbers with ``spec``, ``None`` as not measured."""
    if value is None:
        return NOT_MEASURED
    if isinstance(value, dict) and "columns" in value and "rows" in value:
        return "\n" + markdown_table(value) + "\n"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec:
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def fill(markdown: str, results: dict[str, Any], docs_dir: Path, page: str = "") -> str:
    """Replace the placeholders of one page; log a warning for a key a results file lacks."""

    def value(match: re.Match[str]) -> str:
        name, path, spec = match.group(1), match.group(2), match.group(3)
        text, start, end = match.string, match.start(), match.end()
        in_code = start > 0 and text[start - 1] == "`" and end < len(text) and text[end] == "`"
        missing = NOT_MEASURED.strip("*") if in_code else NOT_MEASURED  # no emphasis inside `code`
        if name not in results:
            return missing
        keys = [k for k in path.split(".") if k]
        found = lookup(results[name], keys)
        if found is _MISSING:
            log.warning("%s: docs/results/%s.json has no key %r", page, name, ".".join(keys))
            return missing
        return missing if found is None else render_value(found, spec)

    def figure(match: re.Match[str]) -> str:
        path, caption = match.group(1), (match.group(2) or "").strip()
        if not (docs_dir / path).is_file():
            return f"{NOT_MEASURED} (figure `{path}`)"
        page_dir = Path(page).parent
        rel = Path(*([".."] * len(page_dir.parts)), path) if page_dir.parts else Path(path)
        return f"![{caption}]({rel.as_posix()})\n\n*{caption}*" if caption else f"![]({rel.as_posix()})"

    return VALUE.sub(value, FIGURE.sub(figure, markdown))


# ------------------------------------------------------------------ MkDocs entry points
def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill a page's placeholders from ``docs/results`` (read at every page, so ``serve`` sees new runs)."""
    docs_dir = Path(config["docs_dir"])
    return fill(markdown, load_results(docs_dir / "results"), docs_dir, page.file.src_uri)


def link_design(html: str, page_uri: str) -> str:
    """Turn "DESIGN.md §N" in rendered HTML into a link to section N of ``design.md``."""
    up = "../" * page_uri.count("/")

    def link(match: re.Match[str]) -> str:
        section = match.group(1)
        anchor = f"#s{section}" if section else ""
        text = f"design §{section}" if section else "design notes"
        return f'<a href="{up}design.html{anchor}">{text}</a>'

    return DESIGN_MENTION.sub(link, html)


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Link the docstrings' mentions of the design notes to ``design.md`` (see the module docstring)."""
    if page.file.src_uri == "design.md":
        return html
    return link_design(html, page.file.src_uri)


def on_files(files: Any, config: Any) -> Any:
    """Publish the repository files of ``PUBLISHED`` (e.g. the README's picture) in the site."""
    from mkdocs.structure.files import File

    root = Path(config["config_file_path"]).parent
    for src, dest in PUBLISHED.items():
        if (root / src).is_file():
            files.append(File.generated(config, dest, abs_src_path=str(root / src)))
    return files
