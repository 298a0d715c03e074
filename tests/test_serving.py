"""Serving and submissions: the registered champion answers `POST /invocations` under `mlflow models serve`, and
`dialogsum predict` writes a valid `fname,summary` submission for the 499 unlabelled competition rows.

The champion is a kobart-tiny model (KoBART architecture at toy size, random init, the real KoBART tokenizer)
trained briefly on real Korean DialogSum rows: its summaries are not good, but they are Korean text generated
by the real pyfunc through the real serving stack.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from tracking_server import _stop as stop_process_group
from tracking_server import _wait_healthy as wait_healthy
from tracking_server import free_port
from typer.testing import CliRunner

from dialogsum.cli import app
from dialogsum.data import read_dialogues
from dialogsum.predict import ERRORS_ARTIFACT, SubmissionError, summarize_rows, validate_submission, write_submission
from dialogsum.registry import register_best
from dialogsum.tracking import KIND_TAG, STATUS_TAG, configure_tracking

NAME = "dialogsum-ko"
CHAMPION_URI = f"models:/{NAME}@champion"
KOREAN_OR_SPEAKER = re.compile(r"[\uac00-\ud7a3]|#Person\d#")
SERVER_START_LIMIT_S = 120
FAST_GENERATION = {"num_beams": 1, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def champion(module_store, shared) -> str:
    """Train one tiny model and register it as the champion; returns its source run id."""
    from dialogsum.train import train_model

    labelled = shared("data/dialogsum-ko/labeled.csv")
    configure_tracking()
    train_model("kobart-tiny", train_path=labelled, eval_path=labelled,
                overrides={"training.epochs": 1, "training.max_train_samples": 32, "training.max_eval_samples": 4,
                           "generation.max_new_tokens": 16, "tokenizer.path": str(shared("tokenizers/kobart"))})  # fmt: skip
    return register_best(name=NAME)[1]


@pytest.fixture(scope="module")
def unlabelled(shared):
    return read_dialogues(shared("data/dialogsum-ko/unlabeled.csv"), require_summary=False)


def test_served_champion_answers_a_json_request_with_korean_summaries(champion, unlabelled, module_store):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = module_store / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION_URI, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, process, log, SERVER_START_LIMIT_S)
        dialogues = unlabelled.dialogues[:2]
        request = {"dataframe_split": {"columns": ["dialogue"], "data": [[d] for d in dialogues]},
                   "params": {"max_new_tokens": 16}}  # fmt: skip
        response = requests.post(f"{url}/invocations", json=request, timeout=60)
        assert response.status_code == 200, response.text
        summaries = response.json()["predictions"]
        print(f"\nserved summaries: {summaries}")
        assert len(summaries) == len(dialogues)
        assert all(KOREAN_OR_SPEAKER.search(s) for s in summaries), summaries
        listed = requests.post(f"{url}/invocations", json={"inputs": dialogues, "params": {"max_new_tokens": 16}}, timeout=60)
        assert listed.status_code == 200, listed.text
        assert listed.json()["predictions"] == summaries, "a plain list of dialogues is accepted too"
    finally:
        stop_process_group(process)


def test_champion_pyfunc_takes_a_dialogue_column_and_per_request_params(champion, unlabelled):
    model = mlflow.pyfunc.load_model(CHAMPION_URI)
    frame = pd.DataFrame({"fname": unlabelled.fnames[:3], "dialogue": unlabelled.dialogues[:3]})
    short = model.predict(frame, params=FAST_GENERATION)
    assert len(short) == 3 and all(KOREAN_OR_SPEAKER.search(s) for s in short)
    longer = model.predict(frame, params={**FAST_GENERATION, "max_new_tokens": 16, "min_new_tokens": 12})
    assert all(len(b) > len(a) for a, b in zip(short, longer)), "params override the logged generation settings"


def test_predict_writes_a_submission_for_the_499_unlabelled_rows(champion, unlabelled, shared, module_store):
    out = module_store / "submission.csv"
    params = [arg for k, v in FAST_GENERATION.items() for arg in ("--param", f"{k}={v}")]
    result = CliRunner().invoke(app, ["predict", "--model-uri", CHAMPION_URI, "--data",
                                      str(shared("data/dialogsum-ko/unlabeled.csv")), "--out", str(out),
                                      "--batch-size", "64", *params])  # fmt: skip
    assert result.exit_code == 0, result.output

    with open(out, encoding="utf-8", newline="") as f:
        records = list(csv.reader(f))
    assert records[0] == ["fname", "summary"]
    assert [r[0] for r in records[1:]] == unlabelled.fnames and len(records) == 1 + 499
    assert all(r[1].strip() for r in records[1:])
    assert not out.read_bytes().startswith(b"\xef\xbb\xbf")

    query = f"tags.`{KIND_TAG}` = 'predict' and params.`data.rows` = '499'"
    [run] = mlflow.search_runs(filter_string=query, output_format="list")
    assert run.data.tags[STATUS_TAG] == "succeeded"
    assert run.data.tags["model.version"] == "1" and run.data.tags["model.source_run_id"] == champion
    assert run.data.params["model.pinned_uri"] == f"models:/{NAME}/1"
    assert run.data.params["data.file_digest"] == unlabelled.report.digest and run.data.params["data.rows"] == "499"
    assert run.data.metrics["error_rows"] == 0
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="submission/submission.csv")
    assert Path(logged).read_bytes() == out.read_bytes()


class FailsOn:
    """A stand-in pyfunc whose generation fails for any batch containing `bad`, and returns "" for `blank`."""

    def __init__(self, bad: str, blank: str):
        self.bad, self.blank = bad, blank

    def predict(self, frame, params=None):  # noqa: ARG002
        dialogues = list(frame["dialogue"])
        if self.bad in dialogues:
            raise RuntimeError("CUDA out of memory")
        return ["" if d == self.blank else f"요약: {d[:10]}" for d in dialogues]


def test_failed_rows_are_recorded_never_silently_blank(unlabelled, tmp_path):
    data = unlabelled.head(6)
    model = FailsOn(bad=data.rows[2].dialogue, blank=data.rows[4].dialogue)
    summaries, errors = summarize_rows(model, data, batch_size=4, params={})
    assert [(e.row, e.fname) for e in errors] == [(3, data.rows[2].fname), (5, data.rows[4].fname)]
    assert "CUDA out of memory" in errors[0].error and "empty summary" in errors[1].error
    assert [bool(s) for s in summaries] == [True, True, False, True, False, True], "neighbours of a failing row keep theirs"

    out = tmp_path / "submission.csv"
    write_submission(out, data.fnames, summaries)
    validate_submission(out, data.fnames, errors)
    with pytest.raises(SubmissionError, match=r"row 3, column 'summary': empty"):
        validate_submission(out, data.fnames, errors[1:])
    with pytest.raises(SubmissionError, match=r"6 rows, the input has 7"):
        validate_submission(out, [*data.fnames, "extra"], errors)
    write_submission(out, [data.fnames[0], *data.fnames[:5]], summaries)
    with pytest.raises(SubmissionError, match=r"row 2, column 'fname': duplicate"):
        validate_submission(out, data.fnames, errors)


def test_predict_cli_exits_1_and_logs_errors_when_rows_fail(champion, module_store, monkeypatch):
    data = module_store / "small.csv"
    data.write_text('fname,dialogue\ntest_a,#Person1#: 안녕하세요.\ntest_b,"#Person2#: 네, 반갑습니다."\n', encoding="utf-8")
    monkeypatch.setattr("dialogsum.predict.predict_summaries", lambda model, dialogues, params: [""] * len(dialogues))
    result = CliRunner().invoke(app, ["predict", "--model-uri", CHAMPION_URI, "--data", str(data), "--out", "small-out.csv"])
    assert result.exit_code == 1 and "2 row(s) have no summary" in result.output
    run = mlflow.search_runs(filter_string="params.`data.path` LIKE '%small.csv'", output_format="list")[0]
    errors = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{ERRORS_ARTIFACT}")["errors"]
    assert [e["fname"] for e in errors] == ["test_a", "test_b"]
