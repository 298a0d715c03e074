"""The `dialogsum` command line: one sub-command per task, each a thin layer over its module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Korean dialogue summarization, tracked in MLflow.")
console = Console(stderr=True)


def _say(text: str) -> None:
    """A line for the user on stderr, whole (never wrapped at the terminal's width) and literal (no markup)."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)


def _split(values: str | None) -> list[str]:
    return [v.strip() for v in (values or "").split(",") if v.strip()]


FormatOption = Annotated[str, typer.Option("--format", help="auto (a table on a terminal, plain lines elsewhere), table, plain or json")]


@app.command()
def models(format_: FormatOption = "auto") -> None:
    """List the configured models (canonical names and aliases) and where the configs were read from."""
    from dialogsum.config import config_source, model_registry
    from dialogsum.output import emit

    registry = model_registry()
    rows = [
        {"name": name, "aliases": ", ".join(cfg.aliases) or "-", "family": cfg.family, "task": cfg.task,
         "hub id / source": cfg.hub_id or "config (random init)", "quantization": cfg.quantization}
        for name, cfg in ((name, registry.configs[name]) for name in registry.names)
    ]  # fmt: skip
    emit(rows, list(rows[0]), f"models from {config_source().label}", format_)


@app.command()
def preflight(
    models: Annotated[Optional[str], typer.Option(help="Comma-separated model names (or --config)")] = None,
    config: Annotated[Optional[str], typer.Option(help="A pipeline config (name or path): its models with their overrides and its preflight settings; without --data, its train and validation rows")] = None,
    data: Annotated[Optional[list[Path]], typer.Option(help="Labelled data files to validate (repeatable); their rows measure truncation, the first file's train a config-source model's tokenizer")] = None,
    format_: FormatOption = "auto",
) -> None:
    """Check models before any weight is loaded, and measure on the rows how many prompts and summaries each model's
    length limits cut (tokenizer only); exits 1 when any model is blocked."""
    from dialogsum.config import ConfigError, PreflightSettings, load_pipeline_config
    from dialogsum.data import DataError
    from dialogsum.output import emit
    from dialogsum.preflight import TRUNCATION_COLUMNS, run_preflight, truncation_rows, verdict_rows

    if (models is None) == (config is None):
        _fail(ValueError("give exactly one of --models or --config"))
    try:
        pipeline_cfg = load_pipeline_config(config) if config else None
        names = [m.name for m in pipeline_cfg.models] if pipeline_cfg else _split(models)
        overrides = {m.name: m.overrides for m in pipeline_cfg.models} if pipeline_cfg else None
        settings = pipeline_cfg.preflight if pipeline_cfg else PreflightSettings()
        measure_on = _rows_to_measure(data or [], pipeline_cfg)
    except (ConfigError, DataError) as e:
        _fail(e)
    verdicts = run_preflight(names, data_paths=data or [], overrides=overrides, measure_on=measure_on,
                             warn_share=settings.truncation_warn_share)  # fmt: skip
    rows = verdict_rows(verdicts)
    columns = list(rows[0]) if rows else ["model"]
    truncation = truncation_rows(verdicts, settings.truncation_warn_share)
    if format_ == "json":  # one document: each model's truncation rows inside its verdict row
        for row in rows:
            row["truncation"] = [{c: t.get(c) for c in TRUNCATION_COLUMNS[1:]} for t in truncation if t["model"] == row["model"]]
        columns.append("truncation")
    emit(rows, columns, "dialogsum preflight", format_)
    if truncation and format_ != "json":
        measured = sum(len(part) for part in measure_on)
        emit(truncation, TRUNCATION_COLUMNS, f"truncation on {measured} rows (tokenizer only)", format_)
    if not all(v.ok for v in verdicts):
        raise typer.Exit(1)


def _rows_to_measure(data: list[Path], pipeline_cfg) -> list:
    """The labelled rows preflight measures truncation on: the `--data` files (none when one is invalid: the
    verdicts say why), else the pipeline config's train and validation rows, else none."""
    from dialogsum.data import load_data_roles, read_dialogues
    from dialogsum.preflight import check_data

    if data:
        return [] if check_data(data) else [read_dialogues(path, require_summary=True) for path in data]
    if pipeline_cfg is None:
        return []
    d = pipeline_cfg.data
    roles = load_data_roles(d.train, d.validation, d.test, validation_fraction=d.validation_fraction)
    return [roles.train, roles.validation]


def _fail(error: Exception) -> None:
    """Print the error unwrapped (paths stay whole) and literally (brackets in it are not markup); exit 1."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def train(
    model: Annotated[Optional[str], typer.Option(help="Model name or alias (see `dialogsum models`); with --resume, taken from the run")] = None,
    train_data: Annotated[Optional[Path], typer.Option(help="Labelled training CSV (default: bundled sample)")] = None,
    validation_data: Annotated[Optional[Path], typer.Option(help="Labelled CSV that chooses the best epoch (default: --validation-fraction of the training rows)")] = None,
    test_data: Annotated[Optional[Path], typer.Option(help="Labelled CSV the chosen checkpoint is reported on (default: none; with no data given, the bundled dev sample)")] = None,
    validation_fraction: Annotated[Optional[float], typer.Option(help="Share of the training rows held out for validation by fname hash (config: training.validation_fraction)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Per-device training batch size")] = None,
    max_train_samples: Annotated[Optional[int], typer.Option(help="Use only the first N training rows")] = None,
    max_validation_samples: Annotated[Optional[int], typer.Option(help="Use only the first N validation rows")] = None,
    max_test_samples: Annotated[Optional[int], typer.Option(help="Use only the first N test rows")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override key=value (repeatable), e.g. training.seed=3")] = None,
    parent_run_id: Annotated[Optional[str], typer.Option(help="Log as a child of this run")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Run id of a killed or failed training: reopen it and continue from its last checkpoint (same data options)")] = None,
) -> None:
    """Fine-tune one configured model; everything is logged to one MLflow run, with a checkpoint per epoch."""
    from dialogsum.config import ConfigError, parse_set_options
    from dialogsum.data import DataError
    from dialogsum.preflight import PreflightError
    from dialogsum.tracking import TrackingError
    from dialogsum.training.checkpoints import CheckpointError
    from dialogsum.training.recipe import train_model

    overrides = {
        "training.epochs": epochs,
        "training.learning_rate": lr,
        "training.batch_size": batch_size,
        "training.validation_fraction": validation_fraction,
        "training.max_train_samples": max_train_samples,
        "training.max_validation_samples": max_validation_samples,
        "training.max_test_samples": max_test_samples,
    }
    try:
        overrides = {k: v for k, v in overrides.items() if v is not None} | parse_set_options(set_ or [])
        train_model(model, train_path=train_data, validation_path=validation_data, test_path=test_data,
                    overrides=overrides, parent_run_id=parent_run_id, resume_run_id=resume)  # fmt: skip
    except (ConfigError, DataError, PreflightError, CheckpointError) as e:
        _fail(e)
    except OSError as e:  # a full disk or a vanished folder: the run has ended FAILED with the same message
        _fail(e)
    except TrackingError as e:
        _fail(TrackingError(f"{e}{_resume_hint(e.run_id)}"))


def _resume_hint(run_id: str | None) -> str:
    """How to continue a training whose run the store could not close: its local checkpoint outlives the store."""
    from dialogsum.training.checkpoints import checkpoint_root

    if run_id and (checkpoint_root(run_id) / "last").is_dir():
        return (f"\nits last checkpoint is in {checkpoint_root(run_id)}; once the store is back: "
                f"dialogsum train --resume {run_id} (with the same data options)")  # fmt: skip
    return ""


def _skip_ensemble(error: Exception) -> None:
    """Fewer than two usable sources. A run opened for this command ($MLFLOW_RUN_ID: the pipeline's child or
    `mlflow run`'s) ends SKIPPED with the reason; without one the command fails."""
    import os

    from dialogsum.tracking import close_run

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        _fail(error)
    close_run(run_id, "skipped", "ensemble", message=str(error))
    _say(f"ensemble skipped: {error}")


def _ensemble_rows(run_id: str) -> list[dict]:
    """Each source's val/test final and win share next to the ensemble's and the oracle's (an upper bound)."""
    import mlflow

    metrics = mlflow.get_run(run_id).data.metrics

    def cells(stem: str) -> dict[str, str]:
        return {p: "-" if f"{stem}{p}_final" not in metrics else f"{metrics[f'{stem}{p}_final']:.2f}" for p in ("val", "test")}

    rows = []
    for name, share in sorted(metrics.items()):
        if name.startswith("win_share_"):
            label = name.removeprefix("win_share_")
            rows.append({"candidate": label, **cells(f"source_{label}_"), "win share": f"{share:.2f}"})
    if "val_final" in metrics:
        rows.append({"candidate": "ensemble", **cells(""), "win share": ""})
        rows.append({"candidate": "oracle (upper bound, uses references)", **cells("oracle_"), "win share": ""})
    return rows


@app.command()
def ensemble(
    runs: Annotated[str, typer.Option(help="Comma-separated source run ids")] = "",
    parent: Annotated[str, typer.Option(help="Use the succeeded train/solar children of this run (and log under it)")] = "",
    top_k: Annotated[int, typer.Option(help="Use the K best succeeded train/solar runs of the experiment by --metric, among runs scored on the same validation rows")] = 0,
    metric: Annotated[str, typer.Option(help="Validation metric that ranks and weighs sources")] = "val_final",
    strategy: Annotated[str, typer.Option(help="mbr, weighted_mbr, stacking (choose one source's summary per row) or logit_avg (the sources' models decode as one)")] = "mbr",
    data: Annotated[str, typer.Option(help="CSV to summarise with the sources' models: labelled, it is scored as the test rows; unlabelled, summaries only")] = "",
    folds: Annotated[int, typer.Option(help="Cross-validation folds for stacking's out-of-fold validation score")] = 5,
    temperature: Annotated[float, typer.Option(help="weighted_mbr: softmax temperature over validation scores, in final points")] = 2.0,
    format_: FormatOption = "auto",
) -> None:
    """Ensemble tracked runs: choose among their summaries (MBR consensus, weighted MBR, a stacking selector), or
    decode with their models' averaged next-token distributions (logit_avg)."""
    from dialogsum.data import DataError
    from dialogsum.ensemble import NotEnoughSources, run_ensemble, source_runs_of_parent, top_k_source_runs
    from dialogsum.output import emit
    from dialogsum.tracking import TrackingError, configure_tracking, ui_hint

    if sum(bool(x) for x in (runs, parent, top_k)) != 1:
        _fail(ValueError("give exactly one of --runs, --parent or --top-k"))
    try:
        configure_tracking()
        if runs:
            run_ids = _split(runs)
        elif parent:
            run_ids = source_runs_of_parent(parent, metric)
        else:
            run_ids, left_out = top_k_source_runs(top_k, metric)
            for item in left_out:
                _say(item.line())
        if strategy == "logit_avg":
            from dialogsum.logit_ensemble import run_logit_average

            run_id = run_logit_average(run_ids, data_path=data or None, parent_run_id=parent or None)
        else:
            run_id = run_ensemble(run_ids, strategy, data_path=data or None, parent_run_id=parent or None, metric=metric,
                                  folds=folds, temperature=temperature)  # fmt: skip
    except NotEnoughSources as e:
        _skip_ensemble(e)
        return
    except (DataError, LookupError, TrackingError, ValueError) as e:
        _fail(e)
    if strategy == "logit_avg":
        import mlflow

        scores = {k: v for k, v in mlflow.get_run(run_id).data.metrics.items() if k.endswith("_final")}
        _say(f"ensemble logit_avg: {', '.join(f'{k} {v:.2f}' for k, v in sorted(scores.items())) or 'predictions only'}\nrun {run_id}\nopen: {ui_hint(run_id)}")
        return
    emit(_ensemble_rows(run_id), ["candidate", "val", "test", "win share"], f"ensemble {strategy} (final on the same rows)", format_)
    _say(f"run {run_id}\nopen: {ui_hint(run_id)}")


@app.command("evaluate-solar")
def evaluate_solar(
    data: Annotated[Path, typer.Option(help="Labelled CSV of the validation rows (scored val_*)")],
    test_data: Annotated[Optional[Path], typer.Option(help="Labelled CSV of the test rows (scored test_*)")] = None,
    model: Annotated[str, typer.Option(help="Upstage model, e.g. solar-mini (empty: configs/solar.yaml)")] = "",
    prompt: Annotated[str, typer.Option(help="Prompt name in configs/prompts/ or a YAML path (empty: the config's)")] = "",
    n_samples: Annotated[int, typer.Option(min=0, help="Evaluate only the first N rows (0: all)")] = 0,
    concurrency: Annotated[int, typer.Option(min=0, help="Requests in flight at once (0: the config's)")] = 0,
    rpm: Annotated[float, typer.Option(min=0, help="Client-side requests-per-minute limit (0: the config's)")] = 0,
    base_url: Annotated[Optional[str], typer.Option(help="API base URL (default: $SOLAR_BASE_URL, then the config)")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling top_p")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Completion token budget per summary")] = None,
    train_data: Annotated[Optional[Path], typer.Option(help="Labelled CSV the few-shot examples come from (default: bundled sample)")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Answer cache folder (default: $DIALOGSUM_CACHE_DIR/solar)")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Solar settings file (default: configs/solar.yaml)")] = None,
    parent_run_id: Annotated[Optional[str], typer.Option(help="Log as a child of this run")] = None,
) -> None:
    """Evaluate Upstage's Solar chat API (key from $UPSTAGE_API_KEY); answers are cached, never paid twice."""
    import logging

    from rich.logging import RichHandler

    from dialogsum.solar import evaluation as solar
    from dialogsum.config import ConfigError
    from dialogsum.data import DataError
    from dialogsum.solar.cache import CacheError
    from dialogsum.solar.client import FatalApiError
    from dialogsum.tracking import TrackingError, ui_hint

    log = logging.getLogger("dialogsum")
    log.setLevel(logging.INFO)
    if not log.handlers:
        log.addHandler(RichHandler(console=console, show_path=False))
    try:
        run_id = solar.evaluate_solar(
            data,
            test_path=test_data,
            model=model or None,
            prompt=prompt or None,
            n_samples=n_samples or None,
            concurrency=concurrency or None,
            rpm=rpm or None,
            base_url=base_url,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            train_path=train_data,
            cache_dir=cache_dir,
            config_path=config,
            parent_run_id=parent_run_id,
        )
    except (solar.MissingApiKey, solar.SolarEvaluationError, FatalApiError, CacheError, ConfigError, DataError, TrackingError) as e:
        _fail(e)
    import mlflow

    run = mlflow.get_run(run_id)
    metrics = run.data.metrics
    shown = ["val_final", "val_final_answered", "val_rouge1", "val_rouge2", "val_rougeL", "test_final", "test_final_answered",
             "rows", "answered_rows", "failed_rows", "cache_hits", "api_requests", "retries", "rate_limited", "tokens_in",
             "tokens_out", "latency_p50_s", "latency_p95_s", "estimated_cost_usd"]  # fmt: skip
    for name in shown:
        if name in metrics:
            _say(f"{name:>20}  {metrics[name]:.4g}")
    _say(f"ROUGE: {run.data.tags.get(solar.SCOPE_TAG, '')}")
    _say(f"run {run_id}\nopen: {ui_hint(run_id)}")


