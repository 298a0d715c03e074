"""Evaluate Upstage's Solar chat API on labelled dialogues, reproducibly, cheaply and traceably.

Settings come from `configs/solar.yaml` (model, endpoint, generation parameters, client limits, prices) with
command-line overrides; prompts are versioned YAML templates in `configs/prompts/`. Few-shot examples are drawn
from the training data, never from the rows being evaluated. Every paid answer goes to a persistent cache
(`dialogsum.solar.cache`), so a re-run or a resumed run pays for nothing twice. The run logs the parameters (never
the key), Korean ROUGE on the validation rows (`val_*`) and, when given, the test rows (`test_*`), API metrics
(latency, tokens, cost, cache hits, retries, failed rows), the prediction tables and the prompt template. A row that
failed after all retries is listed in `failed_rows.json` and scores 0 in `*_final` (computed over every requested
row, so Solar ranks fairly against trained models on the same rows); `*_final_answered` is the score over the
answered rows, beside `*_answered_fraction`.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from dialogsum.config import ConfigError, StrictModel, configs_dir, load_yaml, parse_config
from dialogsum.data import Dialogue, DialogueSet, check_disjoint, read_dialogues, sample_data_path
from dialogsum.solar.cache import CompletionCache, default_cache_dir, request_key
from dialogsum.solar.client import ClientSettings, Completion, SolarClient
from dialogsum.tracking import MODEL_TAG, PREDICTIONS_ARTIFACT, configure_tracking, log_config, log_predictions, tracked_run

DEFAULT_BASE_URL = "https://api.upstage.ai/v1"
API_KEY_ENVS = ("UPSTAGE_API_KEY", "SOLAR_API_KEY")
BASE_URL_ENV = "SOLAR_BASE_URL"
DIALOGUE_FIELD = "{dialogue}"
FAILED_ROWS_ARTIFACT = "failed_rows.json"
SCOPE_TAG = "dialogsum.rouge_scope"
ROUGE_COLUMNS = ("rouge1", "rouge2", "rougeL", "final")


class MissingApiKey(RuntimeError):
    """No API key in the environment; raised before any run is created."""


class SolarEvaluationError(RuntimeError):
    """The evaluation produced nothing to score."""


class GenerationParams(StrictModel):
    """Sent with every request."""

    temperature: float = Field(0.2, ge=0, le=2)
    top_p: float = Field(0.3, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)


class Pricing(StrictModel):
    """USD per million tokens; the estimated cost is logged only when both are set."""

    input_usd_per_million_tokens: float | None = Field(None, ge=0)
    output_usd_per_million_tokens: float | None = Field(None, ge=0)

    def cost(self, tokens_in: int, tokens_out: int) -> float | None:
        if self.input_usd_per_million_tokens is None or self.output_usd_per_million_tokens is None:
            return None
        return (tokens_in * self.input_usd_per_million_tokens + tokens_out * self.output_usd_per_million_tokens) / 1e6


class SolarConfig(StrictModel):
    model: str = "solar-mini"
    base_url: str = DEFAULT_BASE_URL
    prompt: str = "solar-few-shot"
    generation: GenerationParams = Field(default_factory=GenerationParams)
    client: ClientSettings = Field(default_factory=ClientSettings)
    pricing: Pricing = Field(default_factory=Pricing)


class PromptTemplate(StrictModel):
    """A versioned chat prompt: `system`, and `user` with `{dialogue}`; `shots` > 0 adds that many examples from
    the training data (a seeded draw among dialogues of at most `shot_max_chars` characters) as user/assistant
    turns. Summaries are used exactly as the model writes them, `#PersonN#` tags included."""

    name: str
    version: int = Field(ge=1)
    description: str = ""
    system: str
    user: str
    shots: int = Field(0, ge=0)
    shot_seed: int = 42
    shot_max_chars: int | None = Field(None, ge=1)

    @field_validator("user")
    @classmethod
    def _has_dialogue_field(cls, user: str) -> str:
        if DIALOGUE_FIELD not in user:
            raise ValueError(f"must contain {DIALOGUE_FIELD}")
        return user

    def render(self, dialogue: str) -> str:
        return self.user.replace(DIALOGUE_FIELD, dialogue)

    def messages(self, dialogue: str, examples: list[Dialogue]) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}]
        for example in examples:
            messages.append({"role": "user", "content": self.render(example.dialogue)})
            messages.append({"role": "assistant", "content": example.summary or ""})
        messages.append({"role": "user", "content": self.render(dialogue)})
        return messages


@dataclass(frozen=True)
class RowRequest:
    row: Dialogue
    key: str
    payload: dict[str, Any]


@dataclass
class Answers:
    """What the generation stage produced, by request key."""

    cached: dict[str, Completion] = field(default_factory=dict)
    fresh: dict[str, Completion] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def api_key_from_env() -> str:
    for name in API_KEY_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    raise MissingApiKey(f"no Upstage API key: set {API_KEY_ENVS[0]} (or {API_KEY_ENVS[1]}) to evaluate the Solar API")


def load_solar_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> SolarConfig:
    """configs/solar.yaml (or `path`) with overrides such as {"client.concurrency": 8}; None values are ignored."""
    path = path or configs_dir() / "solar.yaml"
    config = parse_config(SolarConfig, load_yaml(path), path)
    data = config.model_dump()
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, _, key = dotted.rpartition(".")
            (data[section] if section else data)[key] = value
    return parse_config(SolarConfig, data, path)


def prompt_path(name: str) -> Path:
    """A prompt by name (a file in configs/prompts/) or by path to a YAML file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    folder = configs_dir() / "prompts"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise ConfigError(f"unknown prompt '{name}' (no {path}). Known prompts: {known}")
    return path


