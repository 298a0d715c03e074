"""The `train` recipe: one model, one MLflow run that tells its whole story.

Flow: preflight (no weights) → data roles (train fits, validation chooses the epoch, test reports) → tokenizer
and model → tokenize (cached) → epochs of training with per-epoch validation (loss and Korean ROUGE of generated
summaries, logged with step = epoch) → the best epoch's model, loaded back as it will be served, scored once on
the test rows → logged as a pyfunc with its prediction tables and ROUGE curve. Training runs on accelerate, so
`accelerate launch --num_processes N -m dialogsum train ...` trains with DDP; only the main process talks to
MLflow and evaluates.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialogsum.config import ModelConfig, load_model_config
from dialogsum.data import DataRoles, DialogueSet, dataset_rows_digest, load_data_roles
from dialogsum.precision import detect_device
from dialogsum.preflight import PreflightError, check_model

SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "final")
EPOCH_METRICS = ("val_loss", "val_rouge1", "val_rouge2", "val_rougeL", "val_final", "val_gen_len",
                 "val_final_ci95_low", "val_final_ci95_high")  # fmt: skip


@dataclass
class EpochResult:
    epoch: int
    metrics: dict[str, float]
    predictions: list[str]
    rows: list[dict[str, float]]


@dataclass
class TrainResult:
    run_id: str | None
    best: EpochResult | None = None
    history: list[EpochResult] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    test: EpochResult | None = None


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def _log_datasets(roles: DataRoles) -> None:
    """Each role as an MLflow dataset input (source, digest), its row count, file digest and how its rows were
    chosen; the digests of the exact validation and test rows as tags."""
    import mlflow
    import pandas as pd

    from dialogsum.tracking import TEST_ROWS_TAG, VAL_ROWS_TAG, log_dataset_input

    for context, data in (("training", roles.train), ("validation", roles.validation), ("testing", roles.test)):
        if data is None:
            continue
        frame = pd.DataFrame([r.__dict__ for r in data.rows])
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about the tie
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(frame, source=str(Path(data.report.path).resolve()), name=Path(data.report.path).name)
        log_dataset_input(dataset, context=context)
        mlflow.log_params({f"data.{context}.rows": len(data), f"data.{context}.file_digest": data.report.digest,
                           f"data.{context}.selection": data.report.selection or "all rows"})  # fmt: skip
        if data.report.cleaned_cells:
            mlflow.log_dict(dict(data.report.cleaned_cells), f"data/{context}_cleaning.json")
    mlflow.set_tags({VAL_ROWS_TAG: dataset_rows_digest(roles.validation),
                     **({TEST_ROWS_TAG: dataset_rows_digest(roles.test)} if roles.test else {})})  # fmt: skip


def score_predictions(prefix: str, predictions: list[str], data: DialogueSet, tokenizer) -> EpochResult:
    """Korean ROUGE of `predictions` against `data`'s references as `<prefix>_*` metrics, with the 95% bootstrap
    interval of `<prefix>_final` over the rows and the mean generated length in tokens."""
    from dialogsum.metrics import aggregate, score_rows
    from dialogsum.stats import bootstrap_mean

    rows = score_rows(predictions, data.summaries)
    interval = bootstrap_mean([r["final"] for r in rows])
    gen_len = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions) / max(len(predictions), 1)
    metrics = {f"{prefix}_{k}": v for k, v in aggregate(rows).items()}
    metrics.update({f"{prefix}_final_ci95_low": interval.low, f"{prefix}_final_ci95_high": interval.high, f"{prefix}_gen_len": gen_len})
    return EpochResult(0, metrics, predictions, rows)


def _validate(model, tokenizer, cfg: ModelConfig, loader, data: DialogueSet, accelerator, progress) -> EpochResult:
    """Teacher-forced validation loss, then generated summaries scored with Korean ROUGE."""
    import torch

    from dialogsum.generate import summarize

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                loss = model(**batch).loss
            total += loss.item() * batch["input_ids"].shape[0]
            count += batch["input_ids"].shape[0]
    task = progress.add_task("generate", total=len(data))
    with accelerator.autocast():
        predictions = summarize(
            model, tokenizer, cfg, data.dialogues, cfg.training.eval_batch_size, on_batch=lambda n: progress.advance(task, n)
        )
    progress.remove_task(task)
    result = score_predictions("val", predictions, data, tokenizer)
    result.metrics["val_loss"] = total / max(count, 1)
    model.train()
    return result


def _is_better(candidate: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return candidate > best if mode == "max" else candidate < best


def _rouge_curve_png(history: list[EpochResult], path: Path) -> Path:
    from dialogsum import figures

    epochs = [h.epoch for h in history]
    fig, ax = figures.subplots(figsize=(5, 3.2), dpi=100)
    for key in ("val_rouge1", "val_rouge2", "val_rougeL"):
        ax.plot(epochs, [h.metrics[key] for h in history], marker="o", label=key.removeprefix("val_"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation F1 (Korean morphemes)")
    ax.set_xticks(epochs)
    ax.legend()
    ax.grid(alpha=0.3)
    return figures.save(fig, path)


def train_epoch(model, loader, optimizer, scheduler, accelerator, max_grad_norm: float, on_step) -> int:
    """One pass over `loader` with gradient accumulation, clipping and the accelerator's autocast/scaler;
    calls `on_step(loss, synced)` after every micro-batch with the loss averaged over all processes, and returns
    the number of samples seen (all ranks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen = 0
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        seen += batch["input_ids"].shape[0] * accelerator.num_processes
        on_step(accelerator.reduce(loss.detach(), reduction="mean").item(), accelerator.sync_gradients)
    return seen


def evaluate_saved_model(model_dir: Path, data: DialogueSet, batch_size: int) -> EpochResult:
    """Test scores of a saved model folder, loaded exactly as serving loads it (`load_for_inference`)."""
    import torch

    from dialogsum.generate import summarize
    from dialogsum.models import load_for_inference

    model, tokenizer, cfg = load_for_inference(model_dir)
    predictions = summarize(model, tokenizer, cfg, data.dialogues, batch_size)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return score_predictions("test", predictions, data, tokenizer)


def run_training(
    cfg: ModelConfig,
    roles: DataRoles,
    *,
    track: bool = True,
    run_ctx=None,
    output_dir: Path | None = None,
    log_model: bool = True,
) -> TrainResult:
    """Train on `roles.train`, choose the epoch on `roles.validation`, report on `roles.test` (when given and a
    model is kept). With `track`, metrics and artifacts go to the active MLflow run."""
    import mlflow
    import torch
    from accelerate import Accelerator
    from rich.progress import Progress
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from dialogsum.features import EpochSeededSampler, build_collator, tokenize_rows
    from dialogsum.models import build_model, cache_dir, load_tokenizer, save_for_inference
    from dialogsum.precision import resolve_precision

    t = cfg.training
    stage = run_ctx.stage_of if run_ctx else (lambda _name: nullcontext())
    policy = resolve_precision(cfg.precision, detect_device())
    accelerator = Accelerator(
        mixed_precision=policy.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        cpu=policy.device == "cpu",
    )
    track = track and accelerator.is_main_process
    _seed_everything(t.seed)
    result = TrainResult(mlflow.active_run().info.run_id if track else None)
    train_data, validation = roles.train, roles.validation

    # The main process fills the tokenizer/random-init caches first; the others then read them (transformers writes
    # checkpoints from rank 0 only, so a cache entry saved by another rank would be empty).
    with stage("load"), accelerator.main_process_first():
        tokenizer = load_tokenizer(cfg, train_data.dialogues + train_data.summaries, train_data.report.digest)
        built = build_model(cfg, tokenizer, policy)
        model = built.model
    if track:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        quantized = sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
        mlflow.log_params({"model.trainable_params": trainable, "model.total_params": sum(p.numel() for p in model.parameters()),
                           "model.quantized_linear_layers": quantized,
                           "model.dialogue_tag_tokens": len(set(built.tag_token_ids)), "model.vocab_size": len(tokenizer), "model.weights_source": built.base_source,
                           "runtime.precision": policy.label, "runtime.num_processes": accelerator.num_processes})  # fmt: skip

    with stage("tokenize"), accelerator.main_process_first():
        cache = cache_dir() / "tokenized"
        train_set = tokenize_rows(cfg, tokenizer, train_data.dialogues, train_data.summaries, cache)
        val_set = tokenize_rows(cfg, tokenizer, validation.dialogues, validation.summaries, cache)
    collate = build_collator(cfg, tokenizer)
    sampler = EpochSeededSampler([len(ids) for ids in train_set["input_ids"]], t.batch_size, t.seed,
                                 t.group_by_length and not t.pad_to_max_length)  # fmt: skip
    train_loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size=t.eval_batch_size, collate_fn=collate)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    # Counted over all processes' batches: the prepared scheduler advances num_processes steps per optimizer step.
    steps_per_epoch = math.ceil(len(train_loader) / t.gradient_accumulation_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, t.warmup_steps, steps_per_epoch * t.epochs)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

    best_dir = Path(output_dir or tempfile.mkdtemp(prefix="dialogsum-")) / "summarizer"  # the artifact folder name
    best_value: float | None = None
    global_step, window = 0, []
    progress = Progress(disable=not accelerator.is_main_process, transient=True)
    with progress:
        for epoch in range(1, t.epochs + 1):
            sampler.set_epoch(epoch)
            model.train()
            epoch_start = time.perf_counter()
            task = progress.add_task(f"epoch {epoch}/{t.epochs}", total=len(train_loader))
            with stage("train"):

                def on_step(loss: float, synced: bool) -> None:
                    nonlocal global_step, window
                    window.append(loss)
                    result.train_losses.append(loss)
                    progress.advance(task)
                    if not synced:
                        return
                    global_step += 1
                    if track and global_step % t.log_every_n_steps == 0:
                        mlflow.log_metrics(
                            {"train_loss": sum(window) / len(window), "learning_rate": scheduler.get_last_lr()[0]},
                            step=global_step,
                            synchronous=False,
                        )
                        window = []

                seen = train_epoch(model, train_loader, optimizer, scheduler, accelerator, t.max_grad_norm, on_step)
            progress.remove_task(task)
            epoch_time = time.perf_counter() - epoch_start
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:
                continue
            with stage("validate"):
                unwrapped = accelerator.unwrap_model(model)
                evaluation = _validate(unwrapped, tokenizer, cfg, val_loader, validation, accelerator, progress)
            evaluation.epoch = epoch
            evaluation.metrics.update({"epoch_time_s": epoch_time, "train_samples_per_s": seen / epoch_time})
            result.history.append(evaluation)
            if track:
                mlflow.log_metrics(evaluation.metrics, step=epoch, synchronous=False)
            value = evaluation.metrics[t.best_metric]
            if _is_better(value, best_value, t.best_metric_mode):
                best_value, result.best = value, evaluation
                if log_model:
                    with stage("save"):
                        save_for_inference(built, cfg, best_dir, unwrapped)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process and log_model and roles.test is not None and result.best is not None:
        with stage("test"):
            result.test = evaluate_saved_model(best_dir, roles.test, t.eval_batch_size)
    if track and result.best is not None:
        with stage("save"):
            _log_outcome(cfg, roles, result, best_dir if log_model else None)
    accelerator.end_training()
    return result


