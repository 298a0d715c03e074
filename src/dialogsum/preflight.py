"""Preflight: every check that can fail a model, run before any weight is loaded, in seconds.

Per model: config resolves; LoRA targets exist in the family; the precision policy is valid on this device;
4-bit/8-bit quantization is supported by the installed bitsandbytes here; the estimated memory fits; the
weights are reachable (local path, Hugging Face cache, or hub when online: offline answers at once); the data
files are valid. The network probe runs once per call, bounded to 2 seconds. Given rows to measure, each model's
tokenizer (never its weights) measures how many of them its length limits cut (`dialogsum.truncation`): a warning
above a share, never a block.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from dialogsum.config import DEFAULT_TRUNCATION_WARN_SHARE, LORA_TARGETS_BY_FAMILY, ConfigError, ModelConfig, load_model_config
from dialogsum.data import DataError, DialogueSet, read_dialogues
from dialogsum.models import hub_commit
from dialogsum.precision import DeviceInfo, PrecisionError, check_quantization, detect_device, resolve_precision
from dialogsum.truncation import FIT_SHARE, PERCENTILES, TruncationReport, measure_truncation, percent

GIB = 1024**3
MEMORY_HEADROOM = 0.9  # block when the estimate exceeds this share of available memory
_BYTES_PER_WEIGHT = {"4bit": 0.55, "8bit": 1.05}  # incl. quantization constants
_BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}


class PreflightError(RuntimeError):
    """A model that preflight blocks; the message lists every reason."""


@dataclass
class Verdict:
    model: str
    ok: bool = True
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # worth a look before the run; they block nothing
    notes: list[str] = field(default_factory=list)
    estimate_gib: float | None = None
    precision: str | None = None
    config: ModelConfig | None = None
    truncation: TruncationReport | None = None
    truncation_problem: str | None = None  # why truncation was not measured, when rows were given

    def block(self, reason: str) -> None:
        self.ok = False
        self.reasons.append(reason)

    @property
    def label(self) -> str:
        return "ok" if self.ok else "blocked"


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    trainable_state: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.trainable_state + self.activations


def lora_parameter_count(cfg: ModelConfig) -> int:
    """Trainable LoRA parameters: r × (in + out) per targeted projection per layer."""
    if cfg.lora is None:
        return 0
    d = cfg.dimensions
    h, i = d.hidden_size, d.intermediate_size
    shapes = {
        "q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h), "out_proj": (h, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "fc1": (h, i), "fc2": (i, h),
        "query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, i), "dense_4h_to_h": (i, h),
    }  # fmt: skip
    per_layer = sum(cfg.lora.r * sum(shapes[t]) for t in cfg.lora.targets if t in shapes)
    return per_layer * d.num_layers


# Calibrated by `benchmarks/real_size.py` (one training step at real width, peak resident memory; README,
# "Benchmarks"): values kept per token per hidden unit per layer for backward, and fp32 copies of the logits
# (logits, the shifted copy a causal loss makes, log-softmax, their gradient).
# (task, gradient checkpointing) -> values; measured on CPU in fp32: KoBART 9.2, Llama-3.2-3B 10.2 with and 42.4
# without checkpointing; seq2seq with checkpointing is not measured and is assumed to keep as much as without.
ACTIVATION_VALUES = {("seq2seq", False): 10, ("seq2seq", True): 10, ("causal", False): 43, ("causal", True): 11}
LOGIT_COPIES = {"seq2seq": 3, "causal": 4}


def estimate_memory(cfg: ModelConfig, compute_dtype: str) -> MemoryEstimate:
    """Training memory in bytes of one step:
    - weights at their precision (for LoRA; full fine-tuning counts them in the trainable state);
    - trainable state: weights, gradients and AdamW moments in fp32, 16 bytes per trainable parameter; for LoRA the
      adapters, plus one copy of each embedding matrix that holds trainable tag rows (peft rebuilds the matrix with
      the trained rows on every forward);
    - activations: `ACTIVATION_VALUES` per token and hidden unit per layer at the compute dtype (a seq2seq encoder
      layer sees the source, a decoder layer the target), and `LOGIT_COPIES` fp32 copies of the logits of the
      tokens that have labels (the target of a seq2seq model, every token of a causal one)."""
    params = cfg.params_billions * 1e9
    t = cfg.training
    d = cfg.dimensions
    dtype_bytes = _BYTES_PER_DTYPE[compute_dtype]
    embedding = d.vocab_size * d.hidden_size
    if cfg.lora is None:
        weights = 0.0  # full fine-tuning: the weights are part of the trainable state
        trainable = params * 16
    else:
        matrices = 1 if d.tied_embeddings else 2
        per_weight = _BYTES_PER_WEIGHT.get(cfg.quantization, dtype_bytes)
        weights = (params - matrices * embedding) * per_weight + matrices * embedding * dtype_bytes  # embeddings stay unquantized
        trainable = lora_parameter_count(cfg) * 16 + matrices * embedding * dtype_bytes
    if cfg.task == "seq2seq":
        layer_tokens = t.batch_size * (t.max_source_length + t.max_target_length) * d.num_layers / 2
        labelled_tokens = t.batch_size * t.max_target_length
    else:
        layer_tokens = t.batch_size * (t.max_source_length + t.max_target_length) * d.num_layers
        labelled_tokens = t.batch_size * (t.max_source_length + t.max_target_length)
    activations = layer_tokens * d.hidden_size * ACTIVATION_VALUES[cfg.task, t.gradient_checkpointing] * dtype_bytes
    logits = labelled_tokens * d.vocab_size * 4 * LOGIT_COPIES[cfg.task]
    return MemoryEstimate(weights, trainable, activations + logits)


@lru_cache(maxsize=1)
def hub_reachable() -> tuple[bool, str]:
    """(reachable, why not): offline flags answer at once; otherwise one TCP connect, bounded to 2 s."""
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(flag, "").lower() in ("1", "true", "yes"):
            return False, f"{flag} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=2).close()
            result.append(None)
        except OSError as e:
            result.append(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(2.0)
    if not result:
        return False, f"{host} did not answer within 2 s"
    if result[0] is not None:
        return False, f"{host} cannot be reached ({result[0]})"
    return True, ""


def weights_available(source: str, revision: str | None = None) -> tuple[bool, str]:
    """Whether a hub id (at `revision`, default main) or local path can be loaded now: (ok, where or why not)."""
    if Path(source).expanduser().is_dir():
        return True, f"local folder {source}"
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False, f"weights unreachable: '{source}' is neither an existing local folder nor a valid hub id"
    at = f" at revision {revision}" if revision else ""
    if commit := hub_commit(source, revision):
        return True, f"Hugging Face cache (commit {commit}{at and ', pinned'})"
    online, why = hub_reachable()
    if not online:
        return False, f"weights unreachable: '{source}'{at} is not a local folder nor in the Hugging Face cache, and the hub is offline ({why})"
    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError

    try:
        model_info(source, revision=revision, timeout=5)
    except HfHubHTTPError as e:
        return False, f"weights unreachable: hub answered for '{source}': {e}"
    except Exception as e:  # DNS/TLS/timeouts
        return False, f"weights unreachable: '{source}': {type(e).__name__}: {e}"
    return True, "Hugging Face hub"


def check_model(cfg: ModelConfig, device: DeviceInfo) -> Verdict:
    verdict = Verdict(cfg.name, config=cfg)
    if cfg.lora is not None:
        allowed = LORA_TARGETS_BY_FAMILY[cfg.family]
        wrong = [t for t in cfg.lora.targets if t not in allowed]
        if wrong:
            verdict.block(f"LoRA targets {wrong} do not exist in the {cfg.family} family (it has {sorted(allowed)})")
    policy = None
    try:
        policy = resolve_precision(cfg.precision, device)
        verdict.precision = policy.label
    except PrecisionError as e:
        verdict.block(f"precision: {e}")
    try:
        check_quantization(cfg.quantization, device)
    except PrecisionError as e:
        verdict.block(f"quantization: {e}")
    estimate = estimate_memory(cfg, policy.compute_dtype if policy else "float32")
    verdict.estimate_gib = estimate.total / GIB
    if estimate.total > MEMORY_HEADROOM * device.available_bytes:
        verdict.block(
            f"memory: needs ~{estimate.total / GIB:.1f} GiB (weights {estimate.weights / GIB:.1f}, trainable state "
            f"{estimate.trainable_state / GIB:.1f}, activations {estimate.activations / GIB:.1f}) but {device.name} has "
            f"{device.available_bytes / GIB:.1f} GiB available"
        )
    if cfg.source == "hub":
        ok, where = weights_available(cfg.hub_id or "", cfg.revision)
        (verdict.notes.append(f"weights: {where}") if ok else verdict.block(where))
    tokenizer_path = cfg.tokenizer.path
    if tokenizer_path and tokenizer_path != cfg.hub_id:
        ok, where = weights_available(tokenizer_path)
        if not ok:
            verdict.block(where.replace("weights unreachable", "tokenizer unreachable"))
    if cfg.prompt.format == "chat":
        problem, where = chat_template(cfg)
        (verdict.block(problem) if problem else verdict.notes.append(where))
    return verdict


def chat_template(cfg: ModelConfig) -> tuple[str | None, str]:
    """(problem, where): a `chat` prompt needs a tokenizer with a chat template. Read from the tokenizer's files
    (a local folder, the Hugging Face cache, or a few KB from the hub when online), never from the weights; a
    template pinned in the config (`prompt.chat_template`) needs none."""
    if cfg.prompt.chat_template:
        return None, "chat template: the model config's prompt.chat_template"
    source = cfg.tokenizer.path or cfg.hub_id
    if not source:
        return ("prompt.format 'chat' needs a tokenizer with a chat template, and this model trains its own "
                "tokenizer, which has none; use prompt.format 'instruction' or set tokenizer.path"), ""  # fmt: skip
    files = {name: _tokenizer_file(source, name, cfg.tokenizer_revision) for name in TEMPLATE_FILES}
    if all(path is None for path in files.values()):
        return None, f"chat template: not checked, the tokenizer files of '{source}' are not reachable"
    config = files["tokenizer_config.json"]
    in_config = config is not None and bool(json.loads(Path(config).read_text(encoding="utf-8")).get("chat_template"))
    if in_config or files["chat_template.jinja"] is not None:
        return None, f"chat template: found in the tokenizer files of '{source}'"
    return (f"prompt.format 'chat' but the tokenizer of '{source}' has no chat template (neither tokenizer_config.json "
            "nor chat_template.jinja holds one); use prompt.format 'instruction' with a template"), ""  # fmt: skip


TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja")


def _tokenizer_file(source: str, name: str, revision: str | None = None) -> str | None:
    """A tokenizer file's local path: in a local folder, in the HF cache, or downloaded when the hub is reachable;
    None when the file does not exist or cannot be had."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return str(folder / name) if (folder / name).is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(source, name, revision=revision)
    except HFValidationError:
        return None
    if isinstance(cached, str):
        return cached
    if cached is not None or not hub_reachable()[0]:  # cached as missing, or offline
        return None
    try:
        return hf_hub_download(source, name, revision=revision, etag_timeout=5)
    except Exception:  # not in the repository, or the hub failed: the loader will say more
        return None


