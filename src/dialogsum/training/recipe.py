"""The `train` recipe: one model, one MLflow run that tells its whole story.

Flow: preflight (no weights) → data roles (train fits, validation chooses the epoch, test reports) → tokenizer
and model → tokenize (cached) → epochs of training with per-epoch validation (loss and Korean ROUGE of generated
summaries, logged with step = epoch) and a checkpoint (`training.checkpoints`) → the best epoch's model, loaded back
as it will be served, scored once on the test rows → logged as a pyfunc with its prediction tables and ROUGE curve.

`dialogsum train --resume RUN_ID` reopens a killed or failed run and continues from its last checkpoint: the same
run id, each epoch's metrics logged once, step counters continued. Training runs on accelerate, so
`accelerate launch --num_processes N -m dialogsum train ...` trains with DDP; every process generates its share of
the validation summaries, and only the main process talks to MLflow.
"""

from __future__ import annotations

import math
import tempfile
import time
import uuid
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dialogsum.config import ConfigError, ModelConfig, flatten, load_model_config, model_registry, with_overrides
from dialogsum.data import DataRoles, DialogueSet, dataset_rows_digest, load_data_roles
from dialogsum.precision import detect_device
from dialogsum.preflight import PreflightError, check_model
from dialogsum.training.checkpoints import CheckpointError, Checkpoints, TrainerState, checkpoint_root, fetch_checkpoint

SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "final")
RESUMED_FROM_TAG = "dialogsum.resumed_from_epoch"
WEIGHTS_COMMIT_TAG = "dialogsum.weights.commit"  # the HF cache snapshot the hub weights were loaded from
TOKENIZER_COMMIT_TAG = "dialogsum.tokenizer.commit"
CLEARED_ON_RESUME = ("error.type", "error.stage", "error.message", "dialogsum.reason", "mlflow.note.content")
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
    from dialogsum.metrics import role_scores

    metrics, rows = role_scores(prefix, predictions, data.summaries)
    gen_len = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions) / max(len(predictions), 1)
    metrics[f"{prefix}_gen_len"] = gen_len
    return EpochResult(0, metrics, predictions, rows)


def validate(model, tokenizer, cfg: ModelConfig, val_set, data: DialogueSet, collate, accelerator, progress) -> EpochResult:
    """Teacher-forced validation loss (token-level, so any split of the rows gives the same value) and generated
    summaries scored with Korean ROUGE. Every process takes its share of the rows
    (`split_between_processes`); the main process gathers them in row order and scores."""
    import torch
    from accelerate.utils import gather_object
    from torch.utils.data import DataLoader

    from dialogsum.generate import summarize

    model.eval()
    with accelerator.split_between_processes(list(range(len(data)))) as mine:
        loader = DataLoader(val_set.select(mine), batch_size=cfg.training.eval_batch_size, collate_fn=collate)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum of token losses, tokens)
        with torch.inference_mode():
            for batch in loader:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    loss = model(**batch).loss
                tokens = (batch["labels"] != -100).sum()
                loss_sum += torch.stack([loss.double() * tokens, tokens.double()])
        task = progress.add_task("generate", total=len(mine))
        with accelerator.autocast():
            predictions = summarize(model, tokenizer, cfg, [data.dialogues[i] for i in mine],
                                    cfg.training.eval_batch_size, on_batch=lambda n: progress.advance(task, n))  # fmt: skip
        progress.remove_task(task)
    total = accelerator.reduce(loss_sum, reduction="sum")
    predictions = gather_object(predictions) if accelerator.num_processes > 1 else predictions
    model.train()
    if not accelerator.is_main_process:
        return EpochResult(0, {}, [], [])
    result = score_predictions("val", predictions, data, tokenizer)
    result.metrics["val_loss"] = (total[0] / total[1].clamp(min=1)).item()
    return result


