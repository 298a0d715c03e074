"""Ensembles of summaries: MBR, weighted MBR and stacking on hand-made candidate sets (where the right pick is
known) and on prediction tables logged by real runs in a temporary MLflow store, built from real rows of the
shared Korean DialogSum data.

Source "models" here are deterministic transformations of real rows, named for what they are: `reference`
(the reference itself, standing in for a perfect model), `truncated` (the first half of the reference's words,
a close model), `first_turn` / `last_turn` (a dialogue turn, an extractive baseline). The pyfunc models logged
in the `--data` tests stand in for trained models. Only the last test trains real (tiny, random-init) models.
"""

from __future__ import annotations

import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dialogsum.cli import app
from dialogsum.data import Dialogue, read_dialogues
from dialogsum.ensemble import (
    CandidateSet,
    FnameMismatch,
    NotEnoughSources,
    PairwiseRouge,
    Source,
    build_frame,
    out_of_fold_predictions,
    run_ensemble,
    select,
    source_runs_of_parent,
    top_k_source_runs,
)
from dialogsum.metrics import aggregate, score_rows
from dialogsum.tracking import (
    MODEL_TAG,
    configure_tracking,
    create_child_run,
    load_predictions,
    log_predictions,
    tracked_run,
)

LABELLED_CSV = "data/dialogsum-ko/labeled.csv"
UNLABELLED_CSV = "data/dialogsum-ko/unlabeled.csv"
KOBART_TOKENIZER = "tokenizers/kobart"


def first_turn(row: Dialogue) -> str:
    return row.dialogue.split("\n")[0].split(": ", 1)[-1]


def last_turn(row: Dialogue) -> str:
    return row.dialogue.split("\n")[-1].split(": ", 1)[-1]


