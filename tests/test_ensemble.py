"""Ensembles of summaries: MBR, weighted MBR and stacking on hand-made candidate sets (where the right pick is
known) and on prediction tables logged by real runs in a temporary MLflow store, built from real rows of the
bundled Korean sample data.

Source "models" here are deterministic transformations of real rows, named for what they are: `reference`
(the reference itself, standing in for a perfect model), `truncated` (the first half of the reference's words,
a close model), `first_turn` / `last_turn` (a dialogue turn, an extractive baseline). The pyfunc models logged
in the `--data` tests stand in for trained models. Only the last test trains real (tiny, random-init) models.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from sklearn.base import BaseEstimator, RegressorMixin
from typer.testing import CliRunner

from dialogsum.cli import app
from dialogsum.data import Dialogue, read_dialogues, sample_data_path
from dialogsum.data import dataset_rows_digest
from dialogsum.ensemble import (
    DATA_PREDICTIONS_ARTIFACT,
    CandidateSet,
    NotEnoughSources,
    PairwiseRouge,
    Source,
    Strategy,
    build_frame,
    out_of_fold_predictions,
    run_ensemble,
    source_runs_of_parent,
    source_weights,
    top_k_source_runs,
)
from dialogsum.metrics import aggregate, score_rows
from dialogsum.tracking import (
    MODEL_TAG,
    TEST_PREDICTIONS_ARTIFACT,
    TEST_ROWS_TAG,
    VAL_ROWS_TAG,
    configure_tracking,
    create_child_run,
    load_predictions,
    log_predictions,
    tracked_run,
)



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
def rows() -> list[Dialogue]:
    """The bundled sample's 64 labelled training rows, used as validation rows of logged tables (nothing trains)."""
    return read_dialogues(sample_data_path("train")).rows


@pytest.fixture(scope="module")
def tested_rows() -> list[Dialogue]:
    """The bundled sample's 20 labelled dev rows, used as the test rows of logged tables."""
    return read_dialogues(sample_data_path("dev")).rows


def _scored_table(rows: list[Dialogue], transform, errors=None) -> tuple[list[dict], float]:
    predictions = [transform(r) for r in rows]
    scores = score_rows(predictions, [r.summary for r in rows])
    table = [{"fname": r.fname, "dialogue": r.dialogue, "reference": r.summary, "prediction": p, **s}
             for r, p, s in zip(rows, predictions, scores)]  # fmt: skip
    if errors is not None:
        for row, error in zip(table, errors):
            row["error"] = error
    return table, aggregate(scores)["final"]


def _digest(rows: list[Dialogue]) -> str:
    from dialogsum.data import rows_digest

    return rows_digest([r.fname for r in rows], [r.summary for r in rows])


def log_source(name: str, rows: list[Dialogue], transform, *, test_rows: list[Dialogue] | None = None, kind: str = "train",
               errors=None, parent=None) -> str:  # fmt: skip
    """A run like `train` logs: the validation predictions table of `transform` on `rows` with val_final and the
    rows' digest, and (with `test_rows`) the test table with test_final."""
    table, final = _scored_table(rows, transform, errors)
    tags = {MODEL_TAG: name, VAL_ROWS_TAG: _digest(rows), **({TEST_ROWS_TAG: _digest(test_rows)} if test_rows else {})}
    with tracked_run(run_name=name, kind=kind, tags=tags, parent_run_id=parent) as run:
        log_predictions(table)
        mlflow.log_metric("val_final", final)
        if test_rows:
            test_table, test_final = _scored_table(test_rows, transform)
            log_predictions(test_table, TEST_PREDICTIONS_ARTIFACT)
            mlflow.log_metric("test_final", test_final)
    return run.run_id


def runs_in_experiment() -> int:
    return len(mlflow.search_runs(output_format="list"))


