"""The Model Registry: choose the champion among tracked runs, register its model, keep the previous one findable.

Candidates are succeeded runs of kind `train` that logged a pyfunc `model`, so every score compared is a
validation score of a training run. An `optimize` run's model is registered by its run id (`register --run`):
its ROUGE is measured on the optimize rows, which are not the rows the training runs were evaluated on. The
best candidate by a validation metric wins; ties go to the smaller model (fewer parameters,
`model.total_params`), then to the run that finished first, then to the smaller run id. The winner's model
becomes a version of the registered model with alias `champion`; the version that held `champion` before keeps
alias `previous`. Each version is tagged with its metrics, source run, data digests and git commit, so
`models:/dialogsum-ko@champion` always says where it came from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from dialogsum.serving import MODEL_ARTIFACT_PATH
from dialogsum.tracking import KIND_TAG, MODEL_TAG, STATUS_TAG, run_metric, tracked_run

DEFAULT_MODEL_NAME = "dialogsum-ko"
CHAMPION_ALIAS = "champion"
PREVIOUS_ALIAS = "previous"
CANDIDATE_KINDS = ("train",)
TAGGED_METRICS = ("eval_final", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_loss")
DATA_CONTEXTS = ("training", "evaluation")
TIE_RULE = "higher metric, then fewer parameters, then earlier end time, then smaller run id"
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")


class RegistryError(RuntimeError):
    """No run can be registered (none qualifies, or the given run has no model)."""


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
    """What a registration did: the version now holding `champion`, its source run and score, the version now
    holding `previous`, and how many candidates were compared."""

    version: str
    run_id: str
    score: float | None
    previous_version: str | None
    candidates: int


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
    """Source run id → URI of the READY pyfunc `model` it logged (the latest one when a run logged several)."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    found = mlflow.search_logged_models(
        experiment_ids=experiment_ids, filter_string=f"name = '{MODEL_ARTIFACT_PATH}'", output_format="list"
    )
    ready = sorted((m for m in found if m.status == LoggedModelStatus.READY), key=lambda m: m.creation_timestamp)
    return {m.source_run_id: m.model_uri for m in ready if m.source_run_id}


