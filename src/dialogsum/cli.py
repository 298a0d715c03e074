"""The `dialogsum` command line: one sub-command per task, each a thin layer over its module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Korean dialogue summarization, tracked in MLflow.")
console = Console(stderr=True)


def _split(values: str | None) -> list[str]:
    return [v.strip() for v in (values or "").split(",") if v.strip()]


@app.command()
def models() -> None:
    """List the configured models (canonical names and aliases)."""
    from rich.table import Table

    from dialogsum.config import model_registry

    registry = model_registry()
    table = Table(title=f"models in {registry.folder}")
    for column in ("name", "aliases", "family", "task", "hub id / source", "quantization"):
        table.add_column(column)
    for name in registry.names:
        cfg = registry.configs[name]
        table.add_row(name, ", ".join(cfg.aliases), cfg.family, cfg.task, cfg.hub_id or "config (random init)", cfg.quantization)
    Console().print(table)


@app.command()
def preflight(
    models: Annotated[str, typer.Option(help="Comma-separated model names")],
    data: Annotated[Optional[list[Path]], typer.Option(help="Data files to validate (repeatable)")] = None,
) -> None:
    """Check models before any weight is loaded; exits 1 when any model is blocked."""
    from dialogsum.preflight import render_table, run_preflight

    verdicts = run_preflight(_split(models), data_paths=data or [])
    Console().print(render_table(verdicts))
    if not all(v.ok for v in verdicts):
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
