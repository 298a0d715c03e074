"""Checkpoint overhead per epoch, as a share of the epoch's training time, and the time to resume: full fine-tuning
(kobart-tiny: weights + optimizer state) beside QLoRA (qwen3-tiny-qlora: the adapter and tag-token rows only),
measured side by side in one run on the same rows, logging into a real (SQLite) MLflow store.

    python benchmarks/checkpoint.py [--rows 64] [--epochs 3]

Overhead = `checkpoint` stage (accelerate `save_state` + trainer state + best model when it improves, each written
locally and logged as `checkpoints/last` and `checkpoints/best`) per epoch / training seconds per epoch. Resume =
fetching `checkpoints/last` from the run + `load_state` into the prepared model, optimizer and scheduler.
Target: <= 5% for LoRA adapters; printed for full fine-tuning.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_ROWS = REPO.parent / "shared" / "data" / "dialogsum-ko" / "labeled.csv"
MODELS = {"kobart-tiny": "full fine-tuning", "qwen3-tiny-qlora": "QLoRA adapter"}


def artifact_bytes(client, run_id: str, path: str) -> int:
    total = 0
    for item in client.list_artifacts(run_id, path):
        total += artifact_bytes(client, run_id, item.path) if item.is_dir else (item.file_size or 0)
    return total


def measure(name: str, rows, validation, epochs: int) -> dict[str, float]:
    import mlflow

    from dialogsum.config import load_model_config
    from dialogsum.data import DataRoles
    from dialogsum.tracking import tracked_run
    from dialogsum.training.checkpoints import checkpoint_root, fetch_checkpoint
    from dialogsum.training.recipe import run_training

    cfg = load_model_config(name, {"training.epochs": epochs, "generation.max_new_tokens": 4, "generation.num_beams": 1})
    roles = DataRoles(rows, validation, None)
    with tracked_run(run_name=f"checkpoint-{name}", kind="benchmark") as ctx:
        result = run_training(cfg, roles, run_ctx=ctx, run_id=ctx.run_id)
    train_s = sum(h.metrics["epoch_time_s"] for h in result.history) / epochs
    checkpoint_s = ctx.timings["checkpoint"] / epochs
    client = mlflow.MlflowClient()
    start = time.perf_counter()
    fetch_checkpoint(ctx.run_id, checkpoint_root(ctx.run_id))  # the local copy went with the run's success
    fetch_s = time.perf_counter() - start
    with tracked_run(run_id=ctx.run_id, kind="benchmark") as again:
        run_training(cfg, roles, run_ctx=again, run_id=ctx.run_id, resume=True)
    return {"train_s": train_s, "checkpoint_s": checkpoint_s, "fetch_s": fetch_s, "restore_s": again.timings["resume"],
            "last_mb": artifact_bytes(client, ctx.run_id, "checkpoints/last") / 2**20,
            "best_mb": artifact_bytes(client, ctx.run_id, "checkpoints/best") / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import mlflow

    from dialogsum.data import read_dialogues, sample_data_path

    source = SHARED_ROWS if SHARED_ROWS.is_file() else sample_data_path("train")
    data = read_dialogues(source)
    rows, validation = data.head(min(args.rows, len(data) - 8)), data.subset(data.rows[-8:], "the last 8 rows")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DIALOGSUM_CACHE_DIR", str(Path(tmp) / "cache"))
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("checkpoint-benchmark")
        results = {name: measure(name, rows, validation, args.epochs) for name in MODELS}
    print(f"{len(rows)} rows of {source.name}, {args.epochs} epochs, 8 validation rows; per epoch:")
    print(f"{'model':18} {'kind':17} {'train s':>8} {'ckpt s':>7} {'ratio':>7} {'last MB':>8} {'best MB':>8} {'fetch s':>8} {'restore s':>9}")
    for name, r in results.items():
        print(f"{name:18} {MODELS[name]:17} {r['train_s']:8.2f} {r['checkpoint_s']:7.3f} {100 * r['checkpoint_s'] / r['train_s']:6.1f}% "
              f"{r['last_mb']:8.2f} {r['best_mb']:8.2f} {r['fetch_s']:8.2f} {r['restore_s']:9.2f}")  # fmt: skip
    lora = results["qwen3-tiny-qlora"]
    print(f"LoRA adapter checkpoint overhead: {100 * lora['checkpoint_s'] / lora['train_s']:.1f}% of epoch time (target <= 5%)")


if __name__ == "__main__":
    main()