def check_data(paths: list[str | Path]) -> list[str]:
    """Problems with the given data files (empty when all are valid)."""
    problems = []
    for path in paths:
        try:
            read_dialogues(path, require_summary=True)
        except DataError as e:
            problems.append(str(e))
    return problems


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_truncation(verdict: Verdict, cfg: ModelConfig, measure_on: list[DialogueSet], warn_share: float) -> None:
    """Measure `cfg`'s length limits on the rows of `measure_on` with the model's tokenizer (a config-source model's
    is trained from the first set's first `max_train_samples` rows, as training does, and cached for it): a warning
    per limit that cuts more than `warn_share`.
    A tokenizer that cannot be had here leaves `truncation_problem` saying why."""
    tokenizer, problem = _tokenizer_to_measure(cfg, measure_on[0])
    if tokenizer is None:
        verdict.truncation_problem = problem
        return
    dialogues = [d for rows in measure_on for d in rows.dialogues]
    summaries = [s for rows in measure_on for s in rows.summaries]
    try:
        verdict.truncation = measure_truncation(cfg, tokenizer, dialogues, summaries)
    except ValueError as e:  # no rows, or a chat prompt without a chat template (blocked above)
        verdict.truncation_problem = str(e)
        return
    verdict.warnings += [f"truncation: {w}" for w in verdict.truncation.warnings(warn_share)]


