"""Typed configuration: one pydantic schema for models and pipelines, one YAML registry of models.

Every config file is validated against a schema that forbids unknown keys; errors name the file and the key.
Model names resolve by canonical name or declared alias, ignoring case and `-`/`_`/`.` differences. There is
no guessing from file names: the registry is the set of `name:` fields of the files in `models/` of the config
source: $DIALOGSUM_CONFIGS, else ./configs, else the configs packaged with dialogsum (`dialogsum/configs/`).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Module names a LoRA adapter may target, per architecture family (the names that exist in that family).
LORA_TARGETS_BY_FAMILY: dict[str, frozenset[str]] = {
    "bart": frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    "llama": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "qwen3": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "gpt_neox": frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
}
Family = Literal["bart", "llama", "qwen3", "gpt_neox"]


class ConfigError(ValueError):
    """A configuration file or name that cannot be used; the message names the file and key."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True, serialize_by_alias=True)


class Dimensions(StrictModel):
    """Shape of the network, used for memory estimates before any weight is loaded."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool = Field(True, description="the output layer shares the input embedding (false: SOLAR, Polyglot-Ko, KULLM)")


class LoraSettings(StrictModel):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str]


class GenerationSettings(StrictModel):
    """Decoding settings. `repetition_penalty` counts generated tokens only, never the prompt; so does
    `no_repeat_ngram_size` (0: off), which never blocks an n-gram holding a dialogue tag or ending with the space
    before one (`generate.TagAwareNoRepeatNGram`), so a summary can name `#Person1#` twice. `stop_tokens`: the
    model card's terminators (e.g. Llama-3's `<|eot_id|>`), added to the model's own generation-config EOS ids and
    the tokenizer's EOS; any of them ends a summary. Every field but `stop_tokens` can be overridden per request."""

    num_beams: int = 4
    max_new_tokens: int = 100
    min_new_tokens: int = 1
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    do_sample: bool = False
    stop_tokens: list[str] = Field(default_factory=list)


class PromptSettings(StrictModel):
    """How a dialogue becomes model input.

    `seq2seq`: the dialogue is the encoder input. `chat`: a chat template with `system` and `instruction`: the
    model card's `chat_template` (Jinja) when the config pins one, else the tokenizer's own. `instruction`: the plain
    `template` (for tokenizers without a chat template).
    """

    format: Literal["seq2seq", "chat", "instruction"] = "seq2seq"
    system: str = "당신은 한국어 대화를 요약하는 도우미입니다."
    instruction: str = "다음 대화를 한두 문장으로 요약하세요. #Person1# 같은 화자 태그는 그대로 쓰세요.\n\n{dialogue}"
    template: str = "### 대화:\n{dialogue}\n\n### 요약:\n"
    chat_template: str | None = None


class TrainingSettings(StrictModel):
    epochs: int = 3
    batch_size: int = 8
    eval_batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    max_source_length: int = 512
    max_target_length: int = 128
    max_grad_norm: float = 1.0
    group_by_length: bool = True
    pad_to_max_length: bool = False
    log_every_n_steps: int = 10
    best_metric: str = "val_final"
    best_metric_mode: Literal["max", "min"] = "max"
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="held out of the training rows (by fname hash) when no validation file is given")
    max_train_samples: int | None = None
    max_validation_samples: int | None = None
    max_test_samples: int | None = None
    seed: int = 42
    gradient_checkpointing: bool = False


class CheckpointSettings(StrictModel):
    """Which per-epoch checkpoints are logged to the run (`checkpoints/last` resumes, `checkpoints/best` serves);
    `none` saves none, so the training cannot be resumed."""

    keep: Literal["both", "last", "best", "none"] = "both"


class ResourceSettings(StrictModel):
    """What a training of this model asks of a Ray cluster (`executor: ray`) or of this machine's GPUs (`executor:
    local`, which takes whole GPUs: a fraction counts as one; a machine without GPUs ignores it)."""

    gpus: float | None = Field(None, ge=0, description="GPUs per training; unset: as many as preflight's memory estimate needs "
                                                        "at the per-GPU memory (free memory locally; none on a CPU cluster)")
    cpus: float = Field(1.0, gt=0, description="CPU cores per training")


class TokenizerSettings(StrictModel):
    """Where the tokenizer comes from: `path` (a folder or hub id); when unset, the model's hub id, or for a
    config-source model a tokenizer trained from the training data at first use (cached, `vocab_size`)."""

    path: str | None = None
    vocab_size: int = 4000


