"""The Model Registry: choose a candidate by validation, guard the champion with the test rows, keep history findable.

1. Candidates are succeeded runs of kind `train` that logged a model, so every score compared is a validation
   score of a training run, and only runs scored on the same validation rows (`dialogsum.val_rows_digest`) are
   ranked together; the others are listed as not comparable, with the reason. The best by the validation metric
   wins; ties go to the smaller model (fewer parameters, `model.total_params`), then to the run that finished
   first, then to the smaller run id. (`register --run` takes a given run, an `optimize` run's model too.)
2. The candidate's model becomes a version of the registered model. It is promoted to alias `champion` only when
   it beats the current champion on the test rows: both must have been tested on the same rows
   (`dialogsum.val_rows_digest`'s test twin), and the paired-bootstrap interval of candidate − champion test
   `final` must lie above 0 (`PROMOTION_RULE`). Otherwise it gets alias `challenger` and the reason. The test
   rows are the one fixed yardstick across runs, and this single comparison is their only part in a decision.
3. `--force` promotes anyway (and rolls back: `register --run <old run> --force`). The version that held
   `champion` keeps alias `previous`. After setting aliases the registry re-reads them and reports a concurrent
   change instead of hiding it.

Each version's tags and description hold its validation and test scores with their intervals, the data digests,
the source run, the git commit and the comparison with the champion.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from dialogsum.comparison import NotComparable, compare_logged, split_comparable
from dialogsum.tracking import KIND_TAG, MODEL_TAG, STATUS_TAG, TEST_ROWS_TAG, VAL_ROWS_TAG, run_metric, tracked_run

DEFAULT_MODEL_NAME = "dialogsum-ko"
DEFAULT_METRIC = "val_final"
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
PREVIOUS_ALIAS = "previous"
CANDIDATE_KINDS = ("train",)
TAGGED_METRICS = ("val_final", "val_rouge1", "val_rouge2", "val_rougeL", "val_loss", "val_final_ci95_low",
                  "val_final_ci95_high", "test_final", "test_final_ci95_low", "test_final_ci95_high")  # fmt: skip
DATA_CONTEXTS = ("training", "validation", "testing")
TIE_RULE = "higher metric, then fewer parameters, then earlier end time, then smaller run id"
PROMOTION_RULE = (
    "promoted to @champion when its test_final beats the champion's on the same test rows: the 95% paired-bootstrap "
    "interval of the difference lies above 0"
)
REGISTERED_MODEL_DESCRIPTION = (
    "Korean dialogue summarizer (dialogsum). Input: dialogues (`#Person1#: ...` turns); output: one Korean summary "
    "each. @champion is the version that beat the previous champion on the same test rows; @challenger the latest "
    "candidate that did not; @previous the champion before the current one. Each version's description says why."
)
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")


class RegistryError(RuntimeError):
    """No run can be registered (none qualifies, or the given run has no model), or the aliases changed under us."""


@dataclass
class Candidate:
    """A run whose logged model can be registered, with what ranks it."""

    run: Any
    model_uri: str
    score: float | None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def total_params(self) -> float:
        value = self.run.data.params.get("model.total_params")
        return float(value) if value else float("inf")

    def rank_key(self) -> tuple:
        """Sorting key: the best candidate sorts first (see TIE_RULE)."""
        return (self.score is None, -(self.score or 0.0), self.total_params, self.run.info.end_time or 0, self.run_id)


@dataclass
class Registration:
    """What a registration did: the version it registered and the alias it holds now, its source run and score, the
    comparison with the champion, the version now holding `previous`, how many candidates were compared and which
    runs were not comparable."""

    version: str
    run_id: str
    score: float | None
    alias: str
    reason: str
    previous_version: str | None
    candidates: int
    not_comparable: list[NotComparable] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION_ALIAS


def _experiment_ids(experiment: str | None) -> list[str] | None:
    """The named experiment's id as a search scope; None lets MLflow search the active experiment."""
    import mlflow

    if experiment is None:
        return None
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise RegistryError(f"experiment '{experiment}' does not exist")
    return [found.experiment_id]