@app.command()
def pipeline(
    config: Annotated[Optional[str], typer.Option(help="Pipeline YAML path, or the name of a packaged one (quickstart, seed-full)")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Parent run id: rerun only children that failed or never ran (a training stopped mid-way continues from its checkpoint)")] = None,
    executor: Annotated[Optional[str], typer.Option(help="local (here: one stage at a time without GPUs, at once where the GPUs hold them with GPUs) or ray (stages as Ray tasks, at once where the cluster allows); overrides the config's")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="The Ray cluster (ray://host:10001, host:6379, auto); unset: a Ray started here")] = None,
    max_concurrency: Annotated[Optional[int], typer.Option(min=1, help="Trainings running at once, with either executor; overrides the config's max_concurrency")] = None,
) -> None:
    """Run the full pipeline: preflight, one child run per model and step, matrix and report on the parent.
    SIGINT/SIGTERM stops the running stages (SIGTERM, SIGKILL after timeouts.grace), ends the runs KILLED; exit 130.
    Every process it starts carries $DIALOGSUM_PIPELINE; one still alive when it exits is stopped and named."""
    from dialogsum.config import ConfigError
    from dialogsum.pipeline.executors import ORPHAN_GRACE_S, mark_pipeline_processes, stop_marked_processes
    from dialogsum.pipeline.orchestrator import run_pipeline
    from dialogsum.tracking import Terminated, TrackingError, ui_hint

    if (config is None) == (resume is None):
        _fail(ValueError("give exactly one of --config or --resume"))
    marker = mark_pipeline_processes()  # before anything starts: every process started from here on carries it
    try:
        parent_id = run_pipeline(config, resume_run_id=resume, executor=executor, ray_address=ray_address,
                                 max_concurrency=max_concurrency)  # fmt: skip
    except (ConfigError, TrackingError) as e:
        _fail(e)
    except (KeyboardInterrupt, Terminated):
        import mlflow

        last = mlflow.last_active_run()
        hint = f"; continue with: dialogsum pipeline --resume {last.info.run_id}" if last else ""
        console.print(f"[red]interrupted[/red]: the running stage was stopped and the runs ended KILLED{hint}", soft_wrap=True)
        raise typer.Exit(130)
    finally:
        left = stop_marked_processes(marker, ORPHAN_GRACE_S)
        if left:
            from rich.markup import escape

            console.print(f"[yellow]stopped {len(left)} process(es) the pipeline had left behind[/yellow]: {escape('; '.join(left))}", soft_wrap=True)
    _say(f"pipeline parent run {parent_id}\nopen: {ui_hint(parent_id)}")