def generation_shares(rows: int, processes: int) -> list[int]:
    """How many validation rows each process generates (as `split_between_processes` divides them)."""
    base, extra = divmod(rows, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up, then linear decay to 0 (transformers' `get_linear_schedule_with_warmup`, whose import
    pulls in peft and bitsandbytes: 10 s more per training process here)."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


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
    """Test scores of a saved-model folder, loaded exactly as serving loads it (`saved_model.load`)."""
    import torch

    from dialogsum.generate import summarize
    from dialogsum.serving import saved_model

    model, tokenizer, cfg = saved_model.load(model_dir)
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
    log_model: bool = True,
    run_id: str | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train on `roles.train`, choose the epoch on `roles.validation`, report on `roles.test` (when given and a
    model is kept). With `track`, metrics and artifacts go to the active MLflow run. Checkpoints live under
    `checkpoint_root(run_id)`; with `resume`, training continues from the last one there. `on_epoch(epoch,
    metrics)` is called on the main process after each epoch's metrics are logged (a sweep's pruner raises
    `RunPruned` from it)."""
    import mlflow
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from rich.progress import Progress
    from torch.utils.data import DataLoader

    from dialogsum.features import EpochSeededSampler, build_collator, tokenize_rows
    from dialogsum.models import build_model, cache_dir, load_tokenizer, quantized_linear_layers
    from dialogsum.precision import resolve_precision
    from dialogsum.serving import saved_model

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
    # Every process checkpoints into the main process's folder (each writes its own RNG states there).
    root = broadcast_object_list([str(checkpoint_root(run_id or f"untracked-{uuid.uuid4().hex}"))])[0]

    # The main process fills the tokenizer/random-init caches first; the others then read them (transformers writes
    # checkpoints from rank 0 only, so a cache entry saved by another rank would be empty).
    with stage("load"), accelerator.main_process_first():
        tokenizer = load_tokenizer(cfg, train_data.dialogues + train_data.summaries)
        built = build_model(cfg, tokenizer, policy)
        model = built.model
    if track:  # weights and tokenizer from the hub: the commits they resolved to (a later load uses the same)
        mlflow.set_tags({tag: commit for tag, commit in ((WEIGHTS_COMMIT_TAG, built.weights_commit),
                                                         (TOKENIZER_COMMIT_TAG, built.tokenizer_commit)) if commit})  # fmt: skip
    if track and not resume:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        quantized = quantized_linear_layers(model)
        mlflow.log_params({"model.trainable_params": trainable, "model.total_params": sum(p.numel() for p in model.parameters()),
                           "model.quantized_linear_layers": quantized,
                           "model.dialogue_tag_tokens": len(set(built.tag_token_ids)), "model.vocab_size": len(tokenizer), "model.weights_source": built.base_source,
                           "runtime.precision": policy.label, "runtime.num_processes": accelerator.num_processes,
                           "runtime.generation_rows_per_process": ",".join(map(str, generation_shares(len(validation), accelerator.num_processes)))})  # fmt: skip

    with stage("tokenize"), accelerator.main_process_first():
        cache = cache_dir() / "tokenized"
        train_set = tokenize_rows(cfg, tokenizer, train_data.dialogues, train_data.summaries, cache)
        val_set = tokenize_rows(cfg, tokenizer, validation.dialogues, validation.summaries, cache)
    collate = build_collator(cfg, tokenizer)
    sampler = EpochSeededSampler([len(ids) for ids in train_set["input_ids"]], t.batch_size, t.seed,
                                 t.group_by_length and not t.pad_to_max_length)  # fmt: skip
    train_loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, collate_fn=collate)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    # Counted over all processes' batches: the prepared scheduler advances num_processes steps per optimizer step.
    steps_per_epoch = math.ceil(len(train_loader) / t.gradient_accumulation_steps)
    scheduler = linear_schedule(optimizer, t.warmup_steps, steps_per_epoch * t.epochs)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    checkpoints = Checkpoints(Path(root), cfg.checkpoint.keep, accelerator, trainable_only=cfg.lora is not None, track=track)
    try:
        state = TrainerState()
        logged_loss_steps = 0
        if resume:
            with stage("resume"):
                state = checkpoints.restore()
                result.history = [EpochResult(h["epoch"], h["metrics"], [], []) for h in state.history]
                result.best = _best_of(state, result.history)
                if track:
                    logged_loss_steps = _log_missing_epochs(result.run_id, result.history)
                    mlflow.set_tag(RESUMED_FROM_TAG, str(state.epoch))
        window: list[float] = []
        pending: list = []  # this epoch's asynchronous train_loss logging
        progress = Progress(disable=not accelerator.is_main_process, transient=True)
        with progress:
            for epoch in range(state.epoch + 1, t.epochs + 1):
                train_loader.set_epoch(epoch)  # the shuffle of epoch n is the same whether or not the run was resumed
                model.train()
                epoch_start = time.perf_counter()
                task = progress.add_task(f"epoch {epoch}/{t.epochs}", total=len(train_loader))
                with stage("train"):

                    def on_step(loss: float, synced: bool) -> None:
                        nonlocal window
                        window.append(loss)
                        result.train_losses.append(loss)
                        progress.advance(task)
                        if not synced:
                            return
                        state.global_step += 1
                        if track and state.global_step % t.log_every_n_steps == 0:
                            if state.global_step > logged_loss_steps:  # a resumed run logged these steps already
                                pending.append(mlflow.log_metrics(
                                    {"train_loss": sum(window) / len(window), "learning_rate": scheduler.get_last_lr()[0]},
                                    step=state.global_step,
                                    synchronous=False,
                                ))  # fmt: skip
                            window = []

                    seen = train_epoch(model, train_loader, optimizer, scheduler, accelerator, t.max_grad_norm, on_step)
                progress.remove_task(task)
                epoch_time = time.perf_counter() - epoch_start
                with stage("validate"):
                    unwrapped = accelerator.unwrap_model(model)
                    evaluation = validate(unwrapped, tokenizer, cfg, val_set, validation, collate, accelerator, progress)
                state.epoch = epoch
                if accelerator.is_main_process:
                    evaluation.epoch = epoch
                    evaluation.metrics.update({"epoch_time_s": epoch_time, "train_samples_per_s": seen / epoch_time})
                    result.history.append(evaluation)
                    state.history.append({"epoch": epoch, "metrics": evaluation.metrics})
                    value = evaluation.metrics[t.best_metric]
                    if _is_better(value, state.best_value, t.best_metric_mode):
                        state.best_value, state.best_epoch, result.best = value, epoch, evaluation
                        state.best_predictions, state.best_rows = evaluation.predictions, evaluation.rows
                        if log_model:
                            with stage("checkpoint"):
                                checkpoints.save_best(lambda folder: saved_model.write_trained(folder, built, cfg, unwrapped))
                with stage("checkpoint"):
                    checkpoints.save_last(state)
                if track:  # after the checkpoint: an epoch whose metrics are logged can always be resumed after
                    for operations in pending:  # a step that failed to log fails the run, never leaves a silent gap
                        operations.wait()
                    pending.clear()
                    mlflow.log_metrics(evaluation.metrics, step=epoch)
                if on_epoch is not None and accelerator.is_main_process:
                    on_epoch(epoch, evaluation.metrics)
            accelerator.wait_for_everyone()

        if accelerator.is_main_process and log_model and result.best is not None:
            if not checkpoints.best.is_dir():
                raise CheckpointError(f"the best epoch's model ({state.best_epoch}) is not in {checkpoints.best}: it was "
                                      "not kept (checkpoint.keep) and this run resumed after it")  # fmt: skip
            if roles.test is not None:
                with stage("test"):
                    result.test = evaluate_saved_model(checkpoints.best, roles.test, t.eval_batch_size)
        if track and result.best is not None:
            with stage("save"):
                _log_outcome(cfg, roles, result, checkpoints.best if log_model else None)
        accelerator.end_training()
        if accelerator.is_main_process:
            checkpoints.remove()  # the training ended well: the local copies are no longer needed
    except BaseException:
        if accelerator.is_main_process:
            checkpoints.remove_unless_resumable()
        raise
    return result


def _best_of(state: TrainerState, history: list[EpochResult]) -> EpochResult | None:
    for h in history:
        if h.epoch == state.best_epoch:
            return EpochResult(h.epoch, h.metrics, state.best_predictions, state.best_rows)
    return None


def _log_missing_epochs(run_id: str, history: list[EpochResult]) -> int:
    """Log the checkpointed epochs whose metrics the interrupted run did not log (killed between its checkpoint
    and its metrics); returns the last `train_loss` step it logged, so those steps are not logged twice."""
    import mlflow

    client = mlflow.MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "val_final")}
    for h in history:
        if h.epoch not in logged:
            mlflow.log_metrics(h.metrics, step=h.epoch)
    return max((m.step for m in client.get_metric_history(run_id, "train_loss")), default=0)


def _prediction_table(data: DialogueSet, outcome: EpochResult) -> list[dict[str, Any]]:
    return [
        {"fname": r.fname, "dialogue": r.dialogue, "reference": r.summary, "prediction": p, **scores}
        for r, p, scores in zip(data.rows, outcome.predictions, outcome.rows)
    ]


def _log_outcome(cfg: ModelConfig, roles: DataRoles, result: TrainResult, model_dir: Path | None) -> None:
    """The best epoch's validation metrics (`best_val_*`) and table, the test metrics and table, the curve, the model."""
    import mlflow

    from dialogsum.serving.pyfunc import log_summarizer
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
        log_summarizer(model_dir, cfg.name, cfg.generation, roles.validation.dialogues[:n])


