"""The experiment report of a pipeline, generated from the MLflow store alone.

`write_report` renders the story of a pipeline run — what was run on which rows, the timeline, the success/failure
matrix, validation and test scores side by side with their intervals, the comparisons the platform made (which
model beats which on the same test rows, or "not distinguishable"; the ensemble against its best source; int8
against the scored model; the champion decision; where the submission came from), failures grouped by cause with traceback
excerpts, and what was skipped and why — as Markdown with PNG figures, and as one self-contained HTML page
(UTF-8, figures embedded). Both are logged to the parent run next to the matrix files.
"""

from __future__ import annotations

import base64
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from dialogsum.comparison import compare_logged, split_comparable
from dialogsum.pipeline.matrix import build_matrix, html_page, matrix_html, pivot_matrix
from dialogsum.pipeline.report_figures import curves_png, matrix_png, timeline_png
from dialogsum.quantize import BASELINE as OPTIMIZE_BASELINE
from dialogsum.pipeline.store import best_train_run, find_child, duration_s, held_gpus, latest_children, started_ms
from dialogsum.sweeps.report import study_inputs
from dialogsum.tracking import KIND_TAG, MODEL_TAG, REASON_TAG, STATUS_TAG, VAL_ROWS_TAG, run_metric

SCORED_KINDS = ("train", "solar", "ensemble")


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _name(run) -> str:
    return run.data.tags.get(MODEL_TAG) or run.info.run_name


def _when(ms: int | None) -> str:
    if ms is None:
        return "—"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _score(run, prefix: str) -> str:
    value = run_metric(run, f"{prefix}_final")
    if value is None:
        return "—"
    low, high = run_metric(run, f"{prefix}_final_ci95_low"), run_metric(run, f"{prefix}_final_ci95_high")
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if low is not None and high is not None else f"{value:.2f}"


def _traceback_excerpt(run_id: str, lines: int = 12) -> str:
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="errors/traceback.txt")
    except Exception:  # no traceback logged (a preflight block, a timeout): the message says enough
        return ""
    return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _header(parent, children: list) -> list[str]:
    tags, params = parent.data.tags, parent.data.params
    duration = duration_s(parent)
    duration_text = f"{duration:.0f} s" if duration is not None else f"{time.time() - parent.info.start_time / 1000:.0f} s when this report was written"
    best = best_train_run(children)
    out = [f"# dialogsum report: {parent.info.run_name}", "",
           f"- parent run: `{parent.info.run_id}` (experiment {parent.info.experiment_id})",
           f"- started: {_when(parent.info.start_time)}; duration: {duration_text}; stages ran on: "
           f"{_executor(params, children)}",
           f"- children: {tags.get('dialogsum.succeeded', '?')} succeeded, {tags.get('dialogsum.failed', '?')} failed, "
           f"{tags.get('dialogsum.skipped', '?')} skipped"]  # fmt: skip
    if best is not None:
        out.append(f"- best model by validation: **{_name(best)}**, val_final {_score(best, 'val')}, "
                   f"test_final {_score(best, 'test')} (95% bootstrap intervals over rows)")  # fmt: skip
    roles = [f"{role} {params[f'data.{role}.rows']} rows ({params.get(f'data.{role}.selection', 'all rows')})"
             for role in ("train", "validation", "test", "predict") if f"data.{role}.rows" in params]  # fmt: skip
    if roles:
        out += ["", "**Data roles.** Train fits; validation chooses (epochs, ensemble weights, variants, the ranking of "
                "candidates); test reports, and its one use in a decision is the champion gate; predict is summarised "
                "for the submission. " + "; ".join(roles) + "."]  # fmt: skip
    return out


def _executor(params: dict, children: list) -> str:
    if params.get("executor") != "ray":
        if any(held_gpus(r) for r in children):
            return "this machine's GPUs, at once where they had room (each stage on its own GPUs: see the timeline)"
        return "this machine, one after another"
    address = params.get("ray.address")
    where = address if address not in (None, "", "None") else "started for this pipeline"
    return f"a Ray cluster ({where}), at once where it had room"