def load_prompt(name: str) -> tuple[PromptTemplate, Path]:
    path = prompt_path(name)
    template = parse_config(PromptTemplate, load_yaml(path), path)
    if template.name != path.stem:
        raise ConfigError(f"{path}: key 'name': '{template.name}' must match the file name '{path.stem}'")
    return template, path


def few_shot_examples(template: PromptTemplate, train: DialogueSet, evaluated: list[DialogueSet]) -> list[Dialogue]:
    """`template.shots` labelled training rows, none of them (by fname or text) among the evaluated rows."""
    excluded_names = {f for data in evaluated for f in data.fnames}
    excluded_texts = {d for data in evaluated for d in data.dialogues}
    eligible = [
        row
        for row in train.rows
        if row.summary
        and row.fname not in excluded_names
        and row.dialogue not in excluded_texts
        and (template.shot_max_chars is None or len(row.dialogue) <= template.shot_max_chars)
    ]
    if len(eligible) < template.shots:
        raise ConfigError(
            f"prompt '{template.name}' needs {template.shots} examples but {train.report.path} has only "
            f"{len(eligible)} eligible rows (labelled, not evaluated, at most {template.shot_max_chars} characters)"
        )
    return random.Random(template.shot_seed).sample(eligible, template.shots)


def build_requests(
    dataset: DialogueSet,
    template: PromptTemplate,
    examples: list[Dialogue],
    config: SolarConfig,
    base_url: str,
) -> list[RowRequest]:
    requests = []
    for row in dataset.rows:
        payload = {
            "model": config.model,
            "messages": template.messages(row.dialogue, examples),
            **config.generation.model_dump(),
        }
        key = request_key(base_url, template.name, str(template.version), payload)
        requests.append(RowRequest(row, key, payload))
    return requests