def find_candidates(metric: str, *, experiment: str | None = None, parent_run_id: str | None = None) -> list[Candidate]:
    """Succeeded train runs with a logged model, best first: the children of `parent_run_id`, or the
    runs of `experiment` (default: the active experiment)."""
    import mlflow

    if parent_run_id:
        experiment_ids = [mlflow.get_run(parent_run_id).info.experiment_id]
        query = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{STATUS_TAG}` = 'succeeded'"
    else:
        experiment_ids = _experiment_ids(experiment)
        query = f"tags.`{STATUS_TAG}` = 'succeeded'"
    runs = mlflow.search_runs(experiment_ids=experiment_ids, filter_string=query, output_format="list")
    models = logged_models(experiment_ids)
    candidates = [
        Candidate(run, models[run.info.run_id], run_metric(run, metric))
        for run in runs
        if run.data.tags.get(KIND_TAG) in CANDIDATE_KINDS and run.info.run_id in models
    ]
    return sorted(candidates, key=Candidate.rank_key)


def candidate_of_run(run_id: str, metric: str) -> Candidate:
    """The given run as a candidate; raises RegistryError when it logged no model."""
    import mlflow

    run = mlflow.get_run(run_id)
    model_uri = logged_models([run.info.experiment_id]).get(run_id)
    if model_uri is None:
        raise RegistryError(f"run {run_id} logged no READY '{MODEL_ARTIFACT_PATH}' model; nothing to register")
    return Candidate(run, model_uri, run_metric(run, metric))


def data_digests(run) -> dict[str, str]:
    """The training/evaluation data digests of a run: its `data.<context>.file_digest` params, else the digests
    of its logged dataset inputs."""
    params = run.data.params
    digests = {
        f"data.{context}.file_digest": params[f"data.{context}.file_digest"]
        for context in DATA_CONTEXTS
        if f"data.{context}.file_digest" in params
    }
    if digests:
        return digests
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in dataset_input.tags if t.key == "mlflow.data.context"), "dataset")
        digests[f"data.{context}.digest"] = dataset_input.dataset.digest
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


def register_candidate(candidate: Candidate, metric: str, name: str) -> str:
    """Register the candidate's model (once: a model registered before is reused) and tag it; returns the version."""
    import mlflow

    client = mlflow.MlflowClient()
    version = _existing_version(client, name, candidate)
    tags = version_tags(candidate, metric)
    if version is None:
        version = mlflow.register_model(candidate.model_uri, name, tags=tags)
    else:
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
    score = "no score" if candidate.score is None else f"{metric}={candidate.score:.4g}"
    description = f"{tags[MODEL_TAG] or 'model'} from run {candidate.run_id} ({tags[KIND_TAG]}), {score}"
    client.update_model_version(name, version.version, description=description)
    return str(version.version)


def promote(name: str, version: str) -> str | None:
    """Give `version` alias `champion`; the version that held it keeps alias `previous`. Returns the version
    that holds `previous` afterwards."""
    import mlflow

    client = mlflow.MlflowClient()
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    current = aliases.get(CHAMPION_ALIAS)
    if current == version:
        return aliases.get(PREVIOUS_ALIAS)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, current)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return current


def choose(
    metric: str, *, experiment: str | None = None, parent_run_id: str | None = None, run_id: str | None = None
) -> tuple[Candidate, int]:
    """The run to register (`run_id`, or the best candidate) and how many candidates were compared."""
    if run_id:
        return candidate_of_run(run_id, metric), 1
    candidates = find_candidates(metric, experiment=experiment, parent_run_id=parent_run_id)
    if parent_run_id:
        scope = f"the children of run {parent_run_id}"
    elif experiment:
        scope = f"the runs of experiment '{experiment}'"
    else:
        scope = "the runs of the active experiment (choose one with --experiment or $MLFLOW_EXPERIMENT_NAME)"
    if not candidates:
        raise RegistryError(f"no succeeded train run with a logged model among {scope}")
    if candidates[0].score is None:
        raise RegistryError(f"no candidate among {scope} has metric '{metric}'")
    return candidates[0], len(candidates)


def register_best(
    *,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    metric: str = "eval_final",
    name: str = DEFAULT_MODEL_NAME,
) -> tuple[str, str]:
    """Register the best (or the given) run's model as `name@champion`; returns (version, source run id)."""
    registration = _register(metric, name, experiment=experiment, parent_run_id=parent_run_id, run_id=run_id)
    return registration.version, registration.run_id


def _register(metric: str, name: str, **scope) -> Registration:
    candidate, compared = choose(metric, **scope)
    version = register_candidate(candidate, metric, name)
    previous = promote(name, version)
    return Registration(version, candidate.run_id, candidate.score, previous, compared)


def run_register(
    *,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    metric: str = "eval_final",
    name: str = DEFAULT_MODEL_NAME,
) -> Registration:
    """`dialogsum register`: the registration, recorded as a run of kind `register` in the experiment it chose
    from (a child of the parent; the run in $MLFLOW_RUN_ID when a pipeline or `mlflow run` started one)."""
    import mlflow

    if not os.environ.get("MLFLOW_RUN_ID") and (parent_run_id or experiment):
        scope = mlflow.get_run(parent_run_id).info.experiment_id if parent_run_id else _experiment_ids(experiment)[0]
        mlflow.set_experiment(experiment_id=scope)
    with tracked_run(run_name="register", kind="register", parent_run_id=parent_run_id) as run:
        mlflow.log_params({"registry.name": name, "registry.metric": metric, "registry.tie_rule": TIE_RULE})
        with run.stage_of("register"):
            registration = _register(metric, name, experiment=experiment, parent_run_id=parent_run_id, run_id=run_id)
        mlflow.log_params({"registry.version": registration.version, "registry.source_run_id": registration.run_id,
                           "registry.candidates": registration.candidates})  # fmt: skip
        mlflow.set_tag("dialogsum.registered", f"models:/{name}/{registration.version}")
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
