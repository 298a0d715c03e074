"""The `train` recipe: one model, one MLflow run that tells its whole story.

Flow: preflight (no weights) → data → tokenizer and model → tokenize → epochs of training with per-epoch
evaluation (loss and Korean ROUGE of generated summaries, logged with step = epoch) → the best epoch's model
logged as a pyfunc with its predictions table and ROUGE curve. Training runs on accelerate, so
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
from dialogsum.data import DialogueSet, read_dialogues, sample_data_path
from dialogsum.preflight import PreflightError, check_model
from dialogsum.precision import detect_device

EPOCH_METRICS = ("eval_loss", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_final", "eval_gen_len")


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


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def _log_datasets(train: DialogueSet, evaluation: DialogueSet) -> None:
    import mlflow
    import pandas as pd

    from dialogsum.tracking import log_dataset_input

    for data, context in ((train, "training"), (evaluation, "evaluation")):
        frame = pd.DataFrame([r.__dict__ for r in data.rows])
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about the tie
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(frame, source=str(Path(data.report.path).resolve()), name=Path(data.report.path).name)
        log_dataset_input(dataset, context=context)
        mlflow.log_param(f"data.{context}.rows", len(data))
        mlflow.log_param(f"data.{context}.file_digest", data.report.digest)
        if data.report.cleaned_cells:
            mlflow.log_dict(dict(data.report.cleaned_cells), f"data/{context}_cleaning.json")


def _evaluate(model, tokenizer, cfg: ModelConfig, loader, data: DialogueSet, accelerator, progress) -> EpochResult:
    """Teacher-forced eval loss, then generated summaries scored with Korean ROUGE."""
    import torch

    from dialogsum.generate import summarize
    from dialogsum.metrics import aggregate, score_rows

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
    rows = score_rows(predictions, data.summaries)
    scores = aggregate(rows)
    gen_len = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions) / max(len(predictions), 1)
    metrics = {"eval_loss": total / max(count, 1), "eval_gen_len": gen_len}
    metrics.update({f"eval_{k}": v for k, v in scores.items()})
    model.train()
    return EpochResult(0, metrics, predictions, rows)


def _is_better(candidate: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return candidate > best if mode == "max" else candidate < best


def _rouge_curve_png(history: list[EpochResult], path: Path) -> Path:
    from dialogsum import figures

    epochs = [h.epoch for h in history]
    fig, ax = figures.subplots(figsize=(5, 3.2), dpi=100)
    for key in ("eval_rouge1", "eval_rouge2", "eval_rougeL"):
        ax.plot(epochs, [h.metrics[key] for h in history], marker="o", label=key.removeprefix("eval_"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("F1 (Korean morphemes)")
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


def run_training(
    cfg: ModelConfig,
    train_data: DialogueSet,
    eval_data: DialogueSet,
    *,
    track: bool = True,
    run_ctx=None,
    output_dir: Path | None = None,
    log_model: bool = True,
) -> TrainResult:
    """Train and evaluate one model. With `track`, metrics and artifacts go to the active MLflow run."""
    import mlflow
    import torch
    from accelerate import Accelerator
    from rich.progress import Progress
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from dialogsum.features import BatchPlan, Collator, encode_example
    from dialogsum.models import build_model, load_tokenizer, save_for_inference
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

    with stage("tokenize"):
        train_examples = [encode_example(cfg, tokenizer, r.dialogue, r.summary or "") for r in train_data.rows]
        eval_examples = [encode_example(cfg, tokenizer, r.dialogue, r.summary or "") for r in eval_data.rows]
    pad_to = (t.max_source_length, t.max_target_length) if t.pad_to_max_length else None
    collate = Collator(tokenizer.pad_token_id, cfg.task == "seq2seq", pad_to)
    plan = BatchPlan([len(e) for e in train_examples], t.batch_size, t.seed, t.group_by_length and not t.pad_to_max_length)
    train_loader = DataLoader(train_examples, batch_sampler=plan, collate_fn=collate)
    eval_loader = DataLoader(eval_examples, batch_size=t.eval_batch_size, collate_fn=collate)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    # Counted over all processes' batches: the prepared scheduler advances num_processes steps per optimizer step.
    steps_per_epoch = math.ceil(len(plan) / t.gradient_accumulation_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, t.warmup_steps, steps_per_epoch * t.epochs)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

    best_dir = Path(output_dir or tempfile.mkdtemp(prefix="dialogsum-best-"))
    best_value: float | None = None
    global_step, window = 0, []
    progress = Progress(disable=not accelerator.is_main_process, transient=True)
    with progress:
        for epoch in range(1, t.epochs + 1):
            plan.set_epoch(epoch)
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
            with stage("eval"):
                unwrapped = accelerator.unwrap_model(model)
                evaluation = _evaluate(unwrapped, tokenizer, cfg, eval_loader, eval_data, accelerator, progress)
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

    if track and result.best is not None:
        with stage("save"):
            _log_outcome(cfg, eval_data, result, best_dir if log_model else None)
    accelerator.end_training()
    return result


def _log_outcome(cfg: ModelConfig, eval_data: DialogueSet, result: TrainResult, model_dir: Path | None) -> None:
    import mlflow

    from dialogsum.serving import log_summarizer
    from dialogsum.tracking import log_predictions

    best = result.best
    assert best is not None
    mlflow.flush_async_logging()
    mlflow.log_metrics({f"best_{k}": v for k, v in best.metrics.items() if k in EPOCH_METRICS})
    mlflow.log_metric("best_epoch", best.epoch)
    rows = [
        {"fname": r.fname, "dialogue": r.dialogue, "reference": r.summary, "prediction": p, **scores}
        for r, p, scores in zip(eval_data.rows, best.predictions, best.rows)
    ]
    log_predictions(rows)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifact(str(_rouge_curve_png(result.history, Path(tmp) / "rouge_curve.png")))
    if model_dir is not None:
        n = min(2, len(eval_data))
        log_summarizer(model_dir, cfg.generation, eval_data.dialogues[:n], best.predictions[:n])


def load_split(path: str | Path | None, default_split: str, limit: int | None) -> DialogueSet:
    data = read_dialogues(path or sample_data_path(default_split), require_summary=True)
    return data.head(limit)


def train_model(
    model_name: str,
    *,
    train_path: str | Path | None = None,
    eval_path: str | Path | None = None,
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
        train_data = load_split(train_path, "train", cfg.training.max_train_samples)
        eval_data = load_split(eval_path, "dev", cfg.training.max_eval_samples)
        run_training(cfg, train_data, eval_data, track=False)
        return None
    configure_tracking()
    device = detect_device()
    tags = {MODEL_TAG: cfg.name, "dialogsum.family": cfg.family, "dialogsum.task": cfg.task, "dialogsum.device": device.name}
    with tracked_run(run_name=run_name or cfg.name, kind="train", tags=tags, parent_run_id=parent_run_id) as run:
        log_config(cfg.model_dump())
        with run.stage_of("preflight"):
            verdict = check_model(cfg, device)
            if not verdict.ok:
                raise PreflightError(f"{cfg.name} blocked by preflight: " + "; ".join(verdict.reasons))
            import mlflow

            mlflow.set_tag("dialogsum.precision", verdict.precision or "")
        with run.stage_of("data"):
            train_data = load_split(train_path, "train", cfg.training.max_train_samples)
            eval_data = load_split(eval_path, "dev", cfg.training.max_eval_samples)
            _log_datasets(train_data, eval_data)
        result = run_training(cfg, train_data, eval_data, run_ctx=run)
        _print_summary(cfg, result, ui_hint(run.run_id))
        return run.run_id


def _print_summary(cfg: ModelConfig, result: TrainResult, hint: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cfg.name}: per-epoch evaluation (Korean ROUGE)")
    for column in ("epoch", "eval_loss", "rouge1", "rouge2", "rougeL", "final", "gen len", "s"):
        table.add_column(column, justify="right")
    for h in result.history:
        m = h.metrics
        mark = " *" if result.best is h else ""
        table.add_row(f"{h.epoch}{mark}", f"{m['eval_loss']:.3f}", f"{m['eval_rouge1']:.3f}", f"{m['eval_rouge2']:.3f}",
                      f"{m['eval_rougeL']:.3f}", f"{m['eval_final']:.2f}", f"{m['eval_gen_len']:.1f}", f"{m['epoch_time_s']:.1f}")  # fmt: skip
    console = Console(stderr=True)
    console.print(table)
    console.print(f"run {result.run_id} (* = best epoch, logged as the model)\nopen: {hint}")
