"""The code MLflow runs to build a dialogsum pyfunc (models-from-code): the model is `DialogueSummarizer`, and what
it serves comes from the logged `model_dir` artifact, a saved-model folder."""

import mlflow

from dialogsum.serving.pyfunc import DialogueSummarizer

mlflow.models.set_model(DialogueSummarizer())