def hand_made(texts_per_row: list[list[str]], scores: list[float]) -> tuple[CandidateSet, list[Source]]:
    """A candidate set of hand-written texts (no MLflow): one source per column, with the given scores."""
    n = len(texts_per_row)
    candidates = CandidateSet([f"d{i}" for i in range(n)], ["#Person1#: 안녕하세요.\n#Person2#: 네."] * n, None, texts_per_row)
    sources = [Source(SimpleNamespace(info=SimpleNamespace(run_id=f"run{i}")), f"model{i}", "train", s, label=f"model{i}")
               for i, s in enumerate(scores)]  # fmt: skip
    return candidates, sources


def picked_sources(candidates: CandidateSet, sources: list[Source], strategy: str, temperature: float = 2.0) -> list[int]:
    weights = source_weights(sources, temperature)
    frame = build_frame(candidates, sources, PairwiseRouge(), weights)
    picks = Strategy(strategy, sources, weights, temperature, 5).choose(frame).picks
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
    candidates, sources = hand_made(texts, [40.0, 40.0, 30.0, 30.0])
    assert picked_sources(candidates, sources, "mbr") == [2]
    assert picked_sources(candidates, sources, "weighted_mbr") in ([0], [1])
    assert picked_sources(candidates, sources, "weighted_mbr", temperature=1000.0) == [2], "a flat softmax is plain MBR"


def test_weights_are_a_softmax_over_validation_scores_with_the_stated_temperature():
    _, sources = hand_made([[AGREE, AGREE, AGREE]], [30.0, 28.0, 20.0])
    weights = source_weights(sources, 2.0)
    expected = np.exp(np.array([0.0, -1.0, -5.0]))
    assert weights == pytest.approx(expected / expected.sum())
    assert source_weights(sources, 1e6) == pytest.approx([1 / 3] * 3, rel=1e-4)
    with pytest.raises(ValueError, match="temperature must be positive"):
        source_weights(sources, 0.0)


def test_a_lone_candidate_is_chosen_and_missing_ones_are_skipped():
    candidates, sources = hand_made([[None, OUTLIER, None], [AGREE, AGREE, OUTLIER]], [1.0, 1.0, 1.0])
    frame = build_frame(candidates, sources, PairwiseRouge(), source_weights(sources))
    assert list(frame.loc[frame["row"] == 0, "n_candidates"]) == [1]
    assert picked_sources(candidates, sources, "mbr") == [1, 0]


class GroupRecordingRegressor(BaseEstimator, RegressorMixin):
    """Remembers the dialogue ids (feature 0) it was fitted on and refuses to predict any of them."""

    def fit(self, features, target):
        self.seen_ = set(features[:, 0])
        self.mean_ = float(np.mean(target))
        return self

    def predict(self, features):
        leaked = self.seen_ & set(features[:, 0])
        assert not leaked, f"predicted dialogues the model trained on: {sorted(leaked)}"
        return np.full(len(features), self.mean_)


def test_stacking_predictions_are_out_of_fold(monkeypatch):
    monkeypatch.setattr("dialogsum.ensemble.new_selector", GroupRecordingRegressor)
    groups = np.repeat(np.arange(12), 3)
    features = np.column_stack([groups, np.random.default_rng(0).normal(size=len(groups))])
    predictions, folds = out_of_fold_predictions(features, np.arange(len(groups), dtype=float), groups, 5)
    assert folds == 5 and predictions.shape == groups.shape


def test_stacking_needs_two_labelled_dialogues():
    with pytest.raises(ValueError, match="at least two labelled dialogues"):
        out_of_fold_predictions(np.zeros((3, 1)), np.zeros(3), np.zeros(3), 5)


# --- prediction tables of real runs ---------------------------------------------------------------------------