def _prediction_table(data: DialogueSet, outcome: EpochResult) -> list[dict[str, Any]]:
    return [
        {"fname": r.fname, "dialogue": r.dialogue, "reference": r.summary, "prediction": p, **scores}
        for r, p, scores in zip(data.rows, outcome.predictions, outcome.rows)
    ]


def _log_outcome(cfg: ModelConfig, roles: DataRoles, result: TrainResult, model_dir: Path | None) -> None:
    """The best epoch's validation metrics (`best_val_*`) and table, the test metrics and table, the curve, the model."""
    import mlflow

    from dialogsum.serving import log_summarizer
    from dialogsum.tracking import TEST_PREDICTIONS_ARTIFACT, log_predictions

    best = result.best
    assert best is not None
    mlflow.flush_async_logging()
    mlflow.log_metrics({f"best_{k}": v for k, v in best.metrics.items() if k in EPOCH_METRICS})
    mlflow.log_metric("best_epoch", best.epoch)
    log_predictions(_prediction_table(roles.validation, best))
    if result.test is not None and roles.test is not None:
        mlflow.log_metrics(result.test.metrics)
        log_predictions(_prediction_table(roles.test, result.test), TEST_PREDICTIONS_ARTIFACT)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifact(str(_rouge_curve_png(result.history, Path(tmp) / "rouge_curve.png")))
    if model_dir is not None:
        n = min(2, len(roles.validation))
        log_summarizer(model_dir, cfg.name, cfg.generation, roles.validation.dialogues[:n], best.predictions[:n])