def evaluate_solar(
    data_path: str | Path,
    *,
    test_path: str | Path | None = None,
    model: str | None = None,
    prompt: str | None = None,
    n_samples: int | None = None,
    concurrency: int | None = None,
    rpm: float | None = None,
    base_url: str | None = None,
    parent_run_id: str | None = None,
    train_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    config_path: str | Path | None = None,
) -> str:
    """Evaluate the Solar API on the labelled CSV at `data_path` (the validation rows, `val_*`) and, when given, on
    `test_path` (`test_*`); returns the MLflow run id.

    Raises MissingApiKey (before any run exists) when no key is set; FatalApiError when the API refuses the key
    or the request; SolarEvaluationError when every row failed (the run is then FAILED, its rows still logged).
    """
    api_key = api_key_from_env()
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be at least 1 (got {n_samples}); None evaluates every row")
    overrides = {
        "model": model,
        "prompt": prompt,
        "client.concurrency": concurrency,
        "client.requests_per_minute": rpm,
        "generation.temperature": temperature,
        "generation.top_p": top_p,
        "generation.max_tokens": max_tokens,
    }
    config = load_solar_config(Path(config_path) if config_path else None, overrides)
    endpoint = base_url or os.environ.get(BASE_URL_ENV) or config.base_url
    roles = {"val": read_dialogues(data_path, require_summary=True).head(n_samples)}
    if test_path:
        roles["test"] = read_dialogues(test_path, require_summary=True).head(n_samples)
    check_disjoint({"validation" if k == "val" else k: v for k, v in roles.items()})
    template, template_file = load_prompt(config.prompt)
    train = read_dialogues(train_path or sample_data_path("train"), require_summary=True) if template.shots else None
    examples = few_shot_examples(template, train, list(roles.values())) if train is not None else []
    requests = {role: build_requests(data, template, examples, config, endpoint) for role, data in roles.items()}

    configure_tracking()
    model_tag = f"solar-api:{config.model}"
    cache = CompletionCache(Path(cache_dir) if cache_dir else default_cache_dir())
    with cache, SolarClient(endpoint, api_key, config.client) as client:
        run = tracked_run(
            run_name=f"solar-api-{config.model}", kind="solar", tags={MODEL_TAG: model_tag}, parent_run_id=parent_run_id
        )
        with run as ctx:
            _log_setup(
                config=config,
                endpoint=client.redact(endpoint),
                template=template,
                template_file=template_file,
                roles=roles,
                train=train,
                examples=examples,
                cache=cache,
                first_request=requests["val"][0],
            )
            with ctx.stage_of("generate"):
                answers = _generate([r for rs in requests.values() for r in rs], cache, client, config, template)
            with ctx.stage_of("score"):
                tables = {role: _score(role_requests, answers) for role, role_requests in requests.items()}
            _log_results(tables, roles, answers, client, config.pricing)
            return ctx.run_id


def _generate(
    requests: list[RowRequest],
    cache: CompletionCache,
    client: SolarClient,
    config: SolarConfig,
    template: PromptTemplate,
) -> Answers:
    """Answers for every distinct request: from the cache, else from the API (cached the moment they arrive)."""
    distinct = {r.key: r for r in requests}
    answers = Answers(cached=cache.get_many(distinct))
    todo = {key: r.payload for key, r in distinct.items() if key not in answers.cached}

    def on_answer(key: str, completion: Completion) -> None:
        cache.put(
            key,
            completion,
            model=config.model,
            prompt=template.name,
            prompt_version=str(template.version),
            fname=distinct[key].row.fname,
        )
        answers.fresh[key] = completion

    answers.errors = client.complete_many(todo, on_answer)
    return answers


def _score(requests: list[RowRequest], answers: Answers) -> list[dict[str, Any]]:
    """The predictions table; rows without an answer get their error and no scores."""
    from dialogsum.metrics import score_rows  # Kiwi and rouge-score load only when there is something to score

    answered = [r for r in requests if r.key not in answers.errors]
    predictions = [_answer(answers, r.key).text for r in answered]
    row_scores = iter(score_rows(predictions, [r.row.summary or "" for r in answered]))
    table = []
    for r in requests:
        failed = r.key in answers.errors
        scores = dict.fromkeys(ROUGE_COLUMNS) if failed else next(row_scores)
        table.append(
            {
                "fname": r.row.fname,
                "dialogue": r.row.dialogue,
                "reference": r.row.summary,
                "prediction": None if failed else _answer(answers, r.key).text,
                **scores,
                "error": answers.errors.get(r.key),
                "cached": r.key in answers.cached,
            }
        )
    return table


def _answer(answers: Answers, key: str) -> Completion:
    return answers.cached.get(key) or answers.fresh[key]


def _log_setup(
    *,
    config: SolarConfig,
    endpoint: str,
    template: PromptTemplate,
    roles: dict[str, DialogueSet],
    train: DialogueSet | None,
    examples: list[Dialogue],
    cache: CompletionCache,
    template_file: Path,
    first_request: RowRequest,
) -> None:
    import mlflow

    data = {f"{role}_{k}": v for role, d in roles.items() for k, v in (("path", d.report.path), ("digest", d.report.digest), ("rows", len(d)))}
    log_config(
        {
            "model": config.model,
            "base_url": endpoint,
            "prompt": {
                "name": template.name,
                "version": template.version,
                "file": str(template_file),
                "shots": template.shots,
                "examples": [e.fname for e in examples],
            },
            "generation": config.generation.model_dump(),
            "client": config.client.model_dump(),
            "pricing": config.pricing.model_dump(),
            "data": {
                **data,
                "train_path": train.report.path if train is not None else None,
                "train_digest": train.report.digest if train is not None else None,
            },
            "cache": str(cache.path),
        }
    )
    mlflow.log_artifact(str(template_file), artifact_path="prompt")
    mlflow.log_dict(first_request.payload, "prompt/first_request.json")