class ModelConfig(StrictModel):
    name: str
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    family: Family
    task: Literal["seq2seq", "causal"]
    hub_id: str | None = None
    revision: str | None = Field(None, description="the hub branch, tag or commit of the weights (and of the tokenizer when it comes from hub_id); "
                                                  "each run tags the commit it resolved to, and every later load of the run's model uses that commit")
    source: Literal["hub", "config"] = "hub"
    architecture: dict[str, Any] | None = None
    params_billions: float
    dimensions: Dimensions
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings)
    lora: LoraSettings | None = None
    quantization: Literal["none", "8bit", "4bit"] = "none"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    resources: ResourceSettings = Field(default_factory=ResourceSettings)

    @model_validator(mode="after")
    def _check_consistency(self) -> "ModelConfig":
        if self.source == "hub" and not self.hub_id:
            raise ValueError("source 'hub' needs hub_id")
        if self.source == "config" and not self.architecture:
            raise ValueError("source 'config' needs an architecture (a transformers config as a mapping)")
        if self.quantization != "none" and self.lora is None:
            raise ValueError(f"quantization {self.quantization!r} needs a lora section (QLoRA trains adapters only)")
        if self.task == "seq2seq" and self.prompt.format != "seq2seq":
            raise ValueError("a seq2seq model takes prompt.format 'seq2seq'")
        if self.task == "causal" and self.prompt.format == "seq2seq":
            raise ValueError("a causal model takes prompt.format 'chat' or 'instruction'")
        return self

    @property
    def tokenizer_revision(self) -> str | None:
        """`revision` applies to the tokenizer when it comes from the model's own hub repository."""
        return self.revision if self.tokenizer.path in (None, self.hub_id) else None

    @property
    def weights_id(self) -> str:
        """The hub id or local path the weights load from (config-source models build theirs)."""
        return self.hub_id or f"config:{self.name}"


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.\s]", "", name.lower())


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key (not part of the schema)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  key '{key}': {msg}")
    return "\n".join(lines)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def parse_config(schema: type[BaseModel], data: dict[str, Any], path: Path) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(path, e)) from e


CONFIGS_ENV = "DIALOGSUM_CONFIGS"


@dataclass(frozen=True)
class ConfigSource:
    """Where configs are read from: a folder with `models/`, `pipelines/`, `prompts/` and `solar.yaml`."""

    folder: Path
    label: str


def config_source() -> ConfigSource:
    """The first of: $DIALOGSUM_CONFIGS, ./configs (when it holds models/), the configs packaged with dialogsum."""
    env = os.environ.get(CONFIGS_ENV)
    if env:
        return ConfigSource(Path(env), f"${CONFIGS_ENV} ({env})")
    local = Path.cwd() / "configs"
    if (local / "models").is_dir():
        return ConfigSource(local, f"./configs ({local})")
    packaged = Path(str(resources.files("dialogsum") / "configs"))
    return ConfigSource(packaged, f"packaged with dialogsum ({packaged})")


def configs_dir() -> Path:
    return config_source().folder


class ModelRegistry:
    """All model configs of one folder, addressable by canonical name or alias."""

    def __init__(self, folder: Path):
        if not any(folder.glob("*.yaml")):
            raise ConfigError(f"no model configs in {folder}: point ${CONFIGS_ENV} at a folder with models/*.yaml")
        self.folder = folder
        self.configs: dict[str, ModelConfig] = {}
        self.sources: dict[str, Path] = {}
        self._index: dict[str, str] = {}
        for path in sorted(folder.glob("*.yaml")):
            cfg = parse_config(ModelConfig, load_yaml(path), path)
            if path.stem != cfg.name:
                raise ConfigError(f"{path}: file name must be the canonical name '{cfg.name}.yaml'")
            self.configs[cfg.name] = cfg
            self.sources[cfg.name] = path
            for key in [cfg.name, *cfg.aliases]:
                norm = normalize_name(key)
                if norm in self._index and self._index[norm] != cfg.name:
                    raise ConfigError(f"{path}: name or alias '{key}' already used by '{self._index[norm]}'")
                self._index[norm] = cfg.name

    @property
    def names(self) -> list[str]:
        return sorted(self.configs)

    def resolve(self, name: str) -> str:
        canonical = self._index.get(normalize_name(name))
        if canonical is None:
            closest = difflib.get_close_matches(normalize_name(name), list(self._index), n=1, cutoff=0.5)
            hint = f" Closest match: '{self._index[closest[0]]}'." if closest else ""
            raise ConfigError(f"unknown model '{name}'. Known models: {', '.join(self.names)}.{hint}")
        return canonical

    def get(self, name: str) -> ModelConfig:
        return self.configs[self.resolve(name)].model_copy(deep=True)