@app.command()
def report(
    parent_run_id: Annotated[str, typer.Argument(help="The parent run id of a pipeline or of a study")],
    out: Annotated[Optional[Path], typer.Option(help="Also write report.md/html and figures to this folder")] = None,
) -> None:
    """Generate the report of a pipeline (or of a `tune` study) from the MLflow store and log it to the parent run."""
    import mlflow

    from dialogsum.pipeline.report import write_report
    from dialogsum.sweeps.report import write_study_report
    from dialogsum.tracking import KIND_TAG, configure_tracking

    configure_tracking()
    study = mlflow.get_run(parent_run_id).data.tags.get(KIND_TAG) == "tune"
    Console().print((write_study_report if study else write_report)(parent_run_id, out))


@app.command()
def register(
    experiment: Annotated[str, typer.Option(help="Choose among this experiment's runs (default: the active experiment)")] = "",
    parent: Annotated[str, typer.Option(help="Choose among the children of this pipeline run (and log under it)")] = "",
    run: Annotated[str, typer.Option(help="Register this run's model instead of choosing")] = "",
    metric: Annotated[str, typer.Option(help="Validation metric that chooses the candidate (higher is better)")] = "val_final",
    name: Annotated[str, typer.Option(help="Registered model name")] = "dialogsum-ko",
    force: Annotated[bool, typer.Option("--force", help="Promote to @champion without beating it on the test rows (also: roll back with --run)")] = False,
) -> None:
    """Register the best candidate by validation; it becomes NAME@champion only when it beats the champion on the
    same test rows (paired bootstrap), else NAME@challenger, with the reason. The former champion keeps @previous.

    Candidates are succeeded train runs with a logged model, scored on the same validation rows. Ties: higher
    metric, then fewer parameters, then earlier end time, then smaller run id.
    """
    from dialogsum.registry import PREVIOUS_ALIAS, RegistryError, run_register
    from dialogsum.tracking import TrackingError, configure_tracking

    try:
        configure_tracking()
        scope = {"experiment": experiment or None, "parent_run_id": parent or None, "run_id": run or None}
        done = run_register(**scope, metric=metric, name=name, force=force)
    except (RegistryError, TrackingError) as e:
        _fail(e)
    for item in done.not_comparable:
        _say(item.line())
    score = "no score" if done.score is None else f"{metric}={done.score:.4g}"
    chosen = "given" if run else f"best of {done.candidates}"
    _say(f"models:/{name}/{done.version} ← run {done.run_id} ({score}, {chosen}) is @{done.alias}: {done.reason}")
    if done.promoted and done.previous_version:
        _say(f"models:/{name}/{done.previous_version} is @{PREVIOUS_ALIAS}")