def _tokenizer_to_measure(cfg: ModelConfig, train: DialogueSet):
    """(tokenizer, None) as training loads it (dialogue tags as single tokens), or (None, why it cannot be had)."""
    from dialogsum.models import load_tokenizer

    source = cfg.tokenizer.path or cfg.hub_id
    if source and not any(_tokenizer_file(source, name, cfg.tokenizer_revision) for name in TOKENIZER_FILES):
        online, why = hub_reachable()
        offline = "" if online else f"; the hub is offline ({why})"
        return None, f"no tokenizer files of '{source}' in a local folder or the Hugging Face cache{offline}"
    train = train.head(cfg.training.max_train_samples)  # the rows a config-source model's tokenizer is trained from
    try:
        return load_tokenizer(cfg, train.dialogues + train.summaries), None
    except Exception as e:  # whatever transformers raises for files it cannot read
        return None, f"tokenizer '{source or 'trained from the rows'}' did not load: {type(e).__name__}: {e}"


def run_preflight(
    models: list[str],
    data_paths: list[str | Path] | None = None,
    overrides: dict[str, dict] | None = None,
    device: DeviceInfo | None = None,
    measure_on: list[DialogueSet] | None = None,
    warn_share: float = DEFAULT_TRUNCATION_WARN_SHARE,
) -> list[Verdict]:
    """Verdicts for every model, in order; an unknown name or bad config is a blocked verdict, not a crash. With
    `measure_on` (labelled rows, the training rows first), each verdict carries its truncation report."""
    device = device or detect_device()
    data_problems = check_data(list(data_paths or []))
    verdicts = []
    for name in models:
        try:
            cfg = load_model_config(name, (overrides or {}).get(name))
        except ConfigError as e:
            verdict = Verdict(name)
            verdict.block(f"config: {e}")
            verdicts.append(verdict)
            continue
        verdict = check_model(cfg, device)
        for problem in data_problems:
            verdict.block(f"data: {problem}")
        if measure_on:
            check_truncation(verdict, cfg, measure_on, warn_share)
        verdicts.append(verdict)
    return verdicts


