"""The MLflow pyfunc that every trained (or optimised) dialogsum model is logged as, from code
(`serving/model_code.py`, MLflow's models-from-code), not as a pickled object.

Input: records with a `dialogue` field (a DataFrame with a `dialogue` column, `[{"dialogue": "..."}]`, or over HTTP
`{"inputs": [{"dialogue": "..."}]}`); other fields such as `fname` are ignored. MLflow validates the input against
`predict`'s type hints and rejects a record without a string `dialogue` by name. Output: one summary per dialogue.
Generation settings (num_beams, max_new_tokens, ...) can be overridden per request through params. The model is the
saved-model folder (`saved_model`), loaded by `saved_model.load` exactly as the training's test scores loaded it, in
the numerics its validation ran in (`saved_model.Numerics`: dtype and autocast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
from pydantic import BaseModel, ConfigDict

from dialogsum.config import GenerationSettings

MODEL_ARTIFACT_KEY = "model_dir"
MODEL_CODE = Path(__file__).with_name("model_code.py")
DEFAULT_BATCH_SIZE = 16


class NoLoggedModel(LookupError):
    """A run that logged no READY dialogsum model."""


class DialogueInput(BaseModel):
    """One input record."""

    model_config = ConfigDict(extra="ignore")

    dialogue: str


def run_model_uri(run_id: str) -> str:
    """`models:/<model id>` of the latest READY model a run logged (each dialogsum run logs at most one, named
    after the model and step, e.g. `kobart-tiny` or `kobart-tiny-int8`)."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    run = mlflow.get_run(run_id)
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run_id}'")  # fmt: skip
    ready = sorted((m for m in found if m.status == LoggedModelStatus.READY), key=lambda m: m.creation_timestamp)
    if not ready:
        raise NoLoggedModel(f"run {run_id} logged no READY model")
    return ready[-1].model_uri


def predict_summaries(model, dialogues: list[str], params: dict[str, Any] | None = None) -> list[str]:
    """A loaded dialogsum pyfunc's summaries for `dialogues`, one per dialogue, stripped; raises ValueError when the
    model returns another count."""
    import pandas as pd

    output = model.predict([{"dialogue": d} for d in dialogues], params=params)
    summaries = list(output.iloc[:, 0] if isinstance(output, pd.DataFrame) else output)
    if len(summaries) != len(dialogues):
        raise ValueError(f"the model returned {len(summaries)} summaries for {len(dialogues)} dialogues")
    return [str(s).strip() for s in summaries]


class DialogueSummarizer(mlflow.pyfunc.PythonModel):
    """Loads the saved-model folder once per process and summarises batches of dialogues."""

    def load_context(self, context) -> None:
        from dialogsum.serving import saved_model

        self.batch_size = int((context.model_config or {}).get("batch_size", DEFAULT_BATCH_SIZE))
        folder = context.artifacts[MODEL_ARTIFACT_KEY]
        self.members = saved_model.load_members(folder) if saved_model.read(folder).weights == "ensemble" else []
        self.model, self.tokenizer, self.cfg = self.members[0] if self.members else saved_model.load(folder)

    def predict(self, context, model_input: list[DialogueInput], params: dict[str, Any] | None = None) -> list[str]:  # noqa: ARG002
        from dialogsum.generate import summarize
        from dialogsum.logit_average import averaging

        params = dict(params or {})
        batch_size = int(params.pop("batch_size", self.batch_size))
        dialogues = [record.dialogue for record in model_input]
        if not self.members:
            return summarize(self.model, self.tokenizer, self.cfg, dialogues, batch_size, params)
        with averaging([model for model, _, _ in self.members]) as main:
            return summarize(main, self.tokenizer, self.cfg, dialogues, batch_size, params)


def default_params(settings: GenerationSettings, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    return {**settings.model_dump(exclude={"stop_tokens"}), "batch_size": batch_size}


def log_summarizer(model_dir: Path, name: str, settings: GenerationSettings, example_dialogues: list[str],
                   batch_size: int = DEFAULT_BATCH_SIZE, **kwargs):  # fmt: skip
    """Log a saved-model folder as the pyfunc `name` (the model and step, e.g. `kobart-tiny-int8`) of the active run,
    from code, with `batch_size` as `predict`'s default generation batch size. The signature comes from `predict`'s
    type hints and, for the per-request generation params, from the input example; MLflow runs the pyfunc on the
    example while logging, so a folder that cannot be served fails here. What the folder holds (`describe`) is the
    logged model's metadata."""
    from dialogsum.serving.saved_model import describe

    example = ([{"dialogue": d} for d in example_dialogues], default_params(settings, batch_size))
    kwargs.setdefault("pip_requirements", inference_requirements(model_dir))
    kwargs.setdefault("code_paths", [str(Path(__file__).resolve().parent.parent)])
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={MODEL_ARTIFACT_KEY: str(model_dir)},
        model_config={"batch_size": batch_size},
        input_example=example,
        metadata={"dialogsum": describe(model_dir)},
        **kwargs,
    )


def inference_requirements(model_dir: Path) -> list[str]:
    """Pinned packages the pyfunc for `model_dir` needs (bitsandbytes for a bitsandbytes variant), stated rather
    than inferred: MLflow's inference loads the model in a subprocess to capture imports, which costs a full model
    load per logged model."""
    from importlib.metadata import version

    from dialogsum.serving.saved_model import read

    info = read(model_dir)
    members = [read(Path(model_dir) / "members" / str(i)) for i in range(info.members)] if info.weights == "ensemble" else [info]
    packages = ["torch", "transformers", "tokenizers", "peft", "accelerate", "packaging", "pandas", "pydantic", "pyyaml"]
    if any((m.variant or "").startswith("bnb-") or (m.base is not None and m.base.quantization) for m in members):
        packages.append("bitsandbytes")
    return [f"{name}=={version(name)}" for name in packages]


def logged_model_dir(model_uri: str) -> Path:
    """The saved-model folder of a logged dialogsum pyfunc, downloaded (the model is not loaded); LookupError when
    the URI cannot be read or is not a dialogsum model."""
    import mlflow
    from mlflow.models import Model

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
        artifacts = Model.load(local).flavors["python_function"].get("artifacts", {})
    except Exception as e:
        raise LookupError(f"{model_uri}: cannot read the logged model ({type(e).__name__}: {e})") from e
    if MODEL_ARTIFACT_KEY not in artifacts:
        raise LookupError(f"{model_uri}: not a dialogsum model (no '{MODEL_ARTIFACT_KEY}' artifact)")
    return local / artifacts[MODEL_ARTIFACT_KEY]["path"]
