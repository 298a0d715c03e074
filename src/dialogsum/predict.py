"""Submissions: summarise a competition CSV with a logged or registered model (or a logged ensemble) and write
`fname,summary`.

The file has one row per input row, in input order, UTF-8 without BOM. It is validated after writing (header,
row count, fnames in input order and unique, no empty summary unless that row is in the errors artifact) and
logged, with the errors and the pinned model version, to a run of kind `predict`. A batch whose generation
fails is retried row by row; a row that still fails gets an empty summary and an entry in
`submission/errors.json`, never a silent blank.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dialogsum.data import DialogueSet, read_dialogues
from dialogsum.registry import resolve_model_uri
from dialogsum.serving.pyfunc import predict_summaries
from dialogsum.tracking import configure_tracking, tracked_run

SUBMISSION_COLUMNS = ("fname", "summary")
SUBMISSION_ARTIFACT_DIR = "submission"
ERRORS_ARTIFACT = f"{SUBMISSION_ARTIFACT_DIR}/errors.json"
SOURCE_TAG = "dialogsum.predict.source"
SOURCE_REASON_TAG = "dialogsum.predict.source_reason"


class SubmissionError(ValueError):
    """A written submission file that breaks the format; lists every problem found."""


@dataclass
class RowError:
    row: int
    fname: str
    error: str


def summarize_rows(model, data: DialogueSet, batch_size: int, params: dict[str, Any]) -> tuple[list[str], list[RowError]]:
    """Summaries in input order and the rows that got none. Batches are built from length-sorted dialogues
    (less padding); a failing batch is retried row by row so one bad row cannot blank its neighbours."""
    from rich.progress import Progress

    order = sorted(range(len(data)), key=lambda i: len(data.rows[i].dialogue))
    summaries = [""] * len(data)
    errors: list[RowError] = []
    with Progress(transient=True) as progress:
        task = progress.add_task("summarize", total=len(data))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            try:
                outputs = predict_summaries(model, [data.rows[i].dialogue for i in batch], params)
            except Exception:  # retried row by row below to isolate the failing rows
                outputs = None
            for n, i in enumerate(batch):
                try:
                    summary = outputs[n] if outputs is not None else predict_summaries(model, [data.rows[i].dialogue], params)[0]
                except Exception as e:  # recorded per row in the errors artifact
                    errors.append(RowError(i + 1, data.rows[i].fname, f"{type(e).__name__}: {e}"))
                    continue
                if summary:
                    summaries[i] = summary
                else:
                    errors.append(RowError(i + 1, data.rows[i].fname, "the model generated an empty summary"))
            progress.advance(task, len(batch))
    return summaries, sorted(errors, key=lambda e: e.row)


def write_submission(path: Path, fnames: list[str], summaries: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(SUBMISSION_COLUMNS)
        writer.writerows(zip(fnames, summaries))


def validate_submission(path: Path, fnames: list[str], errors: list[RowError]) -> None:
    """Re-read the written file; raise SubmissionError naming the file, row and field of every problem."""
    with open(path, encoding="utf-8", newline="") as f:
        records = list(csv.reader(f))
    problems = []
    if not records or tuple(records[0]) != SUBMISSION_COLUMNS:
        problems.append(f"header is {records[0] if records else 'missing'}, expected {','.join(SUBMISSION_COLUMNS)}")
    rows = records[1:]
    if len(rows) != len(fnames):
        problems.append(f"{len(rows)} rows, the input has {len(fnames)}")
    seen: dict[str, int] = {}
    excused = {e.fname for e in errors}
    for row_no, (record, expected) in enumerate(zip(rows, fnames), start=1):
        if len(record) != len(SUBMISSION_COLUMNS):
            problems.append(f"row {row_no}: {len(record)} fields, expected {len(SUBMISSION_COLUMNS)}")
            continue
        fname, summary = record
        if fname != expected:
            problems.append(f"row {row_no}, column 'fname': '{fname}', input order has '{expected}'")
        if fname in seen:
            problems.append(f"row {row_no}, column 'fname': duplicate '{fname}' (first at row {seen[fname]})")
        seen.setdefault(fname, row_no)
        if not summary.strip() and fname not in excused:
            problems.append(f"row {row_no}, column 'summary': empty, and no error was recorded for '{fname}'")
    if problems:
        raise SubmissionError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]))


def predict_file(
    model_uri: str | None,
    data_path: str | Path,
    out_path: str | Path,
    batch_size: int = 16,
    params: dict[str, Any] | None = None,
    *,
    ensemble_run: str | None = None,
    source_reason: str | None = None,
) -> str:
    """Write the submission for `data_path` with `model_uri` (generation settings overridable through `params`) or
    with a logged ensemble (`ensemble_run`: its strategy over its sources' models); returns the id of the `predict`
    run, whose `error_rows` metric counts the rows left without a summary."""
    import mlflow

    if (model_uri is None) == (ensemble_run is None):
        raise ValueError("give exactly one of a model URI or an ensemble run")
    configure_tracking()
    out_path = Path(out_path)
    params = {k: v for k, v in (params or {}).items() if v is not None}
    with tracked_run(run_name="predict", kind="predict", system_metrics=True) as run:
        with run.stage_of("data"):
            data = read_dialogues(data_path, require_summary=False)
            source_params = {"data.path": str(data_path), "data.file_digest": data.report.digest, "data.rows": len(data),
                             "batch_size": batch_size, **{f"generation.{k}": v for k, v in params.items()}}  # fmt: skip
            if model_uri is not None:
                pinned_uri, version_info = resolve_model_uri(model_uri)
                source_params.update({"model_uri": model_uri, "model.pinned_uri": pinned_uri})
                mlflow.set_tags({**version_info, SOURCE_TAG: pinned_uri})
            else:
                source_params["ensemble_run"] = ensemble_run
                mlflow.set_tag(SOURCE_TAG, f"ensemble run {ensemble_run}")
            if source_reason:
                mlflow.set_tag(SOURCE_REASON_TAG, source_reason[:5000])
            mlflow.log_params(source_params)
        if model_uri is not None:
            with run.stage_of("load"):
                model = mlflow.pyfunc.load_model(pinned_uri)
            with run.stage_of("predict"):
                summaries, errors = summarize_rows(model, data, batch_size, {**params, "batch_size": batch_size})
        else:
            from dialogsum.ensemble import ensemble_summaries

            with run.stage_of("predict"):
                summaries = ensemble_summaries(ensemble_run, data)
                errors = [RowError(i + 1, r.fname, "the ensemble's sources gave no summary") for i, (r, s) in
                          enumerate(zip(data.rows, summaries)) if not s]  # fmt: skip
        with run.stage_of("write"):
            write_submission(out_path, data.fnames, summaries)
            validate_submission(out_path, data.fnames, errors)
            mlflow.log_artifact(str(out_path), SUBMISSION_ARTIFACT_DIR)
            if errors:
                mlflow.log_dict({"errors": [asdict(e) for e in errors]}, ERRORS_ARTIFACT)
            mlflow.log_metrics({"error_rows": len(errors), "rows_per_s": len(data) / max(run.timings["predict"], 1e-9)})
    return run.run_id