def verdict_rows(verdicts: list[Verdict]) -> list[dict]:
    """One row per verdict for `dialogsum.output.emit`: model, verdict, precision, estimate, reasons, warnings and
    notes."""
    return [
        {"model": v.model, "verdict": v.label, "precision": v.precision or "-",
         "est. memory": f"{v.estimate_gib:.1f} GiB" if v.estimate_gib is not None else "-",
         "reasons / notes": v.reasons + [f"WARNING {w}" for w in v.warnings] + v.notes}
        for v in verdicts
    ]  # fmt: skip


FITTING_COLUMN = f"cuts ≤ {percent(FIT_SHARE)} at"
TRUNCATION_COLUMNS = ("model", "limit", "cut", *(f"p{p}" for p in PERCENTILES), FITTING_COLUMN, "warning")


def truncation_rows(verdicts: list[Verdict], warn_share: float) -> list[dict]:
    """Rows of the truncation table for `dialogsum.output.emit` (`TRUNCATION_COLUMNS`): one per model and limit,
    or one saying why a model was not measured; none for verdicts measured on no rows."""
    rows = []
    for v in verdicts:
        if v.truncation_problem:
            rows.append({"model": v.model, "limit": "-", "warning": f"not measured: {v.truncation_problem}"})
        for cut in v.truncation.limits if v.truncation else ():
            above = cut.share > warn_share
            rows.append({"model": v.model, "limit": f"{cut.setting} {cut.limit}", "cut": f"{cut.cut}/{cut.rows} ({cut.share:.1%})",
                         **{f"p{p}": f"{length:.0f}" for p, length in cut.percentiles.items()},
                         FITTING_COLUMN: str(cut.fits_99pct), "warning": f"WARNING above {percent(warn_share)}" if above else ""})  # fmt: skip
    return rows


def record_truncation(run_id: str, verdicts: list[Verdict], warn_share: float) -> None:
    """Print the truncation table to stderr and log the measured reports on run `run_id` (params and metrics named
    in `dialogsum.tracking`); nothing when no verdict was measured or tried."""
    import sys
    import time

    import mlflow
    from mlflow.entities import Metric, Param

    from dialogsum.output import emit
    from dialogsum.truncation import tracking_records

    rows = truncation_rows(verdicts, warn_share)
    if not rows:
        return
    reports = [v.truncation for v in verdicts if v.truncation is not None]
    emit(rows, TRUNCATION_COLUMNS, "preflight: truncation on the train + validation rows (tokenizer only)", stream=sys.stderr)
    params, metrics = tracking_records(reports, warn_share)
    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                                    params=[Param(k, str(v)) for k, v in params.items()])  # fmt: skip
