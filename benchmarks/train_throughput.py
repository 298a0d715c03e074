"""Training throughput: dynamic padding + length-grouped batches (transformers' DataCollatorForSeq2Seq and
LengthGroupedSampler) vs padding to max length (the original's way), and MLflow tracking on vs off. Same small BART,
same real rows, same steps, measured side by side in one run.

    python benchmarks/train_throughput.py [--rows 400] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def small_bart_overrides(epochs: int) -> dict:
    return {
        "tokenizer.path": str(SHARED / "tokenizers/kobart"),
        "architecture.d_model": 256,
        "architecture.encoder_ffn_dim": 1024,
        "architecture.decoder_ffn_dim": 1024,
        "training.epochs": epochs,
        "training.batch_size": 8,
        "training.max_source_length": 512,
        "training.max_target_length": 128,
        "training.log_every_n_steps": 5,
        "generation.max_new_tokens": 4,
        "generation.num_beams": 1,
    }


def train_seconds(overrides: dict, train, validation, track: bool) -> float:
    """Seconds spent in training steps (epoch_time_s; validation excluded), summed over epochs."""
    import mlflow

    from dialogsum.config import load_model_config
    from dialogsum.data import DataRoles
    from dialogsum.training.recipe import run_training

    cfg = load_model_config("kobart-tiny", overrides)
    roles = DataRoles(train, validation, None)
    if track:
        with mlflow.start_run():
            result = run_training(cfg, roles, track=True, log_model=False)
    else:
        result = run_training(cfg, roles, track=False, log_model=False)
    return sum(h.metrics["epoch_time_s"] for h in result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    import mlflow

    from dialogsum.data import read_dialogues

    data = read_dialogues(SHARED / "data/dialogsum-ko/labeled.csv")
    train, evaluation = data.head(min(args.rows, len(data) - 2)), data.subset(data.rows[-2:], "the last 2 rows")
    base = small_bart_overrides(args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DIALOGSUM_CACHE_DIR", str(Path(tmp) / "cache"))
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("train-throughput")
        train_seconds(base, train.head(16), evaluation, track=False)  # warm-up: caches, kernels, tokenizer
        padded = train_seconds({**base, "training.pad_to_max_length": True, "training.group_by_length": False}, train, evaluation, track=False)
        dynamic = train_seconds(base, train, evaluation, track=False)
        tracked = train_seconds(base, train, evaluation, track=True)
    samples = len(train) * args.epochs
    print(f"small BART (d_model 256, 2+2 layers, KoBART tokenizer), {len(train)} real rows x {args.epochs} epoch(s), batch 8")
    print(f"  pad to max length (512/128), shuffled : {padded:7.1f} s  {samples / padded:6.1f} samples/s")
    print(f"  dynamic padding + length grouping      : {dynamic:7.1f} s  {samples / dynamic:6.1f} samples/s")
    print(f"  ... with MLflow tracking on            : {tracked:7.1f} s  {samples / tracked:6.1f} samples/s")
    print(f"speed-up over max-length padding: {padded / dynamic:.2f}x (target >= 1.9x)")
    print(f"tracking overhead: {100 * (tracked / dynamic - 1):+.1f}% (target <= 5%)")


if __name__ == "__main__":
    main()