def roles_for(cfg: ModelConfig, train_path, validation_path, test_path) -> DataRoles:
    t = cfg.training
    return load_data_roles(train_path, validation_path, test_path, validation_fraction=t.validation_fraction,
                           limits=(t.max_train_samples, t.max_validation_samples, t.max_test_samples))  # fmt: skip


def train_model(
    model_name: str,
    *,
    train_path: str | Path | None = None,
    validation_path: str | Path | None = None,
    test_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
) -> str | None:
    """Resolve the config, open the run (or join the one `mlflow run` created), train; returns the run id.

    Non-main processes of a distributed launch train without tracking and return None."""
    import torch
    from accelerate import PartialState

    from dialogsum.tracking import MODEL_TAG, configure_tracking, log_config, tracked_run, ui_hint

    cfg = load_model_config(model_name, overrides)
    # cpu=True on a CPU-only machine makes a torchrun launch a gloo process group (MULTI_CPU); without it every
    # rank would think it is the main process. It must match the Accelerator's `cpu` in run_training.
    if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        run_training(cfg, roles_for(cfg, train_path, validation_path, test_path), track=False)
        return None
    configure_tracking()
    device = detect_device()
    tags = {MODEL_TAG: cfg.name, "dialogsum.family": cfg.family, "dialogsum.task": cfg.task, "dialogsum.device": device.name}
    with tracked_run(run_name=run_name or cfg.name, kind="train", tags=tags, parent_run_id=parent_run_id,
                     system_metrics=True) as run:  # fmt: skip
        log_config(cfg.model_dump())
        with run.stage_of("preflight"):
            verdict = check_model(cfg, device)
            if not verdict.ok:
                raise PreflightError(f"{cfg.name} blocked by preflight: " + "; ".join(verdict.reasons))
            import mlflow

            mlflow.set_tag("dialogsum.precision", verdict.precision or "")
        with run.stage_of("data"):
            roles = roles_for(cfg, train_path, validation_path, test_path)
            _log_datasets(roles)
        result = run_training(cfg, roles, run_ctx=run)
        _print_summary(cfg, result, ui_hint(run.run_id))
        return run.run_id


