"""Experiment report and success/failure matrix, generated from the MLflow store alone.

`build_matrix` reads a pipeline's children (latest attempt per model and step) into a long table
(model × stage: status, key metric, error type, duration). `write_report` renders the story of the run —
timeline, matrix, per-model metrics and ROUGE curves, failures grouped by cause with traceback excerpts, what was
skipped and why — as Markdown and HTML with PNG figures, and logs them to the parent run.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from dialogsum.tracking import KIND_TAG, MODEL_TAG, REASON_TAG, STATUS_TAG, run_metric

STAGE_ORDER = ["preflight", "train", "eval", "solar", "ensemble", "optimize", "register"]
STATUS_COLOURS = {"succeeded": "#b7e1b5", "failed": "#f4b6b0", "skipped": "#e3e3e3", "killed": "#f7d59c", "blocked": "#f4b6b0"}


def _client():
    import mlflow

    return mlflow.MlflowClient()


def latest_children(parent_id: str) -> list:
    """The parent's children, keeping the latest attempt per (kind, model), in start order."""
    client = _client()
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )
    latest = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        latest[(r.data.tags.get(KIND_TAG), r.data.tags.get(MODEL_TAG))] = r
    return sorted(latest.values(), key=lambda r: r.info.start_time)


def _duration_s(run) -> float | None:
    if run.info.end_time is None:
        return None
    return (run.info.end_time - run.info.start_time) / 1000


def _train_rows(run) -> list[dict]:
    tags, metrics = run.data.tags, run.data.metrics
    model = tags.get(MODEL_TAG, run.info.run_name)
    status = tags.get(STATUS_TAG, "unknown")
    failed_stage = tags.get("error.stage") if status in ("failed", "killed") else None
    error_type = tags.get("error.type")
    base = {"model": model, "run_id": run.info.run_id}
    if failed_stage == "preflight":
        return [{**base, "stage": "preflight", "status": "blocked", "metric": None, "error_type": error_type,
                 "duration_s": _duration_s(run)}]  # fmt: skip
    rows = [{**base, "stage": "preflight", "status": "succeeded", "metric": None, "error_type": None, "duration_s": None}]
    train_status = status if failed_stage not in ("eval",) else "succeeded"
    rows.append({**base, "stage": "train", "status": train_status, "metric": metrics.get("train_loss"),
                 "error_type": error_type if train_status != "succeeded" else None, "duration_s": _duration_s(run)})  # fmt: skip
    eval_status = "succeeded" if status == "succeeded" else ("failed" if failed_stage == "eval" else "not reached")
    rows.append({**base, "stage": "eval", "status": eval_status, "metric": run_metric(run, "eval_final"),
                 "error_type": error_type if failed_stage == "eval" else None, "duration_s": metrics.get("time_eval_s")})  # fmt: skip
    return rows


def build_matrix(parent_id: str):
    """Long table: one row per (model, stage) with status, key metric, error type, duration and run id."""
    import pandas as pd

    rows = []
    for run in latest_children(parent_id):
        kind = run.data.tags.get(KIND_TAG)
        if kind == "train":
            rows.extend(_train_rows(run))
            continue
        rows.append({
            "model": run.data.tags.get(MODEL_TAG, run.info.run_name), "stage": kind,
            "status": run.data.tags.get(STATUS_TAG, "unknown"), "metric": run_metric(run, "eval_final"),
            "error_type": run.data.tags.get("error.type"), "duration_s": _duration_s(run), "run_id": run.info.run_id,
        })  # fmt: skip
    columns = ["model", "stage", "status", "metric", "error_type", "duration_s", "run_id"]
    return pd.DataFrame(rows, columns=columns)


def _cell(row) -> str:
    text = row["status"]
    if row["metric"] is not None and row["metric"] == row["metric"]:
        text += f" ({row['metric']:.2f})"
    if isinstance(row["error_type"], str):
        text += f" [{row['error_type']}]"
    return text


def pivot_matrix(matrix):
    """Wide view: models as rows, stages as columns, each cell 'status (metric) [error]'."""
    if matrix.empty:
        return matrix
    wide = matrix.assign(cell=matrix.apply(_cell, axis=1)).pivot_table(
        index="model", columns="stage", values="cell", aggfunc="first", sort=False
    )
    stages = [s for s in STAGE_ORDER if s in wide.columns]
    return wide[stages].fillna("—")


