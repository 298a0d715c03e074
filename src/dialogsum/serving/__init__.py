"""Serving: the saved-model folder (`saved_model`), and the MLflow pyfunc that serves it (`pyfunc`, `model_code`)."""
