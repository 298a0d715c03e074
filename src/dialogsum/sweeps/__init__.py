"""Sweeps: Optuna hyperparameter studies (`tune`) and K-fold cross-validation (`kfold`), each a parent run whose
children are ordinary training runs."""
