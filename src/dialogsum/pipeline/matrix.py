"""The success/failure matrix of a pipeline: model × stage, with status, validation and test scores, error type.

`build_matrix` reads the latest attempt of every child into a long table; `pivot_matrix` makes the wide view
(models as rows, stages as columns, each cell "status (val x | test y) [error]"). A training child contributes
three stages: preflight, train, and validate/test (the best epoch's validation score and the chosen checkpoint's
test score). The HTML view is a self-contained page (UTF-8, coloured by status).
"""

from __future__ import annotations

from html import escape

from dialogsum.pipeline.store import duration_s, latest_children
from dialogsum.tracking import KIND_TAG, MODEL_TAG, STATUS_TAG, run_metric, stage_time_metric

STAGE_ORDER = ["preflight", "train", "validate", "solar", "ensemble", "optimize", "register", "predict"]
STATUS_COLOURS = {"succeeded": "#b7e1b5", "failed": "#f4b6b0", "skipped": "#e3e3e3", "killed": "#f7d59c",
                  "blocked": "#f4b6b0", "not reached": "#f3f3f3"}  # fmt: skip
COLUMNS = ["model", "stage", "status", "val_final", "test_final", "error_type", "duration_s", "run_id"]


def _scores(run) -> dict[str, float | None]:
    return {"val_final": run_metric(run, "val_final"), "test_final": run_metric(run, "test_final")}


def _train_rows(run) -> list[dict]:
    tags, metrics = run.data.tags, run.data.metrics
    status = tags.get(STATUS_TAG, "unknown")
    failed_stage = tags.get("error.stage") if status in ("failed", "killed") else None
    error_type = tags.get("error.type")
    base = {"model": tags.get(MODEL_TAG, run.info.run_name), "run_id": run.info.run_id}
    none = {"val_final": None, "test_final": None}
    if failed_stage == "preflight":
        return [{**base, "stage": "preflight", "status": "blocked", **none, "error_type": error_type, "duration_s": duration_s(run)}]
    evaluated = failed_stage in ("validate", "test", "save")
    train_status = "succeeded" if status == "succeeded" or evaluated else status
    validate_status = "succeeded" if status == "succeeded" else (status if evaluated else "not reached")
    return [
        {**base, "stage": "preflight", "status": "succeeded", **none, "error_type": None, "duration_s": None},
        {**base, "stage": "train", "status": train_status, **none, "error_type": error_type if train_status != "succeeded" else None,
         "duration_s": duration_s(run)},
        {**base, "stage": "validate", "status": validate_status, **_scores(run), "error_type": error_type if evaluated else None,
         "duration_s": (metrics.get(stage_time_metric("validate")) or 0) + (metrics.get(stage_time_metric("test")) or 0) or None},
    ]  # fmt: skip


def build_matrix(parent_id: str):
    """Long table: one row per (model, stage) with status, val_final, test_final, error type, duration and run id."""
    import pandas as pd

    rows = []
    for run in latest_children(parent_id):
        kind = run.data.tags.get(KIND_TAG)
        if kind == "train":
            rows.extend(_train_rows(run))
            continue
        rows.append({"model": run.data.tags.get(MODEL_TAG, run.info.run_name), "stage": kind,
                     "status": run.data.tags.get(STATUS_TAG, "unknown"), **_scores(run),
                     "error_type": run.data.tags.get("error.type"), "duration_s": duration_s(run), "run_id": run.info.run_id})  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def _present(value) -> bool:
    return value is not None and value == value  # not None, not NaN


def cell_text(row) -> str:
    text = row["status"]
    scores = [f"{name} {row[f'{name}_final']:.2f}" for name in ("val", "test") if _present(row[f"{name}_final"])]
    if scores:
        text += f" ({' | '.join(scores)})"
    if isinstance(row["error_type"], str):
        text += f" [{row['error_type']}]"
    return text


def pivot_matrix(matrix):
    """Wide view: models as rows, stages as columns, each cell 'status (val x | test y) [error]'."""
    if matrix.empty:
        return matrix
    wide = matrix.assign(cell=matrix.apply(cell_text, axis=1)).pivot_table(
        index="model", columns="stage", values="cell", aggfunc="first", sort=False
    )
    stages = [s for s in STAGE_ORDER if s in wide.columns]
    return wide[stages].fillna("—")


def status_of(cell: str) -> str:
    return "not reached" if cell.startswith("not reached") else cell.split(" ")[0]


def matrix_html(matrix, title: str) -> str:
    """A self-contained page: the wide matrix, each cell coloured by its status."""
    wide = pivot_matrix(matrix)
    if wide.empty:
        body = "<p>(no children)</p>"
    else:
        head = "".join(f"<th>{escape(str(c))}</th>" for c in wide.columns)
        rows = []
        for model, values in wide.iterrows():
            cells = "".join(f'<td style="background:{STATUS_COLOURS.get(status_of(str(v)), "#ffffff")}">{escape(str(v))}</td>' for v in values)
            rows.append(f"<tr><th>{escape(str(model))}</th>{cells}</tr>")
        body = f"<table><thead><tr><th>model</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    legend = " ".join(f'<span style="background:{c};padding:2px 6px">{s}</span>' for s, c in STATUS_COLOURS.items())
    return html_page(title, f"<h1>{escape(title)}</h1>\n{body}\n<p>{legend}</p>")


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans KR", "Noto Sans CJK KR", sans-serif;
       margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #1f2328; line-height: 1.5; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
thead th { background: #f6f8fa; }
code, pre { background: #f6f8fa; border-radius: 4px; }
pre { padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
img { max-width: 100%; border: 1px solid #eaeef2; }
h1, h2, h3 { border-bottom: 1px solid #eaeef2; padding-bottom: 0.2rem; }
"""


def html_page(title: str, body: str) -> str:
    """A complete UTF-8 HTML document with light styling around `body`."""
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")  # fmt: skip
