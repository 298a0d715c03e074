"""The MLflow pyfunc that every trained (or optimised) dialogsum model is logged as.

Input: a DataFrame with a `dialogue` column, a list of strings, or {"dialogue": [...]}. Output: one summary per
dialogue. Generation settings (num_beams, max_new_tokens, ...) can be overridden per request through params.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from dialogsum.config import GenerationSettings

MODEL_ARTIFACT_KEY = "model_dir"
DEFAULT_BATCH_SIZE = 16


class NoLoggedModel(LookupError):
    """A run that logged no READY dialogsum model."""


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


def dialogues_from_input(model_input: Any) -> list[str]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "dialogue" in model_input.columns:
            return [str(d) for d in model_input["dialogue"]]
        if len(model_input.columns) == 1:
            return [str(d) for d in model_input.iloc[:, 0]]
        raise ValueError(f"input DataFrame needs a 'dialogue' column (got {list(model_input.columns)})")
    if isinstance(model_input, dict) and "dialogue" in model_input:
        value = model_input["dialogue"]
        return [value] if isinstance(value, str) else [str(d) for d in value]
    if isinstance(model_input, str):
        return [model_input]
    return [str(d) for d in model_input]


def predict_summaries(model, dialogues: list[str], params: dict[str, Any] | None = None) -> list[str]:
    """A loaded dialogsum pyfunc's summaries for `dialogues`, one per dialogue, stripped; raises ValueError when the
    model returns another count."""
    import pandas as pd

    output = model.predict(pd.DataFrame({"dialogue": dialogues}), params=params)
    summaries = list(output.iloc[:, 0] if isinstance(output, pd.DataFrame) else output)
    if len(summaries) != len(dialogues):
        raise ValueError(f"the model returned {len(summaries)} summaries for {len(dialogues)} dialogues")
    return [str(s).strip() for s in summaries]


class DialogueSummarizer(mlflow.pyfunc.PythonModel):
    """Loads the saved model folder once per process and summarises batches of dialogues."""

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE):
        self.batch_size = batch_size

    def load_context(self, context) -> None:
        from dialogsum.models import load_for_inference

        self.model, self.tokenizer, self.cfg = load_for_inference(context.artifacts[MODEL_ARTIFACT_KEY])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:  # noqa: ARG002
        from dialogsum.generate import summarize

        params = dict(params or {})
        batch_size = int(params.pop("batch_size", self.batch_size))
        return summarize(self.model, self.tokenizer, self.cfg, dialogues_from_input(model_input), batch_size, params)


def default_params(settings: GenerationSettings, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    return {**settings.model_dump(exclude={"stop_tokens"}), "batch_size": batch_size}


def log_summarizer(
    model_dir: Path,
    name: str,
    settings: GenerationSettings,
    example_dialogues: list[str],
    example_summaries: list[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    **kwargs,
):
    """Log a saved model folder as the pyfunc `name` (the model and step, e.g. `kobart-tiny-int8`) of the active run,
    with signature and input example; `batch_size` is the default generation batch size of `predict`.

    The signature declares the output and the per-request generation params but no input schema: MLflow's input
    enforcement would either reject a plain list of strings (named `dialogue` column) or keep only the first
    column of a DataFrame (unnamed column). `dialogues_from_input` validates the input instead and accepts a
    DataFrame with a `dialogue` column, a list of strings or {"dialogue": [...]}."""
    import pandas as pd
    from mlflow.models import ModelSignature, infer_signature

    example = pd.DataFrame({"dialogue": example_dialogues})
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
    inferred = infer_signature(example, pd.Series(example_summaries, name="summary"), params=default_params(settings, batch_size))
    signature = ModelSignature(inputs=None, outputs=inferred.outputs, params=inferred.params)
    kwargs.setdefault("pip_requirements", inference_requirements(model_dir))
    kwargs.setdefault("code_paths", [str(Path(__file__).resolve().parent.parent)])
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=DialogueSummarizer(batch_size),
        artifacts={MODEL_ARTIFACT_KEY: str(model_dir)},
        signature=signature,
        input_example=example,
        **kwargs,
    )


def inference_requirements(model_dir: Path) -> list[str]:
    """Pinned packages the pyfunc for `model_dir` needs (bitsandbytes for a bitsandbytes variant), stated rather
    than inferred: MLflow's inference loads the model in a subprocess to capture imports, which costs a full model
    load per logged model."""
    from importlib.metadata import version

    from dialogsum.models import saved_quantization

    packages = ["torch", "transformers", "tokenizers", "peft", "accelerate", "packaging", "pandas", "pydantic", "pyyaml"]
    if (saved_quantization(model_dir) or "").startswith("bnb-"):
        packages.append("bitsandbytes")
    return [f"{name}=={version(name)}" for name in packages]
