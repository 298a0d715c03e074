"""Per-epoch checkpoints: the state a training resumes from, and the best model so far. Owns their on-disk format.

Layout of a checkpoint root (local: `$DIALOGSUM_CACHE_DIR/checkpoints/<run_id>`; logged: `checkpoints/` of the run):

    last/state/             accelerate's `save_state`: model (LoRA: the trainable parameters only), optimizer,
                            scheduler, RNG states of every process, gradient scaler
    last/trainer_state.json epoch, global step, best-so-far, every finished epoch's metrics, the best predictions
    best/                   the best epoch's servable model (`serving.saved_model.write_trained`)

Each save replaces the previous one (written beside it, then swapped in), so a run stores at most two checkpoints
however many epochs it has, and a kill during a save leaves the previous one whole. `checkpoint.keep` says which
of the two are logged to the run: `both` (default), `last`, `best` or `none`. The local root is removed when the
training ends well; after a failure it stays, so `dialogsum train --resume RUN_ID` can continue from it even when
the tracking store was what failed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LAST = "last"
BEST = "best"
STATE_DIR = "state"
TRAINER_STATE_FILE = "trainer_state.json"
ARTIFACT_DIR = "checkpoints"
TRAINABLE_FILE = "trainable_params.safetensors"
CHECKPOINT_EPOCH_TAG = "dialogsum.checkpoint_epoch"  # the epoch of the run's logged `checkpoints/last`


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is missing or does not fit the run."""


@dataclass
class TrainerState:
    """Where a training stands after an epoch: everything besides tensors that resuming needs."""

    epoch: int = 0
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # [{"epoch": n, "metrics": {...}}]
    best_predictions: list[str] = field(default_factory=list)
    best_rows: list[dict[str, float]] = field(default_factory=list)

    def write(self, folder: Path) -> None:
        (folder / TRAINER_STATE_FILE).write_text(json.dumps(asdict(self), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def read(cls, folder: Path) -> "TrainerState":
        return cls(**json.loads((folder / TRAINER_STATE_FILE).read_text(encoding="utf-8")))


def checkpoint_root(run_id: str) -> Path:
    from dialogsum.models import cache_dir

    return cache_dir() / "checkpoints" / run_id


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace `folder` by the finished `tmp` (the old one is removed only once the new one is whole)."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


class Checkpoints:
    """Saves and restores a training's checkpoints under `root`; the main process logs them to the active run."""

    def __init__(self, root: Path, keep: str, accelerator, *, trainable_only: bool, track: bool):
        self.root = root
        self.keep = keep
        self.accelerator = accelerator
        self.track = track
        if trainable_only:  # LoRA: the frozen base is rebuilt from its source; only the adapter is state
            accelerator.register_save_state_pre_hook(_save_trainable_only)
            accelerator.register_load_state_pre_hook(_load_trainable_only)

    @property
    def last(self) -> Path:
        return self.root / LAST

    @property
    def best(self) -> Path:
        return self.root / BEST

    def save_last(self, state: TrainerState) -> None:
        """Every process writes its part (RNG states); the main process writes the trainer state and logs. With
        `keep: none` nothing is saved."""
        if self.keep == "none":
            return
        tmp = self.root / f"{LAST}.tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp / STATE_DIR))
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        state.write(tmp)
        _swap_in(tmp, self.last)
        if self.track and self.keep in ("last", "both"):
            import mlflow

            # The trainer state goes last: a logged checkpoint with a trainer state is whole.
            mlflow.log_artifacts(str(self.last / STATE_DIR), f"{ARTIFACT_DIR}/{LAST}/{STATE_DIR}")
            mlflow.log_artifact(str(self.last / TRAINER_STATE_FILE), f"{ARTIFACT_DIR}/{LAST}")
            mlflow.set_tag(CHECKPOINT_EPOCH_TAG, str(state.epoch))

    def save_best(self, write_model) -> Path:
        """`write_model(folder)` writes the servable model; it replaces the previous best (main process only)."""
        tmp = self.root / f"{BEST}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_model(tmp)
        _swap_in(tmp, self.best)
        if self.track and self.keep in ("best", "both"):
            import mlflow

            mlflow.log_artifacts(str(self.best), f"{ARTIFACT_DIR}/{BEST}")
        return self.best

    def restore(self) -> TrainerState:
        """Load the last checkpoint into the prepared objects (every process) and return its trainer state."""
        if not (self.last / TRAINER_STATE_FILE).is_file():
            raise CheckpointError(f"no checkpoint to resume from in {self.last}")
        self.accelerator.load_state(str(self.last / STATE_DIR))
        return TrainerState.read(self.last)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def remove_unless_resumable(self) -> None:
        """After a failure: keep the local checkpoints for `--resume`, unless `keep: none` saved nothing to resume
        from (the best model's folder is then only temporary)."""
        if self.keep == "none":
            self.remove()


def fetch_checkpoint(run_id: str, root: Path) -> TrainerState:
    """Make `root/last` the newest of the local checkpoint and the one logged to the run, and bring the logged best
    model when there is none locally; returns the trainer state to resume from.

    The local one wins when it is at least as new (the store may have failed before it was logged)."""
    import mlflow

    client = mlflow.MlflowClient()
    local = TrainerState.read(root / LAST) if (root / LAST / TRAINER_STATE_FILE).is_file() else None
    run = client.get_run(run_id)
    logged_epoch = int(run.data.tags.get(CHECKPOINT_EPOCH_TAG, "0"))
    if local is None or local.epoch < logged_epoch:
        if not logged_epoch:
            raise CheckpointError(f"run {run_id} has no checkpoint to resume from: it logged none (checkpoint.keep "
                                  f"'none' or 'best', or it stopped in its first epoch) and none is left in {root}")  # fmt: skip
        _download(run_id, LAST, root)
    if not (root / BEST).is_dir() and client.list_artifacts(run_id, f"{ARTIFACT_DIR}/{BEST}"):
        _download(run_id, BEST, root)
    return TrainerState.read(root / LAST)


def _download(run_id: str, name: str, root: Path) -> None:
    import mlflow

    tmp = root / f"{name}.download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    local_path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{ARTIFACT_DIR}/{name}", dst_path=str(tmp))
    _swap_in(Path(local_path), root / name)
    shutil.rmtree(tmp, ignore_errors=True)


def _trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _save_trainable_only(models: list, weights: list, output_dir: str) -> None:
    """accelerate save hook: write only the trainable parameters (a LoRA adapter and the tag-token rows) and take
    the full state dict out of what accelerate saves."""
    from accelerate import PartialState
    from safetensors.torch import save_file

    for i in reversed(range(len(models))):
        if PartialState().is_main_process:  # the parameters are the same on every process
            names = _trainable_names(models[i])
            tensors = {k: v.detach().contiguous().cpu() for k, v in weights[i].items() if k in names}
            save_file(tensors, os.path.join(output_dir, f"{i}_{TRAINABLE_FILE}"))
        weights.pop(i)


def _load_trainable_only(models: list, input_dir: str) -> None:
    """accelerate load hook: the counterpart of `_save_trainable_only`; every trainable parameter must be there."""
    from safetensors.torch import load_file

    for i in reversed(range(len(models))):
        tensors = load_file(os.path.join(input_dir, f"{i}_{TRAINABLE_FILE}"))
        missing = _trainable_names(models[i]) - set(tensors)
        if missing:
            raise CheckpointError(f"{input_dir}: the checkpoint lacks trainable parameters {sorted(missing)[:5]}")
        models[i].load_state_dict(tensors, strict=False)
        models.pop(i)
