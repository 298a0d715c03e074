"""dialogsum: train, evaluate, ensemble, compress and ship Korean dialogue summarizers, tracked in MLflow."""

__version__ = "0.1.0"