def _timeline(parent, children: list) -> list[str]:
    """The stages in start order; with a GPUs column when the local executor pinned stages to GPUs."""
    pinned = any(held_gpus(r) for r in children)
    columns = ["#", "step", "model", "start (+s)", "duration (s)", "status"] + (["GPUs"] if pinned else [])
    out = ["", "## Timeline", "", f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    for i, run in enumerate(children, 1):
        offset = (started_ms(run) - parent.info.start_time) / 1000
        d = duration_s(run)
        cells = [str(i), run.data.tags.get(KIND_TAG), _name(run), f"{offset:.1f}", f"{d:.1f}" if d is not None else "—",
                 run.data.tags.get(STATUS_TAG)] + ([held_gpus(run) or "—"] if pinned else [])  # fmt: skip
        out.append(f"| {' | '.join(str(c) for c in cells)} |")
    return out


def _results(children: list) -> list[str]:
    scored = [r for r in children if r.data.tags.get(STATUS_TAG) == "succeeded" and r.data.tags.get(KIND_TAG) in SCORED_KINDS
              and run_metric(r, "val_final") is not None]  # fmt: skip
    comparable, left_out, _ = split_comparable(scored, VAL_ROWS_TAG, lambda r: run_metric(r, "val_final"), _name)
    out = ["", "## Results: validation chooses, test reports (Korean morpheme ROUGE F1; final = 100 × mean)", "",
           "| model | kind | val_final [95% CI] | test_final [95% CI] | val rouge1 | val rouge2 | val rougeL | best epoch | run |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in sorted(comparable, key=lambda r: -run_metric(r, "val_final")):
        rouge = [run_metric(run, f"val_{k}") for k in ("rouge1", "rouge2", "rougeL")]
        best_epoch = run.data.metrics.get("best_epoch")
        out.append(f"| {_name(run)} | {run.data.tags.get(KIND_TAG)} | {_score(run, 'val')} | {_score(run, 'test')} | "
                   + " | ".join(f"{v:.3f}" if v is not None else "—" for v in rouge)
                   + f" | {int(best_epoch) if best_epoch else '—'} | `{run.info.run_id}` |")  # fmt: skip
    if left_out:
        out += ["", "Not comparable (not ranked with the runs above):", ""] + [f"- {n.line()}" for n in left_out]
    return out


def _comparisons(children: list) -> list[str]:
    """Every comparison the pipeline made, each with its paired-bootstrap interval."""
    out = ["", "## Comparisons on the same rows (paired bootstrap, 95%)", ""]
    best = best_train_run(children)
    others = [r for r in children if r is not best and r.data.tags.get(STATUS_TAG) == "succeeded"
              and r.data.tags.get(KIND_TAG) in SCORED_KINDS]  # fmt: skip
    if best is not None:
        for run in others:
            comparison, why = compare_logged(best, _name(best), run, _name(run), "test")
            out.append(f"- test: {comparison.sentence() if comparison else f'{_name(best)} vs {_name(run)}: not compared, {why}'}")
    ensemble = find_child(children, "ensemble")
    if ensemble is not None:
        m = ensemble.data.metrics
        for prefix in ("val", "test"):
            if f"{prefix}_diff_vs_best_source" in m:
                d, lo, hi = (m[f"{prefix}_diff_vs_best_source{s}"] for s in ("", "_ci95_low", "_ci95_high"))
                verdict = "not distinguishable" if lo <= 0 <= hi else ("better" if d > 0 else "worse")
                out.append(f"- {prefix}: the ensemble vs its best source: {d:+.2f} [{lo:+.2f}, {hi:+.2f}], {verdict}")
    optimize = find_child(children, "optimize")
    if optimize is not None:
        for name, value in sorted(optimize.data.metrics.items()):
            if name.endswith(f"_diff_vs_{OPTIMIZE_BASELINE}"):
                lo, hi = optimize.data.metrics[f"{name}_ci95_low"], optimize.data.metrics[f"{name}_ci95_high"]
                verdict = "not distinguishable" if lo <= 0 <= hi else ("better" if value > 0 else "worse")
                out.append(f"- optimize, {name.removesuffix(f'_diff_vs_{OPTIMIZE_BASELINE}').replace('_', ' ')} vs the scored model: {value:+.2f} [{lo:+.2f}, {hi:+.2f}], {verdict}")
    register = find_child(children, "register")
    if register is not None and "dialogsum.registry_decision" in register.data.tags:
        out.append(f"- registry: {register.data.tags.get('dialogsum.registered', '')} {register.data.tags['dialogsum.registry_decision']}")
    predict = find_child(children, "predict")
    if predict is not None and "dialogsum.predict.source" in predict.data.tags:
        out.append(f"- submission: written by {predict.data.tags['dialogsum.predict.source']}; "
                   f"{predict.data.tags.get('dialogsum.predict.source_reason', '')}")  # fmt: skip
    return out if len(out) > 3 else out + ["Nothing was compared."]


def _failures(children: list) -> list[str]:
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for run in children:
        if run.data.tags.get(STATUS_TAG) in ("failed", "killed"):
            groups[(run.data.tags.get("error.type", "unknown"), run.data.tags.get("error.stage", "unknown"))].append(run)
    out = ["", "## Failures by cause", ""]
    if not groups:
        return out + ["No failures."]
    for (error_type, stage), runs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        out += [f"### {error_type} at stage `{stage}` ({len(runs)}): {', '.join(_name(r) for r in runs)}", ""]
        out += [f"- **{_name(run)}** (`{run.info.run_id}`): {run.data.tags.get('error.message', '')}" for run in runs]
        excerpt = _traceback_excerpt(runs[0].info.run_id)
        if excerpt:
            out += ["", "```", excerpt, "```"]
        out.append("")
    return out


def render_markdown(parent, children: list, matrix, figures: dict[str, str], studies: dict[str, tuple] | None = None) -> str:
    """The report as Markdown; `figures` maps a figure's key to its image source (a file name or a data URI);
    `studies` holds each study child's (trials table, `--set` line)."""
    out = _header(parent, children) + _timeline(parent, children)
    if "timeline" in figures:
        out += ["", f"![timeline]({figures['timeline']})"]
    out += ["", "## Success / failure matrix", "", pivot_matrix(matrix).to_markdown() if not matrix.empty else "(no children)"]
    if "matrix" in figures:
        out += ["", f"![matrix]({figures['matrix']})"]
    out += _results(children)
    if "curves" in figures:
        out += ["", f"![validation curves]({figures['curves']})"]
    out += _sweeps(children, figures, studies or {}) + _comparisons(children) + _failures(children)
    skipped = [r for r in children if r.data.tags.get(STATUS_TAG) == "skipped"]
    out += ["", "## Skipped", ""]
    out += [f"- **{r.data.tags.get(KIND_TAG)}**: {r.data.tags.get(REASON_TAG, 'no reason recorded')}" for r in skipped] or ["Nothing was skipped."]
    return "\n".join(out) + "\n"


def _sweeps(children: list, figures: dict[str, str], studies: dict[str, tuple]) -> list[str]:
    """A section per study (its trials, best trial and history plot) and per K-fold run (CV mean ± std, OOF score);
    `studies` maps a study run id to its (trials table, `--set` line)."""
    from dialogsum.sweeps.report import render_markdown as study_markdown

    out: list[str] = []
    for run in children:
        kind, m = run.data.tags.get(KIND_TAG), run.data.metrics
        if kind == "tune" and run.info.run_id in studies:
            trials, set_line = studies[run.info.run_id]
            out += ["", study_markdown(run, trials, set_line, figures.get(f"study:{run.info.run_id}"), level=2)]
        elif kind == "kfold" and "cv_val_final_mean" in m:
            out += ["", f"## Cross-validation: {_name(run)}", "",
                    f"{int(run.data.tags.get('dialogsum.folds', 0))} folds: val_final {m['cv_val_final_mean']:.2f} ± {m['cv_val_final_std']:.2f}; "
                    f"out-of-fold final {m['oof_final']:.2f} [{m['oof_final_ci95_low']:.2f}, {m['oof_final_ci95_high']:.2f}] over "
                    f"{int(m['oof_rows'])} training rows, each predicted by the fold that held it out."]  # fmt: skip
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(parent_id: str, out_dir: Path | None = None) -> str:
    """Write matrix.csv/.md/.html/.png and report.md/.html (+ figures) for a pipeline parent run, log them to it and
    return the Markdown; `out_dir` keeps a local copy."""
    import markdown

    client = _client()
    parent = client.get_run(parent_id)
    children = latest_children(parent_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        matrix = build_matrix(parent_id)
        matrix.to_csv(folder / "matrix.csv", index=False)
        wide = pivot_matrix(matrix)
        (folder / "matrix.md").write_text(wide.to_markdown() if not wide.empty else "(no children)", encoding="utf-8")
        (folder / "matrix.html").write_text(matrix_html(matrix, f"{parent.info.run_name}: model × stage"), encoding="utf-8")
        files = {"matrix": matrix_png(matrix, folder / "matrix.png"),
                 "timeline": timeline_png(parent, children, folder / "timeline.png")}  # fmt: skip
        curves = {_name(r): sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val_final"))
                  for r in children if r.data.tags.get(KIND_TAG) == "train"}  # fmt: skip
        curve_file = curves_png(curves, folder / "val_curves.png")
        if curve_file is not None:
            files["curves"] = curve_file
        studies = {}
        for run in children:
            if run.data.tags.get(KIND_TAG) != "tune":
                continue
            trials, set_line, plot = study_inputs(run.info.run_id, folder / "studies" / run.info.run_id)
            if trials is not None:  # a study that logged its trials table
                studies[run.info.run_id] = (trials, set_line)
                if plot is not None:
                    files[f"study:{run.info.run_id}"] = plot
        text = render_markdown(parent, children, matrix, {key: str(path.relative_to(folder)) for key, path in files.items()}, studies)
        (folder / "report.md").write_text(text, encoding="utf-8")
        embedded = render_markdown(parent, children, matrix, {key: _data_uri(path) for key, path in files.items()}, studies)
        body = markdown.markdown(embedded, extensions=["tables", "fenced_code"])
        (folder / "report.html").write_text(html_page(f"dialogsum report: {parent.info.run_name}", body), encoding="utf-8")
        for name in ("matrix.csv", "matrix.md", "matrix.html", "report.md", "report.html", *(str(p.relative_to(folder)) for p in files.values())):
            client.log_artifact(parent_id, str(folder / name), str(Path(name).parent) if Path(name).parent != Path(".") else None)
        return text
