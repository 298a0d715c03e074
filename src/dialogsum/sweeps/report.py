"""The report of a study (`dialogsum report STUDY_PARENT_RUN_ID`), from the MLflow store alone: the counts of
complete, pruned and failed trials, the best trial with its overrides and a ready `--set` line, the trials table
(state, score, the epoch a pruned trial stopped after, parameters, run), and Optuna's optimization-history plot.
Written as Markdown and as one self-contained HTML page, both logged to the study's parent run."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from dialogsum.pipeline.matrix import html_page
from dialogsum.sweeps.tune import BEST_RUN_TAG, BEST_SET_LINE_ARTIFACT, HISTORY_PLOT, METRIC_TAG, STUDY_TAG, TRIALS_TABLE
from dialogsum.tracking import load_predictions


def _cell(value) -> str:
    if value is None or value != value:  # None or NaN
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(parent, trials, set_line: str | None, plot: str | None, level: int = 1) -> str:
    """The study as Markdown, its title at heading `level` (a pipeline report nests it)."""
    metrics = parent.data.metrics
    lines = [f"{'#' * level} Study `{parent.data.tags.get(STUDY_TAG, parent.info.run_name)}`", "",
             f"Model `{parent.data.tags.get('dialogsum.model', '?')}`, space `{parent.data.params.get('study.space', '?')}`; "
             f"{int(metrics.get('trials_complete', 0))} complete, {int(metrics.get('trials_pruned', 0))} pruned, "
             f"{int(metrics.get('trials_failed', 0))} failed.", ""]  # fmt: skip
    if "best_trial" in metrics:
        metric = parent.data.tags[METRIC_TAG]
        lines += [f"**Best trial: {int(metrics['best_trial'])}**, {metric} = {metrics[f'best_{metric}']:.4f} "
                  f"(run `{parent.data.tags.get(BEST_RUN_TAG, '?')}`).", ""]  # fmt: skip
        if set_line:
            lines += ["Train with it:", "", "```", f"dialogsum train --model {parent.data.tags.get('dialogsum.model', 'MODEL')} {set_line}", "```", ""]
    else:
        lines += ["No trial completed.", ""]
    if plot:
        lines += [f"![optimization history]({plot})", ""]
    if trials is not None and not trials.empty:
        lines += [f"{'#' * (level + 1)} Trials", "", trials.map(_cell).to_markdown(index=False), ""]
    return "\n".join(lines)


def study_inputs(parent_id: str, folder: Path):
    """(trials table or None, `--set` line or None, history plot downloaded into `folder` or None) of a study run."""
    import mlflow

    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent_id)} | {a.path for a in client.list_artifacts(parent_id, "plots")}
    trials = load_predictions(parent_id, TRIALS_TABLE) if TRIALS_TABLE in artifacts else None
    set_line = mlflow.artifacts.load_text(f"runs:/{parent_id}/{BEST_SET_LINE_ARTIFACT}") if BEST_SET_LINE_ARTIFACT in artifacts else None
    plot = Path(client.download_artifacts(parent_id, HISTORY_PLOT, str(folder))) if HISTORY_PLOT in artifacts else None
    return trials, set_line, plot


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_study_report(parent_id: str, out_dir: Path | None = None) -> str:
    """Write report.md/report.html for a study's parent run, log them to it, return the Markdown."""
    import markdown
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        trials, set_line, plot = study_inputs(parent_id, folder)
        text = render_markdown(parent, trials, set_line, str(plot.relative_to(folder)) if plot else None)
        (folder / "report.md").write_text(text, encoding="utf-8")
        body = markdown.markdown(render_markdown(parent, trials, set_line, data_uri(plot) if plot else None), extensions=["tables", "fenced_code"])
        (folder / "report.html").write_text(html_page(f"dialogsum study: {parent.info.run_name}", body), encoding="utf-8")
        for name in ("report.md", "report.html"):
            client.log_artifact(parent_id, str(folder / name))
        return text