def logged_models(experiment_ids: list[str] | None) -> dict[str, str]:
    """Source run id → URI of the latest READY model it logged."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    if experiment_ids is None:
        experiment_ids = [mlflow.tracking.fluent._get_experiment_id()]
    found = mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list")
    ready = sorted((m for m in found if m.status == LoggedModelStatus.READY), key=lambda m: m.creation_timestamp)
    return {m.source_run_id: m.model_uri for m in ready if m.source_run_id}


def _name(run) -> str:
    return run.data.tags.get(MODEL_TAG) or run.info.run_name or run.info.run_id[:8]


def find_candidates(
    metric: str, *, experiment: str | None = None, parent_run_id: str | None = None
) -> tuple[list[Candidate], list[NotComparable]]:
    """Succeeded train runs with a logged model, scored on the same validation rows, best first, and the runs left
    out: the children of `parent_run_id` (compared on the pipeline's own validation rows), or the runs of
    `experiment` (default the active experiment; compared on the rows most of them were scored on)."""
    import mlflow

    reference = None
    if parent_run_id:
        parent = mlflow.get_run(parent_run_id)
        experiment_ids, reference = [parent.info.experiment_id], parent.data.tags.get(VAL_ROWS_TAG)
        query = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{STATUS_TAG}` = 'succeeded'"
    else:
        experiment_ids = _experiment_ids(experiment)
        query = f"tags.`{STATUS_TAG}` = 'succeeded'"
    runs = mlflow.search_runs(experiment_ids=experiment_ids, filter_string=query, output_format="list")
    models = logged_models(experiment_ids)
    eligible = [r for r in runs if r.data.tags.get(KIND_TAG) in CANDIDATE_KINDS and r.info.run_id in models]
    comparable, left_out, _ = split_comparable(eligible, VAL_ROWS_TAG, lambda r: run_metric(r, metric), _name, reference)
    candidates = [Candidate(r, models[r.info.run_id], run_metric(r, metric)) for r in comparable]
    return sorted(candidates, key=Candidate.rank_key), left_out


def candidate_of_run(run_id: str, metric: str) -> Candidate:
    """The given run as a candidate; raises RegistryError when it logged no model."""
    import mlflow

    run = mlflow.get_run(run_id)
    model_uri = logged_models([run.info.experiment_id]).get(run_id)
    if model_uri is None:
        raise RegistryError(f"run {run_id} logged no READY model; nothing to register")
    return Candidate(run, model_uri, run_metric(run, metric))


def data_digests(run) -> dict[str, str]:
    """The data a run used: its `data.<context>.file_digest` params and its validation/test rows digests."""
    params, tags = run.data.params, run.data.tags
    digests = {f"data.{c}.file_digest": params[f"data.{c}.file_digest"] for c in DATA_CONTEXTS if f"data.{c}.file_digest" in params}
    digests.update({tag: tags[tag] for tag in (VAL_ROWS_TAG, TEST_ROWS_TAG) if tag in tags})
    return digests


def version_tags(candidate: Candidate, metric: str) -> dict[str, str]:
    """Where a registered version came from: source run, kind, model, metrics, data digests, git commit."""
    run = candidate.run
    tags = {
        "source_run_id": candidate.run_id,
        "source_experiment_id": run.info.experiment_id,
        KIND_TAG: run.data.tags.get(KIND_TAG, ""),
        MODEL_TAG: run.data.tags.get(MODEL_TAG, ""),
        "git_commit": run.data.tags.get("mlflow.source.git.commit", "unknown"),
        "selection_metric": metric,
        **data_digests(run),
    }
    for name in dict.fromkeys((metric, *TAGGED_METRICS)):
        value = run_metric(run, name)
        if value is not None:
            tags[f"metric.{name}"] = f"{value:.6g}"
    if "model.total_params" in run.data.params:
        tags["model.total_params"] = run.data.params["model.total_params"]
    return tags


def _existing_version(client, name: str, candidate: Candidate):
    """The version already registered from this candidate's model, if any."""
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{candidate.run_id}'"):
        if version.source == candidate.model_uri:
            return version
    return None


def _score_text(run, prefix: str) -> str:
    value, low, high = (run_metric(run, f"{prefix}_final{s}") for s in ("", "_ci95_low", "_ci95_high"))
    if value is None:
        return f"no {prefix}_final"
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
    return f"{prefix}_final {value:.2f}{interval}"


def register_candidate(candidate: Candidate, metric: str, name: str) -> str:
    """Register the candidate's model (once: a model registered before is reused) and tag it; returns the version.
    The registered model gets its description when it is created."""
    import mlflow

    client = mlflow.MlflowClient()
    version = _existing_version(client, name, candidate)
    tags = version_tags(candidate, metric)
    if version is None:
        version = mlflow.register_model(candidate.model_uri, name, tags=tags)
    else:
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    return str(version.version)


def _aliases(client, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def _set_aliases(client, name: str, wanted: dict[str, str]) -> None:
    """Set aliases, then re-read them: another writer that moved one in between is reported, not overwritten silently."""
    for alias, version in wanted.items():
        client.set_registered_model_alias(name, alias, version)
    now = _aliases(client, name)
    moved = {alias: now.get(alias) for alias, version in wanted.items() if now.get(alias) != version}
    if moved:
        raise RegistryError(f"registered model '{name}' changed while registering: expected {wanted}, now {moved} "
                            "(another register ran at the same time); re-run `dialogsum register` to decide again")  # fmt: skip


def decide(candidate: Candidate, version: str, name: str, force: bool) -> tuple[str, str, str | None]:
    """Promote or not: (alias given to `version`, the reason, the version that holds `previous` afterwards)."""
    import mlflow

    client = mlflow.MlflowClient()
    before = _aliases(client, name)
    current = before.get(CHAMPION_ALIAS)
    if current == version:
        return CHAMPION_ALIAS, "already the champion", before.get(PREVIOUS_ALIAS)
    if current is None:
        reason = "the first champion of this registered model"
    elif force:
        reason = f"promoted with --force over version {current}"
    else:
        champion_run = mlflow.get_run(client.get_model_version(name, current).run_id)
        comparison, why_not = compare_logged(candidate.run, f"version {version} ({_name(candidate.run)})",
                                             champion_run, f"champion version {current} ({_name(champion_run)})")  # fmt: skip
        if comparison is None:
            reason = f"not promoted: cannot be compared with champion version {current}: {why_not}"
        else:
            verdict = "promoted" if comparison.a_wins else "not promoted"
            reason = f"{verdict}: {comparison.sentence()} (test_final, paired bootstrap over the same test rows)"
        if comparison is None or not comparison.a_wins:
            _set_aliases(client, name, {CHALLENGER_ALIAS: version})
            return CHALLENGER_ALIAS, reason, before.get(PREVIOUS_ALIAS)
    wanted = {CHAMPION_ALIAS: version, **({PREVIOUS_ALIAS: current} if current else {})}
    if before.get(CHALLENGER_ALIAS) == version:
        client.delete_registered_model_alias(name, CHALLENGER_ALIAS)
    _set_aliases(client, name, wanted)
    return CHAMPION_ALIAS, reason, current or before.get(PREVIOUS_ALIAS)


def _describe_version(name: str, version: str, candidate: Candidate, metric: str, alias: str, reason: str) -> None:
    import mlflow

    run = candidate.run
    text = (f"{_name(run)} from run {candidate.run_id} ({run.data.tags.get(KIND_TAG, '')}); chosen by {metric}: "
            f"{_score_text(run, 'val')}; reported: {_score_text(run, 'test')}. @{alias}: {reason}.")  # fmt: skip
    client = mlflow.MlflowClient()
    client.update_model_version(name, version, description=text)
    client.set_model_version_tag(name, version, "dialogsum.registry_decision", f"@{alias}: {reason}"[:5000])


def choose(
    metric: str, *, experiment: str | None = None, parent_run_id: str | None = None, run_id: str | None = None
) -> tuple[Candidate, int, list[NotComparable]]:
    """The run to register (`run_id`, or the best comparable candidate), how many were compared, and the runs left out."""
    if run_id:
        return candidate_of_run(run_id, metric), 1, []
    candidates, left_out = find_candidates(metric, experiment=experiment, parent_run_id=parent_run_id)
    if parent_run_id:
        scope = f"the children of run {parent_run_id}"
    elif experiment:
        scope = f"the runs of experiment '{experiment}'"
    else:
        scope = "the runs of the active experiment (choose one with --experiment or $MLFLOW_EXPERIMENT_NAME)"
    if not candidates:
        extra = "".join(f"\n  {n.line()}" for n in left_out)
        raise RegistryError(f"no succeeded train run with a logged model among {scope}{extra}")
    if candidates[0].score is None:
        raise RegistryError(f"no candidate among {scope} has metric '{metric}'")
    return candidates[0], len(candidates), left_out


def register(
    *,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    metric: str = DEFAULT_METRIC,
    name: str = DEFAULT_MODEL_NAME,
    force: bool = False,
) -> Registration:
    """Choose, register, and promote to `name@champion` or mark `name@challenger` (see the module docstring)."""
    candidate, compared, left_out = choose(metric, experiment=experiment, parent_run_id=parent_run_id, run_id=run_id)
    version = register_candidate(candidate, metric, name)
    alias, reason, previous = decide(candidate, version, name, force)
    _describe_version(name, version, candidate, metric, alias, reason)
    return Registration(version, candidate.run_id, candidate.score, alias, reason, previous, compared, left_out)


def run_register(
    *,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    metric: str = DEFAULT_METRIC,
    name: str = DEFAULT_MODEL_NAME,
    force: bool = False,
) -> Registration:
    """`dialogsum register`: the registration, recorded as a run of kind `register` in the experiment it chose
    from (a child of the parent; the run in $MLFLOW_RUN_ID when a pipeline or `mlflow run` started one)."""
    import mlflow

    if not os.environ.get("MLFLOW_RUN_ID") and (parent_run_id or experiment):
        scope = mlflow.get_run(parent_run_id).info.experiment_id if parent_run_id else _experiment_ids(experiment)[0]
        mlflow.set_experiment(experiment_id=scope)
    with tracked_run(run_name="register", kind="register", parent_run_id=parent_run_id) as run:
        mlflow.log_params({"registry.name": name, "registry.metric": metric, "registry.tie_rule": TIE_RULE,
                           "registry.promotion_rule": PROMOTION_RULE, "registry.force": force})  # fmt: skip
        with run.stage_of("register"):
            registration = register(experiment=experiment, parent_run_id=parent_run_id, run_id=run_id, metric=metric,
                                    name=name, force=force)  # fmt: skip
        mlflow.log_params({"registry.version": registration.version, "registry.source_run_id": registration.run_id,
                           "registry.candidates": registration.candidates, "registry.alias": registration.alias})  # fmt: skip
        mlflow.set_tags({"dialogsum.registered": f"models:/{name}/{registration.version}",
                         "dialogsum.registry_decision": registration.reason[:5000]})  # fmt: skip
        if registration.not_comparable:
            mlflow.log_dict({"not_comparable": [n.__dict__ for n in registration.not_comparable]}, "registry/not_comparable.json")
    return registration


def resolve_model_uri(model_uri: str) -> tuple[str, dict[str, str]]:
    """A `models:/name@alias` URI pinned to the version the alias points at now (aliases move), with that
    version's name, number and source run; any other URI is returned as it is."""
    import mlflow

    match = _ALIAS_URI.match(model_uri)
    if match is None:
        return model_uri, {}
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(match["name"], match["alias"])
    except mlflow.exceptions.MlflowException as e:
        missing = f"no version of '{match['name']}' has alias '{match['alias']}'"
        raise RegistryError(f"{model_uri}: {missing} ({e.message})") from e
    pinned = f"models:/{version.name}/{version.version}"
    return pinned, {"model.registered_name": version.name, "model.version": str(version.version),
                    "model.source_run_id": version.run_id or ""}  # fmt: skip
