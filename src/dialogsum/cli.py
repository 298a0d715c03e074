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


def _fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(1)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Model name or alias (see `dialogsum models`)")],
    train_data: Annotated[Optional[Path], typer.Option(help="Labelled training CSV (default: bundled sample)")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="Labelled evaluation CSV (default: bundled sample)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Per-device training batch size")] = None,
    max_train_samples: Annotated[Optional[int], typer.Option(help="Use only the first N training rows")] = None,
    max_eval_samples: Annotated[Optional[int], typer.Option(help="Use only the first N evaluation rows")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override key=value (repeatable), e.g. training.seed=3")] = None,
    parent_run_id: Annotated[Optional[str], typer.Option(help="Log as a child of this run")] = None,
) -> None:
    """Fine-tune one configured model; everything is logged to one MLflow run."""
    from dialogsum.config import ConfigError, parse_set_options
    from dialogsum.data import DataError
    from dialogsum.preflight import PreflightError
    from dialogsum.tracking import TrackingError
    from dialogsum.train import train_model

    overrides = {
        "training.epochs": epochs,
        "training.learning_rate": lr,
        "training.batch_size": batch_size,
        "training.max_train_samples": max_train_samples,
        "training.max_eval_samples": max_eval_samples,
    }
    try:
        overrides = {k: v for k, v in overrides.items() if v is not None} | parse_set_options(set_ or [])
        train_model(model, train_path=train_data, eval_path=eval_data, overrides=overrides, parent_run_id=parent_run_id)
    except (ConfigError, DataError, PreflightError, TrackingError) as e:
        _fail(e)


def main() -> None:
    app()


@app.callback()
def _quiet_libraries() -> None:
    """Keep third-party progress bars and info logs out of dialogsum's own output."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


if __name__ == "__main__":
    sys.exit(main())