def truncated(row: Dialogue) -> str:
    words = (row.summary or "").split()
    return " ".join(words[: max(1, len(words) // 2)])


def reference(row: Dialogue) -> str:
    return row.summary or ""


@pytest.fixture
def experiment(module_store, monkeypatch):
    """A fresh experiment in the module's store, so run searches see only this test's runs."""
    name = f"ensemble-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # else configure_tracking keeps the previous one
    configure_tracking()
    return name


@pytest.fixture(scope="module")
def rows(shared) -> list[Dialogue]:
    return read_dialogues(shared(LABELLED_CSV)).rows


def log_source(name: str, rows: list[Dialogue], transform, *, kind: str = "train", errors=None, parent=None) -> str:
    """A run like `train` logs: the predictions table of `transform` on real rows and its eval_final."""
    predictions = [transform(r) for r in rows]
    scores = score_rows(predictions, [r.summary for r in rows])
    table = [
        {"fname": r.fname, "dialogue": r.dialogue, "reference": r.summary, "prediction": p, **s}
        for r, p, s in zip(rows, predictions, scores)
    ]
    if errors is not None:
        for row, error in zip(table, errors):
            row["error"] = error
    with tracked_run(run_name=name, kind=kind, tags={MODEL_TAG: name}, parent_run_id=parent) as run:
        log_predictions(table)
        mlflow.log_metric("eval_final", aggregate(scores)["final"])
    return run.run_id


def runs_in_experiment() -> int:
    return len(mlflow.search_runs(output_format="list"))


def hand_made(texts_per_row: list[list[str]], scores: list[float]) -> tuple[CandidateSet, list[Source]]:
    """A candidate set of hand-written texts (no MLflow): one source per column, with the given scores."""
    n = len(texts_per_row)
    candidates = CandidateSet([f"d{i}" for i in range(n)], ["#Person1#: 안녕하세요.\n#Person2#: 네."] * n, None, texts_per_row)
    sources = [Source(f"run{i}", f"model{i}", "train", s, label=f"model{i}") for i, s in enumerate(scores)]
    return candidates, sources


def picked_sources(candidates: CandidateSet, sources: list[Source], strategy: str) -> list[int]:
    frame = build_frame(candidates, sources, PairwiseRouge())
    picks = select(frame, strategy, sources).picks
    return list(frame.loc[picks, "source"])


AGREE = "#Person1#는 내일 아침에 공항으로 친구를 마중 나갑니다."
AGREE_CLOSE = "#Person1#는 내일 아침 공항에 친구를 마중 나갑니다."
OUTLIER = "#Person2#는 새 컴퓨터를 사려고 가게에 갑니다."


# --- hand-made candidate sets ---------------------------------------------------------------------------------


def test_pairwise_rouge_scores_each_distinct_pair_once():
    pairwise = PairwiseRouge()
    texts = [AGREE, OUTLIER, AGREE, AGREE_CLOSE, OUTLIER]
    sim = pairwise.matrix(texts)
    assert pairwise.pairs_scored == 3  # 3 distinct texts → 3 unordered pairs, duplicates never rescored
    assert np.allclose(sim, sim.T)
    assert sim[0, 2] == 1.0 and sim[1, 4] == 1.0
    assert sim[0, 3] > 0.5 > sim[0, 1]
    assert sim[0, 3] == pytest.approx(score_rows([AGREE_CLOSE], [AGREE])[0]["final"] / 100)  # the metric's own ROUGE


def test_mbr_picks_a_candidate_two_sources_agree_on():
    # Row 0: two sources agree exactly (the earlier one wins the tie). Row 1: two agree closely, either will do.
    candidates, sources = hand_made([[OUTLIER, AGREE, AGREE], [AGREE, OUTLIER, AGREE_CLOSE]], [10.0, 10.0, 10.0])
    first, second = picked_sources(candidates, sources, "mbr")
    assert first == 1 and second in (0, 2)


def test_weighted_mbr_follows_the_high_scoring_sources():
    # Two low-scoring sources agree exactly; two high-scoring ones agree closely. Plain MBR counts heads,
    # weighted MBR weighs each vote by the voter's validation score.
    texts = [[AGREE, AGREE_CLOSE, OUTLIER, OUTLIER]]
    candidates, sources = hand_made(texts, [40.0, 40.0, 1.0, 1.0])
    assert picked_sources(candidates, sources, "mbr") == [2]
    assert picked_sources(candidates, sources, "weighted_mbr") in ([0], [1])


def test_a_lone_candidate_is_chosen_and_missing_ones_are_skipped():
    candidates, sources = hand_made([[None, OUTLIER, None], [AGREE, AGREE, OUTLIER]], [1.0, 1.0, 1.0])
    frame = build_frame(candidates, sources, PairwiseRouge())
    assert list(frame.loc[frame["row"] == 0, "n_candidates"]) == [1]
    assert picked_sources(candidates, sources, "mbr") == [1, 0]


class GroupRecordingRegressor:
    """Remembers the dialogue ids (feature 0) it was fitted on and refuses to predict any of them."""

    def fit(self, features, target):
        self.seen = set(features[:, 0])
        self.mean = float(np.mean(target))
        return self

    def predict(self, features):
        leaked = self.seen & set(features[:, 0])
        assert not leaked, f"predicted dialogues the model trained on: {sorted(leaked)}"
        return np.full(len(features), self.mean)


def test_stacking_predictions_are_out_of_fold():
    groups = np.repeat(np.arange(12), 3)
    features = np.column_stack([groups, np.random.default_rng(0).normal(size=len(groups))])
    predictions, folds = out_of_fold_predictions(features, np.arange(len(groups), dtype=float), groups, 5, GroupRecordingRegressor)
    assert folds == 5 and predictions.shape == groups.shape


def test_stacking_needs_two_labelled_dialogues():
    with pytest.raises(ValueError, match="at least two labelled dialogues"):
        out_of_fold_predictions(np.zeros((3, 1)), np.zeros(3), np.zeros(3), 5)


# --- prediction tables of real runs ---------------------------------------------------------------------------


def test_mbr_on_real_tables_picks_the_candidate_two_runs_agree_on(experiment, rows):
    data = rows[:60]
    baseline = log_source("first_turn", data, first_turn)
    agree_a = log_source("truncated-a", data, truncated)
    agree_b = log_source("truncated-b", data, truncated)

    run_id = run_ensemble([baseline, agree_a, agree_b], "mbr")

    run = mlflow.get_run(run_id)
    m = run.data.metrics
    assert m["win_share_truncated-a"] == 1.0  # identical candidates agree fully; ties go to the earlier source
    assert m["win_share_first_turn"] == 0.0 and m["win_share_truncated-b"] == 0.0
    assert m["eval_final"] == pytest.approx(m["source_truncated-a_eval_final"])
    assert m["oracle_eval_final"] >= max(m["source_first_turn_eval_final"], m["source_truncated-a_eval_final"])
    assert m["n_rows"] == 60
    tags = run.data.tags
    assert tags["dialogsum.kind"] == "ensemble" and tags["dialogsum.status"] == "succeeded"
    assert tags["dialogsum.ensemble.strategy"] == "mbr"
    assert tags["dialogsum.ensemble.sources"] == ",".join([baseline, agree_a, agree_b])
    assert "Oracle" in tags["mlflow.note.content"]
    sources = mlflow.artifacts.load_dict(f"runs:/{run_id}/ensemble/sources.json")
    assert [s["model"] for s in sources["sources"]] == ["first_turn", "truncated-a", "truncated-b"]
    assert all(isinstance(s["score"], float) for s in sources["sources"])
    summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/ensemble/summary.json")
    assert "UPPER BOUND" in summary["oracle"]["note"]
    table = load_predictions(run_id)
    assert list(table["fname"]) == [r.fname for r in data]
    assert list(table["prediction"]) == [truncated(r) for r in data]
    assert {"reference", "rouge1", "rouge2", "rougeL", "final", "source", "oracle_final"} <= set(table.columns)
    assert run.data.params["ensemble.strategy"] == "mbr"


def test_weighted_mbr_on_real_tables_sides_with_the_better_runs(experiment, rows):
    data = rows[:60]
    run_ids = [
        log_source("reference", data, reference),
        log_source("truncated", data, truncated),
        log_source("first_turn-a", data, first_turn),
        log_source("first_turn-b", data, first_turn),
    ]
    plain = mlflow.get_run(run_ensemble(run_ids, "mbr")).data.metrics
    weighted = mlflow.get_run(run_ensemble(run_ids, "weighted_mbr")).data.metrics
    assert plain["win_share_first_turn-a"] > 0.5  # two identical weak candidates out-vote two different strong ones
    assert weighted["win_share_reference"] + weighted["win_share_truncated"] > 0.9
    assert weighted["eval_final"] > plain["eval_final"] + 20


def test_stacking_learns_the_best_source_and_reports_out_of_fold(experiment, rows):
    data = rows[:100]
    run_ids = [log_source(name, data, how) for name, how in
               (("first_turn", first_turn), ("reference", reference), ("truncated", truncated), ("last_turn", last_turn))]

    run_id = run_ensemble(run_ids, "stacking", folds=5)

    run = mlflow.get_run(run_id)
    m = run.data.metrics
    assert m["win_share_reference"] > 0.9
    assert m["eval_final"] <= m["oracle_eval_final"]
    assert m["eval_final"] > m["source_truncated_eval_final"]
    assert run.data.params["ensemble.stacking.scored"] == "out-of-fold (GroupKFold by fname)"
    assert run.data.params["ensemble.stacking.folds"] == "5"
    assert "source=reference" in run.data.params["ensemble.stacking.features"]
    summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/ensemble/summary.json")
    assert summary["ensemble_score_kind"].startswith("out-of-fold")


def test_solar_rows_with_an_error_are_not_candidates(experiment, rows):
    data = rows[:20]
    errors = ["API timeout" if i % 2 else None for i in range(len(data))]
    solar = log_source("solar-api", data, reference, kind="solar", errors=errors)
    other = log_source("first_turn", data, first_turn)

    table = load_predictions(run_ensemble([solar, other], "mbr"))
    failed = table[[e is not None for e in errors]]
    assert set(failed["n_candidates"]) == {1} and set(failed["source"]) == {"first_turn"}
    assert set(table.loc[[e is None for e in errors], "n_candidates"]) == {2}


def test_fewer_than_two_usable_sources_is_refused_before_any_run(experiment, rows):
    data = rows[:10]
    good = log_source("first_turn", data, first_turn)
    all_failed = log_source("solar-api", data, reference, kind="solar", errors=["rate limited"] * len(data))
    with tracked_run(run_name="no-table", kind="train") as run:
        no_table = run.run_id
    before = runs_in_experiment()

    with pytest.raises(NotEnoughSources) as caught:
        run_ensemble([good, all_failed, no_table], "mbr")

    message = str(caught.value)
    assert "at least two usable sources, got 1" in message
    assert f"{all_failed}: its predictions table has no usable row" in message
    assert f"{no_table}: no predictions table" in message
    assert runs_in_experiment() == before
    result = CliRunner().invoke(app, ["ensemble", "--runs", f"{good},{no_table}"])
    assert result.exit_code == 1 and "at least two usable sources" in result.output
    assert runs_in_experiment() == before
    result = CliRunner().invoke(app, ["ensemble", "--strategy", "mbr"])
    assert result.exit_code == 1 and "exactly one of --runs, --parent or --top-k" in result.output


def test_a_stage_run_opened_for_the_command_ends_skipped_with_the_reason(experiment, rows, monkeypatch):
    """The pipeline (and `mlflow run`) open the run first and pass it as $MLFLOW_RUN_ID."""
    good = log_source("first_turn", rows[:5], first_turn)
    with tracked_run(run_name="pipeline", kind="pipeline") as parent:
        pass
    stage_run = create_child_run(parent.run_id, "ensemble", "ensemble", {MODEL_TAG: "ensemble"})
    monkeypatch.setenv("MLFLOW_RUN_ID", stage_run)

    result = CliRunner().invoke(app, ["ensemble", "--runs", good])

    assert result.exit_code == 0, result.output
    run = mlflow.get_run(stage_run)
    assert run.info.status == "FINISHED" and run.data.tags["dialogsum.status"] == "skipped"
    assert run.data.tags["dialogsum.reason"].startswith("an ensemble needs at least two usable sources, got 1")


def test_mismatched_fnames_name_the_differing_rows(experiment, rows):
    full = log_source("first_turn", rows[:12], first_turn)
    partial = log_source("truncated", rows[:10], truncated)
    before = runs_in_experiment()

    with pytest.raises(FnameMismatch) as caught:
        run_ensemble([full, partial], "mbr")

    assert caught.value.missing == {f"truncated ({partial})": sorted(r.fname for r in rows[10:12])}
    assert rows[10].fname in str(caught.value) and rows[11].fname in str(caught.value)
    assert runs_in_experiment() == before


def test_weighted_mbr_needs_every_source_score(experiment, rows):
    data = rows[:5]
    scored = log_source("first_turn", data, first_turn)
    with tracked_run(run_name="unscored", kind="train", tags={MODEL_TAG: "unscored"}) as run:
        log_predictions([{"fname": r.fname, "dialogue": r.dialogue, "reference": r.summary, "prediction": truncated(r)} for r in data])
    with pytest.raises(ValueError, match="which these did not log: unscored"):
        run_ensemble([scored, run.run_id], "weighted_mbr")


def test_sources_from_a_parent_or_the_top_k(experiment, rows):
    data = rows[:10]
    with tracked_run(run_name="pipeline", kind="pipeline") as parent:
        pass
    weak = log_source("first_turn", data, first_turn, parent=parent.run_id)
    strong = log_source("reference", data, reference, parent=parent.run_id)
    log_source("outside", data, truncated)
    with pytest.raises(RuntimeError):
        with tracked_run(run_name="crashed", kind="train", parent_run_id=parent.run_id):
            raise RuntimeError("out of memory")

    assert source_runs_of_parent(parent.run_id) == [strong, weak]
    assert top_k_source_runs(2)[0] == strong
    assert len(top_k_source_runs(5)) == 3

    result = CliRunner().invoke(app, ["ensemble", "--parent", parent.run_id, "--strategy", "weighted_mbr"])
    assert result.exit_code == 0, result.output
    ensembles = mlflow.search_runs(filter_string="tags.`dialogsum.kind` = 'ensemble'", output_format="list")
    assert len(ensembles) == 1
    assert ensembles[0].data.tags["mlflow.parentRunId"] == parent.run_id
    assert ensembles[0].data.tags["dialogsum.ensemble.sources"] == f"{strong},{weak}"


# --- generating candidates with the sources' models -------------------------------------------------------------


class TurnModel(mlflow.pyfunc.PythonModel):
    """Stands in for a trained model: summarises a dialogue by one of its turns."""

    def __init__(self, turn: int):
        self.turn = turn

    def predict(self, context, model_input, params=None):  # noqa: ARG002
        return [d.split("\n")[self.turn].split(": ", 1)[-1] for d in model_input["dialogue"]]


def log_model_source(name: str, turn: int, table_rows: list[Dialogue] | None = None) -> str:
    """A train-like run with a pyfunc under `model` (and, optionally, its predictions table on labelled rows)."""
    with tracked_run(run_name=name, kind="train", tags={MODEL_TAG: name}) as run:
        mlflow.pyfunc.log_model(name="model", python_model=TurnModel(turn), pip_requirements=[])
        if table_rows is not None:
            predictions = [r.dialogue.split("\n")[turn].split(": ", 1)[-1] for r in table_rows]
            scores = score_rows(predictions, [r.summary for r in table_rows])
            log_predictions([{"fname": r.fname, "dialogue": r.dialogue, "reference": r.summary, "prediction": p, **s}
                             for r, p, s in zip(table_rows, predictions, scores)])
            mlflow.log_metric("eval_final", aggregate(scores)["final"])
    return run.run_id


@pytest.fixture
def csv_files(module_store, shared):
    labelled = pd.read_csv(shared(LABELLED_CSV)).iloc[:30]
    unlabelled = pd.read_csv(shared(UNLABELLED_CSV)).iloc[:25]
    labelled.to_csv(module_store / "labelled.csv", index=False)
    unlabelled.to_csv(module_store / "unlabelled.csv", index=False)
    return module_store / "labelled.csv", module_store / "unlabelled.csv"


def test_data_csv_is_summarised_by_the_sources_models(experiment, rows, csv_files):
    labelled, unlabelled = csv_files
    first_a = log_model_source("first-turn-a", 0)
    first_b = log_model_source("first-turn-b", 0)
    last = log_model_source("last-turn", -1)
    no_model = log_source("table-only", rows[:5], first_turn)

    scored = mlflow.get_run(run_ensemble([last, first_a, first_b, no_model], "mbr", data_path=labelled))
    assert scored.data.metrics["win_share_first-turn-a"] == 1.0
    assert scored.data.metrics["n_sources"] == 3
    sources = mlflow.artifacts.load_dict(f"runs:/{scored.info.run_id}/ensemble/sources.json")
    assert sources["unusable"][0]["run_id"] == no_model and "no model logged" in sources["unusable"][0]["reason"]
    table = load_predictions(scored.info.run_id)
    assert list(table["prediction"]) == [first_turn(r) for r in read_dialogues(labelled).rows]
    assert "final" in table.columns

    unscored = mlflow.get_run(run_ensemble([last, first_a, first_b], "mbr", data_path=unlabelled))
    assert "eval_final" not in unscored.data.metrics and "oracle_eval_final" not in unscored.data.metrics
    table = load_predictions(unscored.info.run_id)
    assert len(table) == 25 and "reference" not in table.columns and "final" not in table.columns


def test_stacking_on_unlabelled_rows_trains_on_the_sources_tables(experiment, rows, csv_files):
    _, unlabelled = csv_files
    bare = [log_model_source("first-turn", 0), log_model_source("last-turn", -1)]
    before = runs_in_experiment()
    with pytest.raises(ValueError, match="trains its selector on the sources' labelled prediction tables"):
        run_ensemble(bare, "stacking", data_path=unlabelled)
    assert runs_in_experiment() == before

    with_tables = [log_model_source("first-turn", 0, rows[:40]), log_model_source("last-turn", -1, rows[:40])]
    run = mlflow.get_run(run_ensemble(with_tables, "stacking", data_path=unlabelled))
    assert "selector_oof_eval_final" in run.data.metrics and "eval_final" not in run.data.metrics
    assert run.data.params["ensemble.stacking.trained_on"] == "the sources' logged prediction tables"
    assert len(load_predictions(run.info.run_id)) == 25


# --- really trained tiny models --------------------------------------------------------------------------------


@pytest.mark.timeout(1800)  # three CPU trainings; minutes on a busy 2-core machine
def test_mbr_over_three_differently_trained_tiny_models(experiment, module_store, shared):
    """Three kobart-tiny models (random init, real KoBART tokenizer) trained with different seeds and learning
    rates on real labelled rows; prints each source's ROUGE, MBR's and the oracle's (no threshold: tiny
    random-init models)."""
    from dialogsum.train import train_model

    data = pd.read_csv(shared(LABELLED_CSV))
    data.iloc[:300].to_csv(module_store / "train.csv", index=False)
    data.iloc[300:].to_csv(module_store / "eval.csv", index=False)
    base = {"training.epochs": 1, "training.max_train_samples": 64, "training.max_eval_samples": 32,
            "tokenizer.path": str(shared(KOBART_TOKENIZER))}
    settings = [{"training.seed": 1}, {"training.seed": 2, "training.learning_rate": 3e-3},
                {"training.seed": 3, "training.learning_rate": 3e-4}]
    run_ids = [train_model("kobart-tiny", train_path=module_store / "train.csv", eval_path=module_store / "eval.csv",
                           overrides={**base, **s}) for s in settings]

    m = mlflow.get_run(run_ensemble(run_ids, "mbr")).data.metrics
    sources = {name: value for name, value in m.items() if name.startswith("source_")}
    print("\nKorean ROUGE eval_final on the same 32 labelled rows:")
    for name, value in sorted(sources.items()):
        print(f"  {name}: {value:.2f}")
    print(f"  mbr: {m['eval_final']:.2f}\n  oracle (upper bound, picks with the reference): {m['oracle_eval_final']:.2f}")
    assert len(sources) == 3 and m["n_rows"] == 32
    assert m["oracle_eval_final"] >= max(sources.values())