@lru_cache(maxsize=4)
def _registry_for(folder: str) -> ModelRegistry:
    return ModelRegistry(Path(folder))


def model_registry() -> ModelRegistry:
    return _registry_for(str(configs_dir() / "models"))


def load_model_config(name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The named model's config with dotted-key overrides (e.g. {"training.epochs": 2}) applied and validated."""
    registry = model_registry()
    cfg = registry.get(name)
    return with_overrides(cfg, overrides, registry.sources[cfg.name]) if overrides else cfg


def with_overrides(cfg: ModelConfig, overrides: dict[str, Any], source: Path) -> ModelConfig:
    """`cfg` with dotted-key overrides applied and validated (errors name `source`)."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        _set_dotted(data, dotted, value)
    return parse_config(ModelConfig, data, source)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_set_options(options: list[str]) -> dict[str, Any]:
    """`--set key=value` options to a dict; values are parsed as YAML scalars (`2` → int, `true` → bool)."""
    parsed: dict[str, Any] = {}
    for option in options:
        if "=" not in option:
            raise ConfigError(f"--set '{option}': expected key=value")
        key, raw = option.split("=", 1)
        parsed[key.strip()] = yaml.safe_load(raw) if raw else ""
    return parsed


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {'a.b.c': value}; lists are kept as values."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


# Per-model overrides a pipeline refuses: every child is validated and tested on the same rows.
ROW_LIMITS = ("training.max_validation_samples", "training.max_test_samples")
PipelineStep = Literal["train", "tune", "kfold", "evaluate_solar", "ensemble", "optimize", "register", "predict"]


class PipelineModel(StrictModel):
    name: str
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted config keys, as with --set")
    timeout: float | None = Field(None, gt=0, description="seconds this model's training may run (default: timeouts.train)")


class PipelineData(StrictModel):
    """The data roles: `train` fits; `validation` chooses (epochs, ensemble weights, the optimize recommendation,
    the ranking of candidates); `test` reports (and guards the champion); `predict` is the unlabelled file the
    submission is written for. Without a validation file, `validation_fraction` of the train rows (by fname hash)
    become validation. Defaults: the bundled sample's train, dev (as test) and test (to predict) files."""

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    predict: str | None = None
    validation_fraction: float = Field(0.2, gt=0, lt=1)


class SolarStep(StrictModel):
    model: str | None = None
    prompt: str | None = None
    n_samples: int | None = None
    concurrency: int | None = None
    rpm: int | None = None


class EnsembleStep(StrictModel):
    strategy: Literal["mbr", "weighted_mbr", "stacking"] = "mbr"


class TuneStep(StrictModel):
    """An Optuna study of one model (`dialogsum tune`) on the pipeline's train and validation files."""

    model: str
    space: str
    trials: int = Field(10, ge=1)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    metric: str = "val_final"


class KFoldStep(StrictModel):
    """K-fold cross-validation of one model (`dialogsum kfold`) over the pipeline's train file, reported on its test file."""

    model: str
    folds: int = Field(5, ge=2)
    group_by: Literal["fname", "topic"] = "fname"
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted config keys every fold gets, as with --set")


class OptimizeStep(StrictModel):
    quantization: str = "auto"  # see dialogsum.quantize.resolve_variants; checked against the device at pipeline start
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    n_samples: int | None = None


class RegisterStep(StrictModel):
    name: str = "dialogsum-ko"
    metric: str = "val_final"


class StageTimeouts(StrictModel):
    """Seconds a stage may run before its process is killed and the child run records the timeout; `grace`: seconds
    between SIGTERM and SIGKILL when a stage is stopped (timeout, or the pipeline interrupted)."""

    train: float = 6 * 3600
    tune: float = 24 * 3600
    kfold: float = 24 * 3600
    evaluate_solar: float = 3600
    ensemble: float = 1800
    optimize: float = 3600
    register_: float = Field(600, alias="register")
    predict: float = 3600
    grace: float = 30


class RaySettings(StrictModel):
    """`executor: ray`: where the cluster is and how much of it the pipeline takes."""

    address: str | None = Field(None, description="ray://host:10001, host:6379 or auto; unset: start a Ray on this machine")
    stage_cpus: float = Field(1.0, gt=0, description="CPU cores each later step (ensemble, optimize, ...) asks for")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """`ray.max_concurrency` moved to the top level; an unset one (`null`, as pipelines before the move logged
        their config, which `--resume` reads back) is dropped."""
        if not isinstance(data, dict) or "max_concurrency" not in data:
            return data
        if data["max_concurrency"] is not None:
            raise ValueError("max_concurrency is a top-level key now (it caps the trainings of either executor): move "
                             "it out of `ray:`")  # fmt: skip
        return {key: value for key, value in data.items() if key != "max_concurrency"}


DEFAULT_TRUNCATION_WARN_SHARE = 0.02


class PreflightSettings(StrictModel):
    """What preflight warns about before the stages start (it blocks nothing for these)."""

    truncation_warn_share: float = Field(DEFAULT_TRUNCATION_WARN_SHARE, ge=0, le=1,
                                         description="warn when a length limit (training.max_source_length, training.max_target_length, "
                                                     "generation.max_new_tokens) cuts more than this share of the train and validation rows")  # fmt: skip


class PipelineConfig(StrictModel):
    name: str
    description: str = ""
    experiment: str | None = None
    data: PipelineData = Field(default_factory=PipelineData)
    models: list[PipelineModel]
    steps: list[PipelineStep] = Field(default_factory=lambda: ["train"])
    tune: TuneStep | None = None
    kfold: KFoldStep | None = None
    solar: SolarStep = Field(default_factory=SolarStep)
    ensemble: EnsembleStep = Field(default_factory=EnsembleStep)
    optimize: OptimizeStep = Field(default_factory=OptimizeStep)
    register_: RegisterStep = Field(default_factory=RegisterStep, alias="register")
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts)
    preflight: PreflightSettings = Field(default_factory=PreflightSettings)
    executor: Literal["local", "ray"] = "local"
    max_concurrency: int | None = Field(None, ge=1, description="trainings running at once, with either executor (unset: as "
                                                                "many as the GPUs or the cluster hold; no GPU: one stage at a time)")
    gpus: list[int] | None = Field(None, min_length=1, description="executor local: the GPUs (indices as nvidia-smi numbers "
                                                                   "them) its stages may use; unset: every GPU of this machine")
    ray: RaySettings = Field(default_factory=RaySettings)

    @model_validator(mode="after")
    def _check_models(self) -> "PipelineConfig":
        for step in ("tune", "kfold"):
            if step in self.steps and getattr(self, step) is None:
                raise ValueError(f"steps: '{step}' needs a '{step}' section (model, ...)")
        names = [normalize_name(m.name) for m in self.models]
        duplicates = sorted({m.name for m in self.models if names.count(normalize_name(m.name)) > 1})
        if duplicates:
            raise ValueError(f"models listed twice: {duplicates}")
        if self.gpus is not None:
            if self.executor != "local":
                raise ValueError("gpus: lists this machine's GPUs for executor local; a Ray cluster's GPUs are those its "
                                 "nodes were started with (`ray start --num-gpus`, their CUDA_VISIBLE_DEVICES)")  # fmt: skip
            if any(i < 0 for i in self.gpus) or len(set(self.gpus)) != len(self.gpus):
                raise ValueError(f"gpus: {self.gpus}: GPU indices are 0 or more, each listed once")
        for m in self.models:
            limited = sorted(set(m.overrides) & set(ROW_LIMITS))
            if limited:
                raise ValueError(f"models: {m.name}: {', '.join(limited)} would score this model on other rows than the "
                                 "rest, and scores on different rows are never compared; give the pipeline smaller "
                                 "data.validation / data.test files instead")  # fmt: skip
        return self


def pipeline_config_path(path_or_name: str | Path) -> Path:
    """A pipeline config by path, or by name (`quickstart` → pipelines/quickstart.yaml of the config source)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    folder = configs_dir() / "pipelines"
    named = folder / f"{path_or_name}.yaml"
    if path.suffix not in (".yaml", ".yml") and named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
    raise ConfigError(f"{path_or_name}: no such file, nor a pipeline name in {folder} (known: {known})")


def load_pipeline_config(path_or_name: str | Path) -> PipelineConfig:
    path = pipeline_config_path(path_or_name)
    return parse_config(PipelineConfig, load_yaml(path), path)
