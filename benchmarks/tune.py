"""What pruning saves and what a second worker buys, measured side by side on one fixed space and seed.

1. The same study (kobart-tiny, `--trials` trials, random sampler, fixed seed) twice: without a pruner and with the
   median pruner. Prints both best scores, and the ratio of training epochs spent (target <= 0.6) with the best
   score kept (target: within 0.5 of the unpruned best).
2. The same number of trials with one worker process and with two on one journal-file study, one math thread per
   worker. Prints trials per minute while trials ran (first trial start to last trial end) and the ratio (target
   >= 1.6), and the end-to-end wall times, which add each worker's start-up and closing report.

    python benchmarks/tune.py [--trials 30] [--metric val_loss]

At kobart-tiny's size every summary scores ROUGE 0, so the default metric is the validation loss (minimised); on a
real model use --metric val_final.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACE = """\
model: kobart-tiny
fixed: {training.max_train_samples: 24, training.max_validation_samples: 8, training.max_test_samples: 2, training.epochs: 4,
        generation.max_new_tokens: 4, generation.num_beams: 1, checkpoint.keep: none}
params:
  training.learning_rate: {type: float, low: 1.0e-5, high: 3.0e-2, log: true}
  training.warmup_steps: {type: int, low: 0, high: 4}
"""


def tune(folder: Path, study: str, trials: int, pruner: str, metric: str, env: dict, workers: int = 1) -> float:
    """Seconds for `workers` processes to finish the study (one worker: seeded; several: unseeded, since workers with
    one seed would sample the same trials)."""
    command = [sys.executable, "-m", "dialogsum", "tune", "--model", "kobart-tiny", "--space", str(folder / "space.yaml"),
               "--trials", str(trials), "--study", study, "--storage", f"journal:{folder / (study + '.journal')}",
               "--pruner", pruner, "--sampler", "random", "--metric", metric, *(["--seed", "7"] if workers == 1 else [])]  # fmt: skip
    start = time.perf_counter()
    processes = [subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(workers)]  # fmt: skip
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"tune failed:\n{err[-3000:]}")
    return time.perf_counter() - start


def load(folder: Path, study: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=study, storage=JournalStorage(JournalFileBackend(str(folder / f"{study}.journal"))))


def study_numbers(folder: Path, study: str) -> tuple[float, int]:
    """(best value, training epochs spent over all trials)."""
    loaded = load(folder, study)
    return loaded.best_value, sum(len(t.intermediate_values) for t in loaded.trials)


def trials_per_minute(folder: Path, study: str) -> float:
    """Finished trials per minute while the workers ran trials: from the first trial's start to the last one's end
    (each worker's process start-up and closing report, paid once per worker, are left out)."""
    finished = [t for t in load(folder, study).trials if t.datetime_complete is not None]
    span = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    return len(finished) / span.total_seconds() * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)  # the example study
    parser.add_argument("--metric", default="val_loss")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "space.yaml").write_text(SPACE, encoding="utf-8")
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "DIALOGSUM_CACHE_DIR": str(folder / "cache"), "DIALOGSUM_SYSTEM_METRICS": "false"}  # fmt: skip
        tune(folder, "warm-up", 1, "none", args.metric, env)  # fills the tokenizer and model caches
        plain_s = tune(folder, "unpruned", args.trials, "none", args.metric, env)
        pruned_s = tune(folder, "pruned", args.trials, "median", args.metric, env)
        (plain_best, plain_epochs), (pruned_best, pruned_epochs) = study_numbers(folder, "unpruned"), study_numbers(folder, "pruned")
        two_s = tune(folder, "two-workers", args.trials, "none", args.metric, env, workers=2)
        one_rate, two_rate = trials_per_minute(folder, "unpruned"), trials_per_minute(folder, "two-workers")
    print(f"{args.trials} trials of kobart-tiny, random sampler, seed 7, metric {args.metric}")
    print(f"  unpruned: best {plain_best:.4f}, {plain_epochs} training epochs, {plain_s:.0f} s")
    print(f"  median pruner: best {pruned_best:.4f}, {pruned_epochs} training epochs, {pruned_s:.0f} s")
    print(f"  epochs spent pruned/unpruned: {pruned_epochs / plain_epochs:.2f} (target <= 0.6); best difference "
          f"{abs(pruned_best - plain_best):.4f} (target <= 0.5)")
    print(f"  trials/min while trials ran: one worker {one_rate:.2f}, two workers {two_rate:.2f}, ratio {two_rate / one_rate:.2f} "
          "(target >= 1.6, one math thread per worker)")
    print(f"  wall time including each worker's start-up and closing report: one worker {plain_s:.0f} s, two workers "
          f"{two_s:.0f} s, ratio {plain_s / two_s:.2f}")


if __name__ == "__main__":
    main()