def _log_results(
    tables: dict[str, list[dict[str, Any]]], roles: dict[str, DialogueSet], answers: Answers, client: SolarClient, pricing: Pricing
) -> None:
    """Per role: the predictions table, `<role>_*` ROUGE over every requested row (a failed row scores 0) with its
    interval, `<role>_final_answered` over the answered rows, `<role>_answered_fraction`, the rows digest; then
    the API metrics and `failed_rows.json`."""
    import mlflow

    from dialogsum.data import dataset_rows_digest
    from dialogsum.metrics import aggregate
    from dialogsum.stats import bootstrap_mean
    from dialogsum.tracking import TEST_PREDICTIONS_ARTIFACT, TEST_ROWS_TAG, VAL_ROWS_TAG

    every_row = [row for table in tables.values() for row in table]
    failed = [{"role": role, "fname": row["fname"], "error": row["error"]} for role, table in tables.items()
              for row in table if row["error"] is not None]  # fmt: skip
    for role, table in tables.items():
        log_predictions(table, PREDICTIONS_ARTIFACT if role == "val" else TEST_PREDICTIONS_ARTIFACT)
    mlflow.set_tag(SCOPE_TAG, "; ".join(f"{role}: {_scope(table)}" for role, table in tables.items()))
    mlflow.set_tags({VAL_ROWS_TAG if role == "val" else TEST_ROWS_TAG: dataset_rows_digest(data) for role, data in roles.items()})
    mlflow.log_metrics(_api_metrics(every_row, answers, client, pricing))
    if failed:
        mlflow.log_dict(failed, FAILED_ROWS_ARTIFACT)
    if not any(row["error"] is None for row in every_row):
        raise SolarEvaluationError(f"all {len(every_row)} rows failed; see {FAILED_ROWS_ARTIFACT} (first: {failed[0]['error']})")
    for role, table in tables.items():
        all_rows = [{k: (row[k] if row["error"] is None else 0.0) for k in ROUGE_COLUMNS} for row in table]
        answered = [{k: row[k] for k in ROUGE_COLUMNS} for row in table if row["error"] is None]
        interval = bootstrap_mean([r["final"] for r in all_rows])
        metrics = {f"{role}_{k}": v for k, v in aggregate(all_rows).items()}
        metrics.update({f"{role}_final_ci95_low": interval.low, f"{role}_final_ci95_high": interval.high,
                        f"{role}_answered_fraction": len(answered) / len(table)})  # fmt: skip
        if answered:
            metrics[f"{role}_final_answered"] = aggregate(answered)["final"]
        mlflow.log_metrics(metrics)


def _scope(table: list[dict[str, Any]]) -> str:
    failed = sum(row["error"] is not None for row in table)
    if not failed:
        return f"all {len(table)} rows answered"
    return (f"{len(table) - failed} of {len(table)} rows answered; the {failed} failed rows score 0 in *_final "
            f"(*_final_answered leaves them out; see {FAILED_ROWS_ARTIFACT})")  # fmt: skip


def _api_metrics(
    table: list[dict[str, Any]], answers: Answers, client: SolarClient, pricing: Pricing
) -> dict[str, float]:
    fresh = list(answers.fresh.values())
    tokens_in = sum(c.tokens_in for c in fresh)
    tokens_out = sum(c.tokens_out for c in fresh)
    metrics = {
        "rows": len(table),
        "answered_rows": sum(row["error"] is None for row in table),
        "failed_rows": sum(row["error"] is not None for row in table),
        "answered_fraction": sum(row["error"] is None for row in table) / max(len(table), 1),
        "cache_hits": sum(row["cached"] for row in table),
        "api_requests": client.stats.attempts,
        "retries": client.stats.retries,
        "rate_limited": client.stats.rate_limited,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
    }
    if fresh:
        metrics.update(_latency_percentiles([c.latency_s for c in fresh]))
    cost = pricing.cost(tokens_in, tokens_out)
    if cost is not None:
        metrics["estimated_cost_usd"] = cost
    return metrics


def _latency_percentiles(latencies: list[float]) -> dict[str, float]:
    return {"latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95)}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
