"""Search spaces: which config keys a study varies and how, from `configs/search/<name>.yaml`.

    model: kobart-tiny                 # the model the space is written for (checked against --model)
    fixed: {training.max_train_samples: 32}          # overrides every trial gets
    params:
      training.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      generation.num_beams: {type: int, low: 1, high: 4}
      generation.no_repeat_ngram_size: {type: categorical, choices: [0, 2, 3]}

Keys are dotted model-config keys. The file is validated by the schema (an unknown key names the file and key),
and every key is checked against the model's config before the first trial, with each bound applied. Keys under
`generation.` change only how the validation summaries are generated; every trial trains, so a space needs at least
one other key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from dialogsum.config import ConfigError, ModelConfig, StrictModel, configs_dir, load_yaml, parse_config, with_overrides

GENERATION_PREFIX = "generation."


class Param(StrictModel):
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> "Param":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs choices")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"a {self.type} parameter needs low <= high")
        return self

    def bounds(self) -> list[Any]:
        """The values that must all be valid config values: each choice, or both ends of the range."""
        if self.type == "categorical":
            return list(self.choices or [])
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def suggest(self, trial, key: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(key, self.choices)
        if self.type == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(key, self.low, self.high, step=self.step, log=self.log)


class SearchSpace(StrictModel):
    model: str | None = None
    fixed: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Param]

    @property
    def generation_only(self) -> bool:
        return all(key.startswith(GENERATION_PREFIX) for key in self.params)

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's overrides: the fixed ones and one value per searched key."""
        return {**self.fixed, **{key: param.suggest(trial, key) for key, param in self.params.items()}}


def space_path(name_or_path: str | Path) -> Path:
    """A path as given, or a name in `configs/search/` of the config source."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return configs_dir() / "search" / f"{name_or_path}.yaml"


def load_space(name_or_path: str | Path, cfg: ModelConfig) -> SearchSpace:
    """The validated space, every key checked against `cfg` at each bound; ConfigError names the file and key."""
    path = space_path(name_or_path)
    space = parse_config(SearchSpace, load_yaml(path), path)
    if space.model is not None:
        from dialogsum.config import model_registry

        if model_registry().resolve(space.model) != cfg.name:
            raise ConfigError(f"{path}: the space is for '{space.model}', the study trains '{cfg.name}'")
    base = with_overrides(cfg, space.fixed, path) if space.fixed else cfg
    for key, param in space.params.items():
        for value in param.bounds():
            try:
                with_overrides(base, {key: value}, path)
            except ConfigError as e:
                raise ConfigError(f"{path}: key 'params.{key}' = {value!r} is not a valid config value:\n{e}") from e
    return space