def _print_summary(cfg: ModelConfig, result: TrainResult, hint: str) -> None:
    import sys

    from dialogsum.output import emit

    rows = [
        {"epoch": f"{h.epoch}{' *' if result.best is h else ''}", "val_loss": f"{h.metrics['val_loss']:.3f}",
         "rouge1": f"{h.metrics['val_rouge1']:.3f}", "rouge2": f"{h.metrics['val_rouge2']:.3f}",
         "rougeL": f"{h.metrics['val_rougeL']:.3f}",
         "final [95% CI]": f"{h.metrics['val_final']:.2f} [{h.metrics['val_final_ci95_low']:.2f}, {h.metrics['val_final_ci95_high']:.2f}]",
         "gen len": f"{h.metrics['val_gen_len']:.1f}", "s": f"{h.metrics['epoch_time_s']:.1f}"}
        for h in result.history
    ]  # fmt: skip
    emit(rows, list(rows[0]) if rows else ["epoch"], f"{cfg.name}: per-epoch validation (Korean ROUGE)", stream=sys.stderr)
    lines = [f"run {result.run_id} (* = best epoch by validation, logged as the model)"]
    if result.test is not None:
        m = result.test.metrics
        lines.append(f"test: final {m['test_final']:.2f} [{m['test_final_ci95_low']:.2f}, {m['test_final_ci95_high']:.2f}] "
                     f"over {len(result.test.rows)} rows (reported, never used to choose)")  # fmt: skip
    lines.append(f"open: {hint}")
    sys.stderr.write("\n".join(lines) + "\n")