def matrix_png(matrix, path: Path) -> Path:
    from dialogsum import figures

    wide = pivot_matrix(matrix)
    fig, ax = figures.subplots(figsize=(1.8 + 2.1 * max(len(wide.columns), 1), 0.8 + 0.45 * max(len(wide), 1)), dpi=110)
    ax.axis("off")
    if not wide.empty:
        colours = [[STATUS_COLOURS.get(str(v).split(" ")[0], "white") for v in row] for row in wide.values]
        table = ax.table(cellText=wide.values, rowLabels=wide.index, colLabels=wide.columns, cellColours=colours, loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.4)
    ax.set_title("dialogsum pipeline: model × stage")
    return figures.save(fig, path)


def log_matrix(parent_id: str, folder: Path):
    """Write matrix.csv/.md/.html/.png into `folder` and log them to the parent run; returns the long table."""
    matrix = build_matrix(parent_id)
    wide = pivot_matrix(matrix)
    matrix.to_csv(folder / "matrix.csv", index=False)
    (folder / "matrix.md").write_text(wide.to_markdown() if not wide.empty else "(no children)", encoding="utf-8")
    (folder / "matrix.html").write_text(wide.to_html(), encoding="utf-8")
    matrix_png(matrix, folder / "matrix.png")
    client = _client()
    for name in ("matrix.csv", "matrix.md", "matrix.html", "matrix.png"):
        client.log_artifact(parent_id, str(folder / name))
    return matrix


def _curves_png(train_runs: list, path: Path) -> Path | None:
    from dialogsum import figures

    client = _client()
    curves = {run.data.tags.get(MODEL_TAG): sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_final"))
              for run in train_runs}  # fmt: skip
    curves = {model: points for model, points in curves.items() if points}
    if not curves:
        return None
    fig, ax = figures.subplots(figsize=(6, 3.5), dpi=100)
    for model, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval_final (Korean ROUGE × 100)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figures.save(fig, path)