def test_mbr_on_real_tables_picks_the_candidate_two_runs_agree_on(experiment, rows, tested_rows):
    data = rows[:60]
    baseline = log_source("first_turn", data, first_turn, test_rows=tested_rows)
    agree_a = log_source("truncated-a", data, truncated, test_rows=tested_rows)
    agree_b = log_source("truncated-b", data, truncated, test_rows=tested_rows)

    run_id = run_ensemble([baseline, agree_a, agree_b], "mbr")

    run = mlflow.get_run(run_id)
    m = run.data.metrics
    assert m["win_share_truncated-a"] == 1.0  # identical candidates agree fully; ties go to the earlier source
    assert m["win_share_first_turn"] == 0.0 and m["win_share_truncated-b"] == 0.0
    for prefix, rows_ in (("val", data), ("test", tested_rows)):
        assert m[f"{prefix}_final"] == pytest.approx(m[f"source_truncated-a_{prefix}_final"])
        assert m[f"{prefix}_rows"] == len(rows_)
        per_source = [score_rows([how(r) for r in rows_], [r.summary for r in rows_]) for how in (first_turn, truncated)]
        oracle = np.mean([max(a["final"], b["final"]) for a, b in zip(*per_source)])
        assert m[f"oracle_{prefix}_final"] == pytest.approx(oracle), "the oracle takes each row's best candidate"
        assert m[f"{prefix}_diff_vs_best_source"] == pytest.approx(0.0), "it picked the best source's own summaries"
        assert m[f"{prefix}_final_ci95_low"] < m[f"{prefix}_final"] < m[f"{prefix}_final_ci95_high"]
    tags = run.data.tags
    assert tags["dialogsum.kind"] == "ensemble" and tags["dialogsum.status"] == "succeeded"
    assert tags[VAL_ROWS_TAG] == _digest(data) and tags[TEST_ROWS_TAG] == _digest(tested_rows)
    assert tags["dialogsum.ensemble.strategy"] == "mbr"
    assert tags["dialogsum.ensemble.sources"] == ",".join([baseline, agree_a, agree_b])
    assert "Oracle" in tags["mlflow.note.content"]
    sources = mlflow.artifacts.load_dict(f"runs:/{run_id}/ensemble/sources.json")
    assert [s["model"] for s in sources["sources"]] == ["first_turn", "truncated-a", "truncated-b"]
    assert all(isinstance(s["score"], float) for s in sources["sources"])
    summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/ensemble/summary.json")
    assert "UPPER BOUND" in summary["oracle_val"]["note"]
    table = load_predictions(run_id)
    assert list(table["fname"]) == [r.fname for r in data]
    assert list(table["prediction"]) == [truncated(r) for r in data]
    assert {"reference", "rouge1", "rouge2", "rougeL", "final", "source", "oracle_final"} <= set(table.columns)
    assert list(load_predictions(run_id, TEST_PREDICTIONS_ARTIFACT)["fname"]) == [r.fname for r in tested_rows]
    assert run.data.params["ensemble.strategy"] == "mbr"


def test_weighted_mbr_on_real_tables_sides_with_the_better_runs(experiment, rows, tested_rows):
    data = rows[:60]
    run_ids = [
        log_source("reference", data, reference, test_rows=tested_rows),
        log_source("truncated", data, truncated, test_rows=tested_rows),
        log_source("first_turn-a", data, first_turn, test_rows=tested_rows),
        log_source("first_turn-b", data, first_turn, test_rows=tested_rows),
    ]
    plain = mlflow.get_run(run_ensemble(run_ids, "mbr")).data.metrics
    weighted = mlflow.get_run(run_ensemble(run_ids, "weighted_mbr"))
    m = weighted.data.metrics
    assert plain["win_share_first_turn-a"] > 0.5  # two identical weak candidates out-vote two different strong ones
    assert m["win_share_reference"] + m["win_share_truncated"] > 0.9
    assert m["val_final"] > plain["val_final"] + 20 and m["test_final"] > plain["test_final"] + 20
    assert weighted.data.params["ensemble.weighted_mbr.temperature"] == "2.0"
    assert plain["val_diff_vs_best_source_ci95_high"] < 0, "plain MBR is distinguishably worse than its best source"


