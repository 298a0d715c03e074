"""`dialogsum ensemble --strategy logit_avg`: the sources' logged models decode as one (`logit_average`), logged as
an ensemble run like the other strategies, and as one pyfunc that holds every member model.

Unlike the selection strategies it writes new text, so it needs the sources' models, not their tables. It scores
the rows all sources were scored on: their validation rows when they share them (`val_*`), their test rows when
they share those (`test_*`; K-fold models validate on different folds but share the test rows), or a labelled
`--data` file (`test_*`). An unlabelled `--data` file gets predictions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dialogsum.tracking import PREDICTIONS_ARTIFACT, TEST_PREDICTIONS_ARTIFACT, TEST_ROWS_TAG, VAL_ROWS_TAG

STRATEGY = "logit_avg"


class NoSharedRows(ValueError):
    """Sources with no rows in common to score the ensemble on, and no --data file."""


def shared_rows(run_ids: Sequence[str], tag: str, artifact: str):
    """The prediction table (fname, dialogue, reference) of the rows every source was scored on under `tag`, or None."""
    import mlflow

    from dialogsum.tracking import load_predictions

    digests = {mlflow.get_run(r).data.tags.get(tag) for r in run_ids}
    if len(digests) != 1 or None in digests:
        return None
    return load_predictions(run_ids[0], artifact)[["fname", "dialogue", "reference"]]


def run_logit_average(run_ids: Sequence[str], *, data_path: str | Path | None = None, parent_run_id: str | None = None,
                      batch_size: int = 16) -> str:  # fmt: skip
    """Generate with the averaged sources on their shared rows (and `data_path`), log the run and the pyfunc;
    returns the run id. Raises IncompatibleModels or NoSharedRows before any run exists."""
    import tempfile

    import mlflow
    import pandas as pd

    from dialogsum.data import read_dialogues, rows_digest
    from dialogsum.ensemble import SOURCE_MODELS_TAG, SOURCES_TAG, STRATEGY_TAG
    from dialogsum.generate import summarize
    from dialogsum.logit_average import averaging, check_compatible
    from dialogsum.metrics import role_scores
    from dialogsum.serving import saved_model
    from dialogsum.serving.pyfunc import log_summarizer, logged_model_dir, run_model_uri
    from dialogsum.tracking import log_predictions, tracked_run

    if len(run_ids) < 2:
        raise NoSharedRows(f"logit_avg needs at least two sources, got {len(run_ids)}")
    folders = [logged_model_dir(run_model_uri(r)) for r in run_ids]
    members = [saved_model.load(f) for f in folders]
    check_compatible(members)
    roles: dict[str, pd.DataFrame] = {}
    for prefix, tag, artifact in (("val", VAL_ROWS_TAG, PREDICTIONS_ARTIFACT), ("test", TEST_ROWS_TAG, TEST_PREDICTIONS_ARTIFACT)):
        table = shared_rows(run_ids, tag, artifact)
        if table is not None:
            roles[prefix] = table
    if data_path is not None:
        data = read_dialogues(data_path, require_summary=False)
        frame = pd.DataFrame({"fname": data.fnames, "dialogue": data.dialogues,
                              "reference": data.summaries if data.report.labelled else [None] * len(data)})  # fmt: skip
        roles["test" if data.report.labelled else "data"] = frame
    if not roles:
        raise NoSharedRows("the sources share neither validation nor test rows (K-fold models validate on different folds); "
                           "give --data, a labelled file none of them trained on")  # fmt: skip
    model, tokenizer, cfg = members[0]
    labels = [mlflow.get_run(r).data.tags.get("dialogsum.model", r[:8]) for r in run_ids]
    tags = {STRATEGY_TAG: STRATEGY, SOURCES_TAG: ",".join(run_ids), SOURCE_MODELS_TAG: ",".join(labels)}
    with tracked_run(run_name=f"ensemble-{STRATEGY}", kind="ensemble", tags=tags, parent_run_id=parent_run_id) as run:
        mlflow.log_params({"ensemble.strategy": STRATEGY, "ensemble.sources": ",".join(run_ids), "ensemble.batch_size": batch_size})
        for prefix, table in roles.items():
            with run.stage_of(prefix), averaging([m for m, _, _ in members]) as main:
                predictions = summarize(main, tokenizer, cfg, list(table["dialogue"]), batch_size)
            out = table.assign(prediction=predictions)
            if prefix != "data":
                metrics, rows = role_scores(prefix, predictions, list(table["reference"]))
                mlflow.log_metrics(metrics)
                mlflow.set_tag(VAL_ROWS_TAG if prefix == "val" else TEST_ROWS_TAG, rows_digest(list(table["fname"]), list(table["reference"])))
                out = pd.concat([out, pd.DataFrame(rows)], axis=1)
            log_predictions(out.to_dict("records"), {"val": PREDICTIONS_ARTIFACT, "test": TEST_PREDICTIONS_ARTIFACT}.get(prefix, "data_predictions.json"))
        with run.stage_of("save"), tempfile.TemporaryDirectory() as tmp:
            folder = saved_model.write_ensemble(Path(tmp) / "ensemble", folders)
            first_rows = next(iter(roles.values()))
            log_summarizer(folder, f"ensemble-{STRATEGY}", cfg.generation, list(first_rows["dialogue"][:2]), batch_size=batch_size)
    return run.run_id
