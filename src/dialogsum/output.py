"""What the commands print: tables for a terminal, whole lines for a pipe or a log file, JSON for programs.

A rich table fits the terminal's width by cutting and wrapping cells; in a CI log or behind `| tee` that loses
the model name or the reason that matters. `--format auto` (the default) prints a table on a terminal and
`plain` elsewhere: one line per row, every field whole. Text written to a stream that is not a terminal holds
no ANSI escape codes (MLflow colours its warnings whatever the stream).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any, Literal, TextIO

OutputFormat = Literal["auto", "table", "plain", "json"]
FORMATS = ("auto", "table", "plain", "json")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def resolve_format(requested: str, stream: TextIO | None = None) -> str:
    """`auto` → `table` on a terminal, else `plain`; anything else as given (validated)."""
    if requested not in FORMATS:
        raise ValueError(f"unknown format '{requested}' ({', '.join(FORMATS)})")
    if requested != "auto":
        return requested
    stream = stream or sys.stdout
    return "table" if stream.isatty() else "plain"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value) or "-"
    return str(value)


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Print `rows` (dicts keyed by `columns`) to `stream` (default stdout) as a table, plain lines or JSON."""
    stream = stream or sys.stdout
    fmt = resolve_format(fmt, stream)
    if fmt == "json":
        stream.write(json.dumps({"title": title, "rows": [{c: r.get(c) for c in columns} for r in rows]},
                                    ensure_ascii=False, indent=2) + "\n")  # fmt: skip
        return
    if fmt == "plain":
        lines = [f"# {title}", "\t".join(columns)]
        lines += ["\t".join(_text(r.get(c)).replace("\n", "; ") for c in columns) for r in rows]
        stream.write("\n".join(lines) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    for column in columns:
        table.add_column(column)
    for r in rows:
        table.add_row(*(_text(r.get(c)).replace("; ", "\n") if isinstance(r.get(c), (list, tuple)) else _text(r.get(c))
                        for c in columns))  # fmt: skip
    Console(file=stream).print(table)


class AnsiStrippingStream:
    """Wraps a text stream and removes ANSI escape codes from everything written to it."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(ANSI_ESCAPE.sub("", text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def strip_ansi_off_terminal() -> None:
    """Make sys.stdout and sys.stderr drop ANSI codes when they are not terminals (pipes, log files)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, AnsiStrippingStream) and not stream.isatty():
            setattr(sys, name, AnsiStrippingStream(stream))