def roles_for(cfg: ModelConfig, train_path, validation_path, test_path) -> DataRoles:
    t = cfg.training
    return load_data_roles(train_path, validation_path, test_path, validation_fraction=t.validation_fraction,
                           limits=(t.max_train_samples, t.max_validation_samples, t.max_test_samples))  # fmt: skip


def train_model(
    model_name: str | None,
    *,
    train_path: str | Path | None = None,
    validation_path: str | Path | None = None,
    test_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> str | None:
    """Resolve the config, open the run (or join the one `mlflow run` created, or reopen `resume_run_id`), train;
    returns the run id. Non-main processes of a distributed launch train without tracking and return None. `tags`
    are added to the run's; `on_epoch` goes to `run_training`."""
    import mlflow
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from dialogsum.tracking import MODEL_TAG, configure_tracking, log_config, tracked_run, ui_hint

    # cpu=True on a CPU-only machine makes a torchrun launch a gloo process group (MULTI_CPU); without it every
    # rank would think it is the main process. It must match the Accelerator's `cpu` in run_training.
    launch = PartialState(cpu=not torch.cuda.is_available())
    if not launch.is_main_process:  # the main process resolves the config and opens the run; the others follow
        config, run_id = broadcast_object_list([None, None])
        cfg = ModelConfig.model_validate(config)
        run_training(cfg, roles_for(cfg, train_path, validation_path, test_path), track=False, run_id=run_id,
                     resume=bool(resume_run_id))  # fmt: skip
        return None
    configure_tracking()
    resumed_roles = None
    if resume_run_id:  # refused before the run is reopened, so a refusal leaves it as it was
        cfg = resumed_config(resume_run_id, model_name, overrides)
        resumed_roles = roles_for(cfg, train_path, validation_path, test_path)
        check_same_rows(mlflow.get_run(resume_run_id), resumed_roles)
    elif model_name:
        cfg = load_model_config(model_name, overrides)
    else:
        raise ConfigError("give --model NAME, or --resume RUN_ID to continue a run")
    device = detect_device()
    tags = {MODEL_TAG: cfg.name, "dialogsum.family": cfg.family, "dialogsum.task": cfg.task, "dialogsum.device": device.name, **(tags or {})}
    with tracked_run(run_name=run_name or cfg.name, kind="train", tags=tags, parent_run_id=parent_run_id,
                     run_id=resume_run_id, system_metrics=True) as run:  # fmt: skip
        if resume_run_id:
            _clear_error_tags(run.run_id)
        else:
            log_config(cfg.model_dump())
        with run.stage_of("preflight"):
            verdict = check_model(cfg, device)
            if not verdict.ok:
                raise PreflightError(f"{cfg.name} blocked by preflight: " + "; ".join(verdict.reasons))
            mlflow.set_tag("dialogsum.precision", verdict.precision or "")
        with run.stage_of("data"):
            if resumed_roles is not None:
                roles = resumed_roles
                fetch_checkpoint(run.run_id, checkpoint_root(run.run_id))
            else:
                roles = roles_for(cfg, train_path, validation_path, test_path)
                _log_datasets(roles)
        if launch.num_processes > 1:
            broadcast_object_list([cfg.model_dump(), run.run_id])
        result = run_training(cfg, roles, run_ctx=run, run_id=run.run_id, resume=bool(resume_run_id), on_epoch=on_epoch)
        _print_summary(cfg, result, ui_hint(run.run_id))
        return run.run_id


def resumed_config(run_id: str, model_name: str | None, overrides: dict[str, Any] | None) -> ModelConfig:
    """The config the run was trained with, its `revision` pinned to the hub commit the run loaded. A model name or
    overrides given with --resume must not change it: a difference in any key is refused, naming the keys."""
    import mlflow
    import yaml

    try:
        path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml"))
    except Exception as e:
        raise CheckpointError(f"run {run_id} cannot be resumed: its config.yaml is not readable ({e})") from e
    logged = ModelConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    if model_name and model_registry().resolve(model_name) != logged.name:
        raise ConfigError(f"--resume {run_id}: the run trained '{logged.name}', not '{model_name}'")
    asked = with_overrides(logged, overrides, path) if overrides else logged
    before, after = flatten(logged.model_dump()), flatten(asked.model_dump())
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        details = "; ".join(f"{k}: {before.get(k)!r} → {after.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume {run_id}: the config differs from the run's in {len(changed)} key(s): {details}. "
                          "A resumed run continues the same training; start a new run to change it")  # fmt: skip
    commit = mlflow.get_run(run_id).data.tags.get(WEIGHTS_COMMIT_TAG, "")
    return logged.model_copy(update={"revision": commit}) if commit else logged


def check_same_rows(run, roles: DataRoles) -> None:
    """A resumed run must see the rows it started with: the same training file and row count, and the same
    validation and test rows (by digest)."""
    from dialogsum.tracking import TEST_ROWS_TAG, VAL_ROWS_TAG

    params, tags = run.data.params, run.data.tags
    now = {"data.training.file_digest": roles.train.report.digest, "data.training.rows": str(len(roles.train)),
           VAL_ROWS_TAG: dataset_rows_digest(roles.validation),
           TEST_ROWS_TAG: dataset_rows_digest(roles.test) if roles.test else None}  # fmt: skip
    before = {k: params.get(k, tags.get(k)) for k in now}
    changed = [k for k in now if before[k] != now[k]]
    if changed:
        raise CheckpointError(f"--resume {run.info.run_id}: the data differs from the run's in {', '.join(changed)}; "
                              "give the same --train-data/--validation-data/--test-data as the run was started with")  # fmt: skip


def _clear_error_tags(run_id: str) -> None:
    """A resumed run no longer carries the error of the attempt that stopped it (its error artifacts stay)."""
    import mlflow

    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    for key in CLEARED_ON_RESUME:
        if key in tags:
            client.delete_tag(run_id, key)


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