def test_stacking_learns_the_best_source_on_validation_and_picks_on_the_test_rows(experiment, rows, tested_rows):
    run_ids = [log_source(name, rows, how, test_rows=tested_rows) for name, how in
               (("first_turn", first_turn), ("reference", reference), ("truncated", truncated), ("last_turn", last_turn))]

    run_id = run_ensemble(run_ids, "stacking", folds=5)

    run = mlflow.get_run(run_id)
    m = run.data.metrics
    assert m["win_share_reference"] > 0.9
    assert m["val_final"] > m["source_truncated_val_final"]
    assert m["test_final"] == pytest.approx(100.0), "the selector fit on validation rows picks the reference on every test row"
    assert run.data.params["ensemble.stacking.validation_scored"] == "out-of-fold (cross_val_predict, GroupKFold by dialogue)"
    assert run.data.params["ensemble.stacking.folds"] == "5"
    assert "source=reference" in run.data.params["ensemble.stacking.features"]
    summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/ensemble/summary.json")
    assert summary["strategy_params"]["trained_on"] == "the sources' validation prediction tables"


def test_sources_scored_on_other_rows_are_not_comparable(experiment, rows):
    ok_a = log_source("first_turn", rows[:20], first_turn)
    ok_b = log_source("truncated", rows[:20], truncated)
    other = log_source("reference", rows[20:40], reference)
    with tracked_run(run_name="mislabelled", kind="train", tags={MODEL_TAG: "mislabelled", VAL_ROWS_TAG: _digest(rows[:20])}):
        log_predictions(_scored_table(rows[:19], truncated)[0])  # a table that is not the rows its tag names
        mlflow.log_metric("val_final", 1.0)
    mislabelled = mlflow.last_active_run().info.run_id
    run = mlflow.get_run(run_ensemble([ok_a, ok_b, other, mislabelled], "mbr"))
    assert run.data.tags["dialogsum.ensemble.sources"] == f"{ok_a},{ok_b}"
    unusable = {u["run_id"]: u["reason"] for u in mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/ensemble/sources.json")["unusable"]}
    assert set(unusable) == {other, mislabelled} and "scored on other rows" in unusable[other]
    assert "does not hold the rows its dialogsum.val_rows_digest names" in unusable[mislabelled]
    assert run.data.tags["dialogsum.ensemble.test"].startswith("not scored: no test predictions")
    ids, left_out = top_k_source_runs(5)
    assert set(ids) == {ok_a, ok_b, mislabelled} and [n.run_id for n in left_out] == [other]


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
    assert f"{all_failed}: its predictions.json has no usable row" in message
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


def test_weighted_mbr_needs_every_source_score(experiment, rows):
    data = rows[:5]
    scored = log_source("first_turn", data, first_turn)
    with tracked_run(run_name="unscored", kind="train", tags={MODEL_TAG: "unscored", VAL_ROWS_TAG: _digest(data)}) as run:
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
    assert top_k_source_runs(2)[0][0] == strong
    assert len(top_k_source_runs(5)[0]) == 3

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
        return [r["dialogue"].split("\n")[self.turn].split(": ", 1)[-1] for r in model_input]  # records, as dialogsum passes them


def log_model_source(name: str, turn: int, table_rows: list[Dialogue]) -> str:
    """A train-like run with a pyfunc named after it and its validation predictions table on labelled rows."""
    with tracked_run(run_name=name, kind="train", tags={MODEL_TAG: name, VAL_ROWS_TAG: _digest(table_rows)}) as run:
        mlflow.pyfunc.log_model(name=name, python_model=TurnModel(turn), pip_requirements=[])
        table, final = _scored_table(table_rows, lambda r: r.dialogue.split("\n")[turn].split(": ", 1)[-1])
        log_predictions(table)
        mlflow.log_metric("val_final", final)
    return run.run_id


@pytest.fixture
def csv_files():
    return sample_data_path("dev"), sample_data_path("test")


def test_data_csv_is_summarised_by_the_sources_models(experiment, rows, csv_files):
    labelled, unlabelled = csv_files
    first_a = log_model_source("first-turn-a", 0, rows[:10])
    first_b = log_model_source("first-turn-b", 0, rows[:10])
    last = log_model_source("last-turn", -1, rows[:10])
    no_model = log_source("table-only", rows[:10], first_turn)

    scored = mlflow.get_run(run_ensemble([last, first_a, first_b, no_model], "mbr", data_path=labelled))
    assert scored.data.metrics["n_sources"] == 3
    sources = mlflow.artifacts.load_dict(f"runs:/{scored.info.run_id}/ensemble/sources.json")
    assert sources["unusable"][0]["run_id"] == no_model and "logged no READY model" in sources["unusable"][0]["reason"]
    table = load_predictions(scored.info.run_id, TEST_PREDICTIONS_ARTIFACT)
    labelled_rows = read_dialogues(labelled)
    assert list(table["prediction"]) == [first_turn(r) for r in labelled_rows.rows]
    assert "test_final" in scored.data.metrics, "a labelled --data file is scored as the test rows"
    assert scored.data.tags[TEST_ROWS_TAG] == dataset_rows_digest(labelled_rows)

    unscored = mlflow.get_run(run_ensemble([last, first_a, first_b], "mbr", data_path=unlabelled))
    assert "test_final" not in unscored.data.metrics and "val_final" in unscored.data.metrics
    table = load_predictions(unscored.info.run_id, DATA_PREDICTIONS_ARTIFACT)
    assert len(table) == 20 and "reference" not in table.columns and "final" not in table.columns


def test_stacking_on_unlabelled_rows_trains_on_the_sources_validation_tables(experiment, rows, csv_files):
    _, unlabelled = csv_files
    sources = [log_model_source("first-turn", 0, rows[:40]), log_model_source("last-turn", -1, rows[:40])]
    run = mlflow.get_run(run_ensemble(sources, "stacking", data_path=unlabelled))
    assert "val_final" in run.data.metrics and "test_final" not in run.data.metrics
    assert run.data.params["ensemble.stacking.trained_on"] == "the sources' validation prediction tables"
    assert len(load_predictions(run.info.run_id, DATA_PREDICTIONS_ARTIFACT)) == 20


# --- really trained tiny models --------------------------------------------------------------------------------


@pytest.mark.timeout(1800)  # three CPU trainings; minutes on a busy 2-core machine
def test_mbr_over_three_differently_trained_tiny_models(experiment):
    """Three kobart-tiny models (random init, a tokenizer trained from the sample) trained with different seeds and
    learning rates on the sample's training rows, validated on rows held out of them and tested on its dev rows;
    prints each source's validation and test ROUGE, MBR's and the oracle's (no threshold: tiny random-init models)."""
    from dialogsum.training.recipe import train_model

    base = {"training.epochs": 1, "generation.max_new_tokens": 16}
    settings = [{"training.seed": 1}, {"training.seed": 2, "training.learning_rate": 3e-3},
                {"training.seed": 3, "training.learning_rate": 3e-4}]
    run_ids = [train_model("kobart-tiny", overrides={**base, **s}) for s in settings]

    m = mlflow.get_run(run_ensemble(run_ids, "mbr")).data.metrics
    print("\nKorean ROUGE final (validation rows | test rows):")
    for run_id in run_ids:
        run = mlflow.get_run(run_id)
        label = f"kobart-tiny-{run_id[:8]}"
        print(f"  {label}: {m[f'source_{label}_val_final']:.2f} | {m[f'source_{label}_test_final']:.2f}")
        assert m[f"source_{label}_val_final"] == pytest.approx(run.data.metrics["best_val_final"]), "the same rows, the same scores"
        assert m[f"source_{label}_test_final"] == pytest.approx(run.data.metrics["test_final"])
    print(f"  mbr: {m['val_final']:.2f} | {m['test_final']:.2f}\n"
          f"  oracle (upper bound, picks with the reference): {m['oracle_val_final']:.2f} | {m['oracle_test_final']:.2f}")  # fmt: skip
    assert m["test_rows"] == 20