def _timeline_png(parent, children: list, path: Path) -> Path:
    from dialogsum import figures

    t0 = parent.info.start_time
    fig, ax = figures.subplots(figsize=(7, 0.8 + 0.35 * max(len(children), 1)), dpi=100)
    for i, run in enumerate(children):
        start = (run.info.start_time - t0) / 1000
        end = ((run.info.end_time or run.info.start_time) - t0) / 1000
        colour = STATUS_COLOURS.get(run.data.tags.get(STATUS_TAG, ""), "#cccccc")
        ax.barh(i, max(end - start, 0.2), left=start, color=colour, edgecolor="black")
    ax.set_yticks(range(len(children)))
    ax.set_yticklabels([f"{r.data.tags.get(KIND_TAG)}: {r.data.tags.get(MODEL_TAG, r.info.run_name)}" for r in children], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since pipeline start")
    return figures.save(fig, path)


def _traceback_excerpt(run_id: str, lines: int = 12) -> str:
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="errors/traceback.txt")
    except Exception:
        return ""
    return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _when(ms: int | None) -> str:
    if ms is None:
        return "—"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_markdown(parent_id: str, matrix, figures: dict[str, str]) -> str:
    client = _client()
    parent = client.get_run(parent_id)
    children = latest_children(parent_id)
    tags = parent.data.tags
    out = [f"# dialogsum report: {parent.info.run_name}", ""]
    duration = _duration_s(parent)
    if duration is None:
        duration_text = f"{time.time() - parent.info.start_time / 1000:.0f} s when this report was written"
    else:
        duration_text = f"{duration:.0f} s"
    out += [
        f"- parent run: `{parent_id}` (experiment {parent.info.experiment_id})",
        f"- started: {_when(parent.info.start_time)}; duration: {duration_text}",
        f"- children: {tags.get('dialogsum.succeeded', '?')} succeeded, {tags.get('dialogsum.failed', '?')} failed, "
        f"{tags.get('dialogsum.skipped', '?')} skipped",
        f"- best model: {tags.get('dialogsum.best_model', '—')} (eval_final {tags.get('dialogsum.best_eval_final', '—')})",
        "",
        "## Timeline",
        "",
        "| # | step | model | start (+s) | duration (s) | status |",
        "|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(children, 1):
        offset = (run.info.start_time - parent.info.start_time) / 1000
        d = _duration_s(run)
        out.append(f"| {i} | {run.data.tags.get(KIND_TAG)} | {run.data.tags.get(MODEL_TAG, run.info.run_name)} | "
                   f"{offset:.1f} | {f'{d:.1f}' if d is not None else '—'} | {run.data.tags.get(STATUS_TAG)} |")  # fmt: skip
    if "timeline" in figures:
        out += ["", f"![timeline]({figures['timeline']})"]
    out += ["", "## Success / failure matrix", "", pivot_matrix(matrix).to_markdown() if not matrix.empty else "(no children)"]
    if "matrix" in figures:
        out += ["", f"![matrix]({figures['matrix']})"]
    out += _metrics_section(children, figures)
    out += _failures_section(children)
    skipped = [r for r in children if r.data.tags.get(STATUS_TAG) == "skipped"]
    out += ["", "## Skipped", ""]
    out += [f"- **{r.data.tags.get(KIND_TAG)}**: {r.data.tags.get(REASON_TAG, 'no reason recorded')}" for r in skipped] or ["Nothing was skipped."]
    return "\n".join(out) + "\n"


def _metrics_section(children: list, figures: dict[str, str]) -> list[str]:
    out = ["", "## Per-model results (Korean morpheme ROUGE F1; final = 100 × mean)", "",
           "| model | kind | rouge1 | rouge2 | rougeL | final | best epoch | run |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in children:
        if run.data.tags.get(STATUS_TAG) != "succeeded" or run_metric(run, "eval_final") is None:
            continue
        m = [run_metric(run, f"eval_{k}") for k in ("rouge1", "rouge2", "rougeL")]
        best_epoch = run.data.metrics.get("best_epoch")
        out.append(f"| {run.data.tags.get(MODEL_TAG)} | {run.data.tags.get(KIND_TAG)} | "
                   + " | ".join(f"{v:.3f}" if v is not None else "—" for v in m)
                   + f" | {run_metric(run, 'eval_final'):.2f} | {int(best_epoch) if best_epoch else '—'} | `{run.info.run_id}` |")  # fmt: skip
    if "curves" in figures:
        out += ["", f"![ROUGE curves]({figures['curves']})"]
    return out


def _failures_section(children: list) -> list[str]:
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for run in children:
        if run.data.tags.get(STATUS_TAG) in ("failed", "killed"):
            groups[(run.data.tags.get("error.type", "unknown"), run.data.tags.get("error.stage", "unknown"))].append(run)
    out = ["", "## Failures by cause", ""]
    if not groups:
        return out + ["No failures."]
    for (error_type, stage), runs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        names = ", ".join(r.data.tags.get(MODEL_TAG, r.info.run_name) for r in runs)
        out += [f"### {error_type} at stage `{stage}` ({len(runs)}): {names}", ""]
        for run in runs:
            message = run.data.tags.get("error.message", "")
            out += [f"- **{run.data.tags.get(MODEL_TAG)}** (`{run.info.run_id}`): {message}"]
        excerpt = _traceback_excerpt(runs[0].info.run_id)
        if excerpt:
            out += ["", "```", excerpt, "```"]
        out.append("")
    return out


def write_report(parent_id: str, out_dir: Path | None = None) -> str:
    """Render report.md/report.html (+ figures) for a pipeline parent run, log them to it (next to the matrix
    files they link to) and return the Markdown; `out_dir` keeps a local copy."""
    import markdown

    client = _client()
    parent = client.get_run(parent_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        matrix = log_matrix(parent_id, folder)
        children = latest_children(parent_id)
        figures = {"matrix": "matrix.png", "timeline": _timeline_png(parent, children, folder / "timeline.png").name}
        train_runs = [r for r in children if r.data.tags.get(KIND_TAG) == "train"]
        if _curves_png(train_runs, folder / "rouge_curves.png"):
            figures["curves"] = "rouge_curves.png"
        text = render_markdown(parent_id, matrix, figures)
        (folder / "report.md").write_text(text, encoding="utf-8")
        html = markdown.markdown(text, extensions=["tables", "fenced_code"])
        (folder / "report.html").write_text(f"<!doctype html><meta charset='utf-8'><title>dialogsum report</title>\n{html}", encoding="utf-8")
        for name in ("report.md", "report.html", "timeline.png", *(["rouge_curves.png"] if "curves" in figures else [])):
            client.log_artifact(parent_id, str(folder / name))
        return text