@app.command()
def predict(
    data: Annotated[Path, typer.Option(help="CSV with fname,dialogue (a summary column is ignored)")],
    model_uri: Annotated[str, typer.Option(help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/MODEL_NAME")] = (
        "models:/dialogsum-ko@champion"
    ),
    out: Annotated[Path, typer.Option(help="Submission CSV to write (fname,summary)")] = Path("submission.csv"),
    batch_size: Annotated[int, typer.Option(help="Dialogues per generation batch")] = 16,
    param: Annotated[
        Optional[list[str]], typer.Option("--param", help="Generation override key=value (repeatable), e.g. num_beams=1")
    ] = None,
    ensemble_run: Annotated[str, typer.Option(help="Summarise with this logged ensemble (its strategy over its sources' models) instead of --model-uri")] = "",
    source_reason: Annotated[str, typer.Option(help="Why this model or ensemble writes the submission (recorded on the run)")] = "",
) -> None:
    """Write a submission (fname,summary in input order), validated and logged to a `predict` run."""
    import mlflow

    from dialogsum.config import ConfigError, parse_set_options
    from dialogsum.data import DataError
    from dialogsum.predict import ERRORS_ARTIFACT, SubmissionError, predict_file
    from dialogsum.registry import RegistryError
    from dialogsum.tracking import TrackingError, ui_hint

    try:
        run_id = predict_file(None if ensemble_run else model_uri, data, out, batch_size, parse_set_options(param or []),
                              ensemble_run=ensemble_run or None, source_reason=source_reason or None)  # fmt: skip
    except (ConfigError, DataError, RegistryError, SubmissionError, TrackingError) as e:
        _fail(e)
    failed = int(mlflow.get_run(run_id).data.metrics.get("error_rows", 0))
    _say(f"wrote {out}\nrun {run_id}\nopen: {ui_hint(run_id)}")
    if failed:
        _fail(RuntimeError(f"{failed} row(s) have no summary; see {ERRORS_ARTIFACT} in run {run_id}"))


@app.command()
def tune(
    model: Annotated[str, typer.Option(help="Model name or alias (see `dialogsum models`)")],
    space: Annotated[str, typer.Option(help="Search space: a YAML path or a name in configs/search/ (e.g. kobart-tiny)")],
    trials: Annotated[int, typer.Option(help="Finished trials (complete or pruned) the study should hold, over all workers")] = 20,
    study: Annotated[str, typer.Option(help="Study name: the same name continues it, or joins it from another worker")] = "",
    storage: Annotated[str, typer.Option(help="Optuna storage: an RDB URL (postgresql://… for several machines) or journal:PATH "
                                              "(default with --study: dialogsum-studies/<study>.journal; without: in memory)")] = "",  # fmt: skip
    sampler: Annotated[str, typer.Option(help="tpe or random")] = "tpe",
    pruner: Annotated[str, typer.Option(help="median, hyperband or none")] = "median",
    metric: Annotated[str, typer.Option(help="Validation metric each epoch reports (val_final maximised; a *loss* minimised)")] = "val_final",
    seed: Annotated[Optional[int], typer.Option(help="Sampler seed")] = None,
    train_data: Annotated[Optional[Path], typer.Option(help="Labelled training CSV (default: bundled sample)")] = None,
    validation_data: Annotated[Optional[Path], typer.Option(help="Labelled CSV the trials are scored on (default: held out of the training rows)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override every trial gets, key=value (repeatable)")] = None,
    from_run: Annotated[str, typer.Option(help="For a space of generation.* keys only: re-generate this training run's validation rows with its model, no training")] = "",
    executor: Annotated[str, typer.Option(help="local (this process is the one worker) or ray (--workers workers as Ray tasks)")] = "local",
    workers: Annotated[int, typer.Option(help="With --executor ray: study workers, one GPU each when the cluster has GPUs", min=1)] = 1,
    ray_address: Annotated[Optional[str], typer.Option(help="The Ray cluster (ray://host:10001, host:6379, auto); unset: a Ray started here")] = None,
) -> None:
    """An Optuna study: one parent run, one child training run per trial, pruned per epoch on validation (or, with
    --from-run, generation settings tried on one trained model). With --executor ray, --workers processes share it."""
    import mlflow

    from dialogsum.config import ConfigError, parse_set_options
    from dialogsum.sweeps.tune import TuneError, TuneSettings, run_study
    from dialogsum.tracking import Terminated, TrackingError, ui_hint

    if executor not in ("local", "ray"):
        _fail(ValueError(f"--executor {executor}: choose local or ray"))
    if executor == "local" and (workers > 1 or ray_address):
        _fail(ValueError("--workers and --ray-address need --executor ray (or start more `dialogsum tune` processes with "
                         "the same --study and --storage)"))  # fmt: skip
    try:
        settings = TuneSettings(model=model, space=space, trials=trials, study=study or None, storage=storage or None, sampler=sampler,
                                pruner=pruner, metric=metric, seed=seed, train_path=str(train_data) if train_data else None,
                                validation_path=str(validation_data) if validation_data else None,
                                overrides=parse_set_options(set_ or []), from_run=from_run or None)  # fmt: skip
        if executor == "ray":
            from dialogsum.sweeps.workers import run_ray_workers

            parent = run_ray_workers(settings, workers, ray_address)
        else:
            parent = run_study(settings)
    except (ConfigError, TuneError, TrackingError) as e:
        _fail(e)
    except (KeyboardInterrupt, Terminated):
        console.print("[red]interrupted[/red]: the workers were stopped and their runs ended KILLED", soft_wrap=True)
        raise typer.Exit(130)
    metrics = mlflow.get_run(parent).data.metrics
    counts = ", ".join(f"{int(metrics.get(f'trials_{k}', 0))} {k}" for k in ("complete", "pruned", "failed"))
    best = metrics.get(f"best_{metric}")
    _say(f"study: {counts}" + (f"; best {metric} {best:.2f} (trial {int(metrics['best_trial'])})" if best is not None else "")
         + f"\nrun {parent}\nopen: {ui_hint(parent)}")


@app.command()
def kfold(
    model: Annotated[str, typer.Option(help="Model name or alias (see `dialogsum models`)")],
    folds: Annotated[int, typer.Option(help="Number of folds")] = 5,
    group_by: Annotated[str, typer.Option(help="fname (each row its own group) or topic (no topic in two folds)")] = "fname",
    train_data: Annotated[Optional[Path], typer.Option(help="Labelled CSV to split into folds (default: bundled sample)")] = None,
    test_data: Annotated[Optional[Path], typer.Option(help="Labelled CSV every fold's model is reported on (never chooses)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override every fold gets, key=value (repeatable)")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Parent run id of a K-fold run: train only the folds without a succeeded child")] = None,
) -> None:
    """K-fold cross-validation: one parent run, one child training run per fold, out-of-fold predictions for every row."""
    import mlflow

    from dialogsum.config import ConfigError, parse_set_options
    from dialogsum.data import DataError
    from dialogsum.sweeps.kfold import KFoldError, run_kfold
    from dialogsum.tracking import TrackingError, ui_hint

    if group_by not in ("fname", "topic"):
        _fail(ValueError(f"--group-by {group_by}: choose fname or topic"))
    try:
        parent = run_kfold(model, folds, group_by, train_path=train_data, test_path=test_data,  # type: ignore[arg-type]
                           overrides=parse_set_options(set_ or []) or None, resume_run_id=resume)  # fmt: skip
    except (ConfigError, DataError, KFoldError, TrackingError) as e:
        _fail(e)
    m = mlflow.get_run(parent).data.metrics
    _say(f"{folds}-fold val_final {m['cv_val_final_mean']:.2f} ± {m['cv_val_final_std']:.2f}; out-of-fold final {m['oof_final']:.2f} "
         f"[{m['oof_final_ci95_low']:.2f}, {m['oof_final_ci95_high']:.2f}] over {int(m['oof_rows'])} rows\nrun {parent}\nopen: {ui_hint(parent)}")


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Folder to write the saved model to (must not exist yet)")],
    model_uri: Annotated[str, typer.Option(help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/MODEL_NAME")] = (
        "models:/dialogsum-ko@champion"
    ),
    merge: Annotated[bool, typer.Option(help="Merge a LoRA adapter into 16-bit weights: one set of weights, no peft or "
                                             "bitsandbytes needed, but not the model that was scored")] = False,  # fmt: skip
    dtype: Annotated[str, typer.Option(help="dtype of merged weights: bfloat16 or float16")] = "bfloat16",
) -> None:
    """Write a logged model's saved-model folder: as it was scored, or with --merge its adapter merged into its base."""
    from dialogsum.registry import RegistryError, resolve_model_uri
    from dialogsum.serving import saved_model
    from dialogsum.serving.pyfunc import logged_model_dir
    from dialogsum.tracking import configure_tracking

    if out.exists():
        _fail(FileExistsError(f"{out} exists; give a new folder"))
    if dtype not in ("bfloat16", "float16"):
        _fail(ValueError(f"--dtype {dtype}: choose bfloat16 or float16"))
    configure_tracking()
    try:
        pinned, _ = resolve_model_uri(model_uri)
        folder = logged_model_dir(pinned)
        if merge:
            saved_model.write_merged(folder, out, dtype)
        else:
            saved_model.copy_to(folder, out)
    except (RegistryError, LookupError, saved_model.SavedModelError, OSError) as e:
        _fail(e)
    described = saved_model.describe(out)
    _say(f"wrote {out} from {pinned}\n{described['summary']}")
    if not described["scored"]:
        console.print("[yellow]warning:[/yellow] this is not the model whose scores were logged; evaluate it before "
                      "serving it in place of the scored one", soft_wrap=True)  # fmt: skip


@app.command()
def optimize(
    run: Annotated[str, typer.Option(help="Optimise the model logged by this run")] = "",
    model_uri: Annotated[str, typer.Option(help="...or this model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/MODEL_NAME")] = "",
    quantization: Annotated[str, typer.Option(help="Comma-separated variants besides the scored model (as served): int8 (CPU); fp16, bf16 (CUDA); bnb-int8, bnb-nf4 (both); auto (int8 on CPU, fp16,bf16 on CUDA); none")] = "auto",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes to sweep, growing")] = "1,2,4,8,16,32,64",
    data: Annotated[Optional[Path], typer.Option(help="Labelled CSV of validation rows: swept, and their quality decides the recommendation (default: bundled dev sample)")] = None,
    test_data: Annotated[Optional[Path], typer.Option(help="Labelled CSV of test rows each variant's quality is reported on")] = None,
    n_samples: Annotated[int, typer.Option(help="Use the first N rows (0: 64)")] = 0,
    param: Annotated[Optional[list[str]], typer.Option("--param", help="Generation override key=value (repeatable), e.g. num_beams=1")] = None,
    max_rouge_drop: Annotated[float, typer.Option(help="Largest ROUGE final drop (points) against the scored model a recommended variant may have")] = 0.5,
    max_latency_s: Annotated[float, typer.Option(help="p95 batch latency budget in seconds (0: none)")] = 0.0,
    max_memory_gb: Annotated[float, typer.Option(help="Peak memory budget in GB; a batch size over it stops the sweep (0: none)")] = 0.0,
    min_gain: Annotated[float, typer.Option(help="Stop growing the batch when throughput improves by less than this fraction")] = 0.05,
    log_variant: Annotated[str, typer.Option(help="Log this variant as the model instead of the recommended one")] = "",
    parent_run_id: Annotated[str, typer.Option(help="Log as a child of this run")] = "",
    format_: FormatOption = "auto",
) -> None:
    """Measure the scored model (loaded as it is served) against INT8 (CPU), fp16/bf16 (CUDA) or bitsandbytes variants over a batch-size sweep; log the recommended model."""
    from dialogsum.config import ConfigError, parse_set_options
    from dialogsum.data import DataError
    from dialogsum.optimize import SWEEP_TABLE, Budget, OptimizeError, SweepSettings, optimize_run
    from dialogsum.output import emit
    from dialogsum.quantize import VariantError
    from dialogsum.registry import RegistryError
    from dialogsum.tracking import TrackingError, load_predictions, ui_hint

    if bool(run) == bool(model_uri):
        _fail(ValueError("give exactly one of --run or --model-uri"))
    try:
        sizes = [int(b) for b in _split(batch_sizes)]
        settings = SweepSettings(min_gain=min_gain, max_memory_bytes=int(max_memory_gb * 1e9) or None)
        budget = Budget(max_rouge_drop=max_rouge_drop, max_latency_p95_s=max_latency_s or None)
        run_id = optimize_run(run or None, model_uri=model_uri or None, quantization=quantization, batch_sizes=sizes,
                              data_path=data, test_path=test_data, n_samples=n_samples or None, parent_run_id=parent_run_id or None,
                              generation=parse_set_options(param or []), settings=settings, budget=budget,
                              log_variant=log_variant or None)  # fmt: skip
    except (ConfigError, DataError, OptimizeError, RegistryError, TrackingError, VariantError, ValueError) as e:
        _fail(e)
    import mlflow

    tags = mlflow.get_run(run_id).data.tags
    rows = [{"variant": r.variant, "batch": r.batch_size, "status": r.status, "p50 s": f"{r.latency_p50_s:.3f}",
             "p95 s": f"{r.latency_p95_s:.3f}", "samples/s": f"{r.throughput_sps:.2f}",
             "peak memory": f"{r.peak_memory_bytes / 1e9:.2f} GB"} for r in load_predictions(run_id, SWEEP_TABLE).itertuples()]  # fmt: skip
    emit(rows, list(rows[0]), "optimize: batch-size sweep (same rows for every variant)", format_)
    _say(f"recommended: {tags['dialogsum.recommended_variant']} at batch size {tags['dialogsum.recommended_batch_size']} "
         f"({tags['dialogsum.recommendation']})\nrun {run_id}\nopen: {ui_hint(run_id)}")


def main() -> None:
    app()


@app.callback()
def _setup(
    system_metrics: Annotated[bool, typer.Option("--system-metrics/--no-system-metrics",
                                                 help="MLflow system metrics (CPU, memory, GPU) on train, optimize, tune and predict runs")] = True,
) -> None:
    """Keep third-party progress bars and info logs out of dialogsum's own output."""
    import os

    from dialogsum.tracking import SYSTEM_METRICS_ENV

    if not system_metrics:
        os.environ[SYSTEM_METRICS_ENV] = "false"  # inherited by the stage processes of a pipeline

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    from dialogsum.output import strip_ansi_off_terminal

    strip_ansi_off_terminal()
    # Optional-kernel probes that log at import time (torchao's CUDA extensions, bitsandbytes' CPU kernels).
    for name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
