"""`optimize`: measure inference variants of a trained model side by side and log the recommended one.

One process, the same rows for every variant: the baseline, the model as it was scored (`scored`: loaded as
serving loads it, in its recorded numerics; a QLoRA model as its nf4 base with the adapter), and each requested
variant (`int8` on CPU; `fp16`, `bf16` on CUDA; `bnb-int8`, `bnb-nf4` on both; see `dialogsum.quantize`) is loaded
once straight from the saved folder onto its device in its own dtype or quantization (`device_map`: a 12.8B model
never passes through 51 GB of fp32 in host memory), warmed up, and swept over growing batch sizes on real dialogues
(the first N rows of a labelled CSV, so their real length mix). Per batch size: latency p50/p95 of a batch,
throughput (samples/s) and peak memory. The sweep of a variant stops growing at an out-of-memory error, at a peak
over the memory budget, or when throughput no longer improves by `min_gain`; any other failing batch size is
recorded and the sweep goes on. An out-of-memory error while loading a variant, or a variant that would not fit on
the disk it is saved to (checked before it is written), is that variant's recorded failure; the others are still
measured and recommended. Quality: Korean ROUGE of every variant's predictions on the same rows, the drop against
the baseline, and the agreement with the baseline's predictions. Each variant but the baseline (already saved) is
saved as it would be logged and its size on disk measured; fp32 weights are never written: their size
(`fp32_size_bytes`, the reference of every `*_size_ratio`) is 4 bytes times the parameter count.

Recommendation rule (`RULE`): the highest throughput among the batch sizes that ran within the memory budget
and whose p95 latency fits the latency budget, of the variants whose ROUGE final drops by at most
`max_rouge_drop` points; ties go to the smaller batch size, then the smaller model on disk.

The measuring part (`sweep_batch_sizes`, `PeakMemory`, `recommend`) needs only torch, numpy and psutil, so
GPU scripts without MLflow can import this module; `optimize_run` adds the MLflow run.
"""

from __future__ import annotations

import gc
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_N_SAMPLES = 64
SWEEP_TABLE = "optimize/sweep.json"
SWEEP_PLOT = "optimize/throughput_latency.png"
SUMMARY_FILE = "optimize/summary.json"
RECOMMENDED_VARIANT_TAG = "dialogsum.recommended_variant"
RECOMMENDED_BATCH_SIZE_TAG = "dialogsum.recommended_batch_size"
RECOMMENDATION_TAG = "dialogsum.recommendation"
HALF_PRECISION = {"fp16": "float16", "bf16": "bfloat16"}  # variants loaded straight into that dtype
FP32_BYTES_PER_PARAMETER = 4
RULE = (
    "highest throughput among batch sizes that ran within the memory budget and the p95 latency budget "
    "({max_latency_p95_s}), of variants whose Korean ROUGE final drops by at most {max_rouge_drop} points against "
    "the model as it was scored; ties: smaller batch size, then smaller size"
)


class OptimizeError(ValueError):
    """An optimize request that cannot be measured (bad source, data or batch sizes)."""


class NotEnoughDisk(OSError):
    """A variant that would not fit on the disk it is to be written to."""


# --- measuring ----------------------------------------------------------------------------------------------


@dataclass
class SweepSettings:
    """warmup_batches: untimed batches before a variant's sweep (at the smallest batch size) and, when
    `warmup_every_batch_size` (None: on CUDA only), before each larger one: CUDA loads kernels lazily and picks
    GEMM algorithms per shape (without it, one slow first batch stopped an fp16 sweep on an H200 at batch size 2),
    while eager CPU kernels have no per-shape set-up. min_batches: timed batches
    per batch size at least (rows are cycled). min_gain: a batch size must beat the best throughput so far by
    this fraction, else growing stops (None: never stop for that). max_memory_bytes: peak memory budget; a
    batch size over it is recorded as `over_memory` and growing stops."""

    warmup_batches: int = 1
    warmup_every_batch_size: bool | None = None
    min_batches: int = 3
    min_gain: float | None = 0.05
    max_memory_bytes: int | None = None


@dataclass
class BatchPoint:
    """One batch size of one variant: per-batch latencies, samples generated, peak memory, and how it ended
    (`ok`, `oom`, `over_memory` or `failed`)."""

    variant: str
    batch_size: int
    status: str = "ok"
    latencies_s: list[float] = field(default_factory=list)
    samples: int = 0
    cpu_s: float = 0.0  # process CPU time of the timed batches (a busy shared machine inflates wall time, not this)
    peak_memory_bytes: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def generate_s(self) -> float:
        return sum(self.latencies_s)

    @property
    def throughput_sps(self) -> float:
        return self.samples / self.generate_s if self.ok and self.generate_s else 0.0

    def latency_s(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(self.latencies_s, q)) if self.ok and self.latencies_s else float("nan")

    def row(self) -> dict[str, Any]:
        return {"variant": self.variant, "batch_size": self.batch_size, "status": self.status,
                "batches": len(self.latencies_s), "samples": self.samples, "latency_p50_s": self.latency_s(50),
                "latency_p95_s": self.latency_s(95), "throughput_sps": self.throughput_sps, "cpu_s": self.cpu_s,
                "peak_memory_bytes": self.peak_memory_bytes, "error": self.error}  # fmt: skip


@dataclass
class VariantSweep:
    """A variant's sweep: its batch points in order, one output per row (from the first batch size that ran,
    None when none did), why growing stopped, and the warm-up time."""

    variant: str
    points: list[BatchPoint]
    outputs: list[Any] | None
    stop_reason: str
    warmup_s: float

    @property
    def generate_s(self) -> float:
        return sum(p.generate_s for p in self.points)

    def point(self, batch_size: int) -> BatchPoint | None:
        return next((p for p in self.points if p.batch_size == batch_size and p.ok), None)


class PeakMemory:
    """Peak memory while the block runs: the CUDA allocator's peak on CUDA; on CPU the process's peak resident
    set size, sampled every `interval_s` by a thread (it includes the model and the Python runtime)."""

    def __init__(self, device: str, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak = max(self.peak, process.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()


def release_memory(device: str) -> None:
    """Give freed model memory back (CUDA cache; on Linux, glibc's free lists) so the next variant's peak is its own."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def batches_for(n_rows: int, batch_size: int, min_batches: int) -> list[list[int]]:
    """Full batches of consecutive row indices in data order, cycling through the rows, until every row was in
    a batch and there are at least `min_batches`."""
    count = max(math.ceil(n_rows / batch_size), min_batches)
    return [[(b * batch_size + i) % n_rows for i in range(batch_size)] for b in range(count)]


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _warm_up(generate: Callable[[list[int]], Any], n_rows: int, batch_size: int, batches: int, device: str) -> float:
    start = time.perf_counter()
    for batch in batches_for(n_rows, batch_size, batches)[:batches]:
        generate(batch)
    _synchronize(device)
    return time.perf_counter() - start


def sweep_batch_sizes(
    generate: Callable[[list[int]], Sequence[Any]],
    n_rows: int,
    batch_sizes: Sequence[int],
    *,
    variant: str,
    device: str,
    settings: SweepSettings | None = None,
    on_point: Callable[[BatchPoint], None] | None = None,
) -> VariantSweep:
    """Time `generate(row_indices) -> one output per index` over growing batch sizes of one loaded model."""
    settings = settings or SweepSettings()
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1 or n_rows < 1:
        raise OptimizeError(f"need rows and positive batch sizes (got {n_rows} rows, batch sizes {list(batch_sizes)})")
    warm_each = device == "cuda" if settings.warmup_every_batch_size is None else settings.warmup_every_batch_size
    warmup_s = _warm_up(generate, n_rows, sizes[0], settings.warmup_batches, device)
    points: list[BatchPoint] = []
    outputs: list[Any] | None = None
    best: BatchPoint | None = None
    stop_reason = "every batch size measured"
    for size in sizes:
        point = BatchPoint(variant, size)
        points.append(point)
        produced: list[Any] = [None] * n_rows
        memory = PeakMemory(device)
        try:
            with memory:
                if warm_each and size != sizes[0]:
                    warmup_s += _warm_up(generate, n_rows, size, settings.warmup_batches, device)
                for batch in batches_for(n_rows, size, settings.min_batches):
                    tick, cpu_tick = time.perf_counter(), time.process_time()
                    result = generate(batch)
                    _synchronize(device)
                    point.latencies_s.append(time.perf_counter() - tick)
                    point.cpu_s += time.process_time() - cpu_tick
                    point.samples += len(batch)
                    for i, out in zip(batch, result):
                        produced[i] = out
        except Exception as e:  # noqa: BLE001 - recorded on the point; the loop decides whether to go on
            point.status = "oom" if is_out_of_memory(e) else "failed"
            point.error = f"{type(e).__name__}: {e}"[:1000]
            release_memory(device)
        point.peak_memory_bytes = memory.peak
        if point.ok and settings.max_memory_bytes and point.peak_memory_bytes > settings.max_memory_bytes:
            point.status = "over_memory"
            point.error = f"peak memory {point.peak_memory_bytes} bytes > budget {settings.max_memory_bytes}"
        if on_point:
            on_point(point)
        if point.status in ("oom", "over_memory"):
            stop_reason = f"stopped at batch size {size}: {point.status} ({point.error})"
            break
        if not point.ok:
            continue
        if outputs is None:
            outputs = produced
        if best is not None and settings.min_gain is not None and point.throughput_sps < best.throughput_sps * (1 + settings.min_gain):
            stop_reason = (f"stopped at batch size {size}: {point.throughput_sps:.3g} samples/s is not {settings.min_gain:.0%} "
                           f"above {best.throughput_sps:.3g} at batch size {best.batch_size}")  # fmt: skip
            break
        if best is None or point.throughput_sps > best.throughput_sps:
            best = point
    return VariantSweep(variant, points, outputs, stop_reason, warmup_s)


# --- quality and the recommendation -------------------------------------------------------------------------


@dataclass
class Quality:
    """A variant's predictions scored on the same rows: Korean ROUGE against the references with the per-row finals
    and the interval of the mean, the drop of ROUGE final against the baseline (points), the paired-bootstrap
    difference to the baseline, and agreement with the baseline's predictions (ROUGE final and exact-match share)."""

    rouge: dict[str, float]
    row_finals: list[float]
    interval: Any
    rouge_drop: float
    difference: Any
    agreement_final: float
    exact_match: float


def quality_of(predictions: list[str], baseline: list[str], references: list[str]) -> Quality:
    from dialogsum.metrics import aggregate, rouge, score_rows
    from dialogsum.stats import bootstrap_mean, paired_difference

    rows, base_rows = score_rows(predictions, references), score_rows(baseline, references)
    finals, base_finals = [r["final"] for r in rows], [r["final"] for r in base_rows]
    scores, base = aggregate(rows), aggregate(base_rows)
    agreement = rouge(predictions, baseline)["final"] if any(b.strip() for b in baseline) else 0.0
    exact = sum(p == b for p, b in zip(predictions, baseline)) / max(len(predictions), 1)
    return Quality(scores, finals, bootstrap_mean(finals), base["final"] - scores["final"],
                   paired_difference(finals, base_finals), agreement, exact)  # fmt: skip


@dataclass
class Budget:
    """Limits a recommendation must respect beyond the sweep's memory budget; None: no latency limit."""

    max_rouge_drop: float = 0.5
    max_latency_p95_s: float | None = None

    @property
    def rule(self) -> str:
        latency = "none" if self.max_latency_p95_s is None else f"{self.max_latency_p95_s:g} s"
        return RULE.format(max_rouge_drop=self.max_rouge_drop, max_latency_p95_s=latency)


@dataclass
class Recommendation:
    variant: str
    batch_size: int
    reason: str


def recommend(sweeps: dict[str, VariantSweep], quality: dict[str, Quality], sizes: dict[str, int], budget: Budget) -> Recommendation:
    """Apply the budget's rule. When no batch size meets the latency budget, the lowest p95 latency among the
    variants that keep quality; a variant without quality (none of its batch sizes ran) is never chosen."""
    kept = [name for name in sweeps if name in quality and quality[name].rouge_drop <= budget.max_rouge_drop]
    points = [p for name in kept for p in sweeps[name].points if p.ok]
    if not points:
        raise OptimizeError("no variant ran a batch size and kept quality; see the sweep table for the errors")
    within = [p for p in points if budget.max_latency_p95_s is None or p.latency_s(95) <= budget.max_latency_p95_s]
    if within:
        best = min(within, key=lambda p: (-p.throughput_sps, p.batch_size, sizes.get(p.variant, 0)))
        return Recommendation(best.variant, best.batch_size, f"{budget.rule}: {best.throughput_sps:.3g} samples/s")
    fastest = min(points, key=lambda p: (p.latency_s(95), p.batch_size))
    return Recommendation(fastest.variant, fastest.batch_size, f"no batch size met the latency budget ({budget.rule}); lowest p95 latency instead")


# --- the optimize run ---------------------------------------------------------------------------------------


@dataclass
class VariantResult:
    """A measured variant; `folder` is None (and sizes 0) for a variant that ran out of memory while loading or would
    not fit on the disk. The baseline's folder is the source's, and its size the bytes of its weights as loaded
    (it is not written again)."""

    sweep: VariantSweep
    folder: Path | None
    size_bytes: int
    model_bytes: int
    load_s: float
    sweep_s: float
    quality: Quality | None = None
    test_outputs: list[str] | None = None
    test_quality: Quality | None = None


def model_bytes(model) -> int:
    """Bytes of a model's weights in memory: every tensor of its state dict (packed int8 weights included), each
    storage once. Unlike the process's RSS, it belongs to this variant alone."""
    seen: dict[int, int] = {}
    pending = list(model.state_dict().values())
    while pending:
        value = pending.pop()
        if isinstance(value, (tuple, list)):
            pending.extend(value)
        elif hasattr(value, "data_ptr") and hasattr(value, "element_size"):
            seen[value.data_ptr()] = max(seen.get(value.data_ptr(), 0), value.nelement() * value.element_size())
    return sum(seen.values())


@dataclass
class OptimizeReport:
    cfg: Any
    total_params: int  # of the model as one set of merged weights (`parameter_count`)
    results: dict[str, VariantResult]

    @property
    def fp32_size_bytes(self) -> int:
        """What the weights take in fp32, computed (4 bytes a parameter), never written."""
        return FP32_BYTES_PER_PARAMETER * self.total_params

    @property
    def sweeps(self) -> dict[str, VariantSweep]:
        return {name: r.sweep for name, r in self.results.items()}

    @property
    def sweep_overhead(self) -> float:
        """Wall time of loading, preparing, warming up and sweeping every variant over the pure (timed) generation time."""
        generate = sum(r.sweep.generate_s for r in self.results.values())
        return sum(r.load_s + r.sweep_s for r in self.results.values()) / generate if generate else float("nan")


def parameter_count(model_dir: Path) -> int:
    """Parameters of the saved model as one set of merged weights, counted on an empty (meta-device) copy of its
    architecture (`saved_model.merged_config`): nothing is read or allocated."""
    from accelerate import init_empty_weights

    from dialogsum.models import auto_model_class
    from dialogsum.serving import saved_model

    config = saved_model.merged_config(model_dir)
    with init_empty_weights():
        empty = auto_model_class(saved_model.read(model_dir).config).from_config(config)
    empty.tie_weights()  # skipped while the weights are empty; tied weights count once
    return sum(p.numel() for p in empty.parameters())


def check_free_disk(folder: Path, needed: int, what: str) -> None:
    """NotEnoughDisk unless `needed` bytes fit in the free space of the file system that holds `folder`."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise NotEnoughDisk(f"{what} needs {needed / 1e9:.3g} GB on disk, {folder} has {free / 1e9:.3g} GB free")


def load_variant(model_dir: Path, name: str, device: str, staging: Path):
    """(model, tokenizer, ModelConfig): the saved model as variant `name`, loaded once, straight from the folder onto
    `device` in the variant's own dtype or quantization (`device_map`), never through an fp32 copy on the CPU:
    the baseline as serving loads it (`saved_model.load`: its recorded numerics; a QLoRA model unmerged on its nf4
    base); fp16/bf16 with an adapter merged into a base loaded in that dtype; int8 from fp32 weights on the CPU,
    its only device; bitsandbytes variants quantized as they load, full weights from the folder and an adapter
    model from its merged weights, written to `staging` in the compute dtype (after a free-disk check) and
    removed once read."""
    import torch
    from transformers import AutoTokenizer

    from dialogsum.models import auto_model_class
    from dialogsum.quantize import BASELINE, bitsandbytes_settings, load_bitsandbytes, quantize_int8_dynamic
    from dialogsum.serving import saved_model

    if name == BASELINE:
        return saved_model.load(model_dir, device)
    if name in HALF_PRECISION:
        return saved_model.load(model_dir, device, dtype=getattr(torch, HALF_PRECISION[name]), merge=True)
    if name == "int8":
        model, tokenizer, cfg = saved_model.load(model_dir, "cpu", dtype=torch.float32, merge=True)
        return quantize_int8_dynamic(model), tokenizer, cfg
    info = saved_model.read(model_dir)
    if info.weights != "adapter":
        model = load_bitsandbytes(auto_model_class(info.config), model_dir / "weights", name, device, quantize=True)
        return model, AutoTokenizer.from_pretrained(model_dir / "tokenizer"), info.config
    merged, tokenizer, cfg = saved_model.load(model_dir, device, dtype=bitsandbytes_settings(name, device)[1], merge=True)
    check_free_disk(staging.parent, model_bytes(merged), f"{name}: the merged weights it is quantized from")
    merged.save_pretrained(staging)
    del merged
    release_memory(device)
    model = load_bitsandbytes(auto_model_class(cfg), staging, name, device, quantize=True)
    shutil.rmtree(staging)
    return model, tokenizer, cfg


def failed_variant(name: str, batch_size: int, error: BaseException) -> VariantSweep:
    """The sweep of a variant that ran out of memory while loading or would not fit on the disk: that variant's
    recorded failure."""
    if is_out_of_memory(error):
        status, message = "oom", f"out of memory while loading: {type(error).__name__}: {error}"
    else:
        status, message = "failed", f"not enough disk: {error}"
    return VariantSweep(name, [BatchPoint(name, batch_size, status=status, error=message)], None, message, 0.0)


def measure_variants(
    model_dir: Path,
    variants: Sequence[str],
    data,
    batch_sizes: Sequence[int],
    *,
    device: str,
    workdir: Path,
    generation: dict[str, Any] | None = None,
    settings: SweepSettings | None = None,
    on_point: Callable[[BatchPoint], None] | None = None,
    test_data=None,
) -> OptimizeReport:
    """Load each variant once, sweep it on the rows of `data` (the validation rows, a DialogueSet), summarise
    `test_data` when given, save it to `workdir/<variant>` when its weights fit on that disk (checked before the
    sweep: a variant that cannot be saved cannot be logged) and measure its size; then score every variant's
    predictions against the references and the baseline's (validation quality decides the recommendation; test
    quality is reported). `variants[0]` is the baseline."""
    from dialogsum.generate import summarize
    from dialogsum.quantize import BASELINE, folder_bytes
    from dialogsum.serving import saved_model

    source = saved_model.read(model_dir)
    tokenizer_bytes = folder_bytes(model_dir / "tokenizer")
    results: dict[str, VariantResult] = {}
    cfg = None
    for name in variants:
        start = time.perf_counter()
        failure = None
        try:
            model, tokenizer, cfg = load_variant(model_dir, name, device, workdir / f"{name}-staging")
            if name != BASELINE:
                check_free_disk(workdir, model_bytes(model) + tokenizer_bytes, name)
        except Exception as e:  # out of memory or disk fails this variant only; the sweep goes on
            if not (is_out_of_memory(e) or isinstance(e, NotEnoughDisk)):
                raise
            failure = failed_variant(name, min(batch_sizes), e)
        if failure is not None:  # freed after the except block, whose traceback held what the failed load allocated
            model = None  # a loaded variant that does not fit on the disk
            release_memory(device)
            results[name] = VariantResult(failure, None, 0, 0, time.perf_counter() - start, 0.0)
            continue
        release_memory(device)  # what loading left behind (weights an adapter was merged into, fp32 weights int8 replaced)
        loaded = time.perf_counter()

        def generate(rows: list[int], model=model, tokenizer=tokenizer, cfg=cfg) -> list[str]:
            return summarize(model, tokenizer, cfg, [data.rows[i].dialogue for i in rows], len(rows), generation)

        sweep = sweep_batch_sizes(generate, len(data), batch_sizes, variant=name, device=device, settings=settings, on_point=on_point)
        swept = time.perf_counter()
        test_outputs = None
        if test_data is not None and sweep.outputs is not None:
            largest = max(p.batch_size for p in sweep.points if p.ok)
            test_outputs = summarize(model, tokenizer, cfg, test_data.dialogues, largest, generation)
        if name == BASELINE:
            folder, size = model_dir, model_bytes(model)
        else:
            folder = saved_model.write_variant(workdir / name, model, tokenizer, source, name)
            size = folder_bytes(folder)
        results[name] = VariantResult(sweep, folder, size, model_bytes(model), loaded - start, swept - loaded, test_outputs=test_outputs)
        del model, generate
        release_memory(device)
    baseline = results[variants[0]]
    if cfg is None or baseline.folder is None:
        raise OptimizeError(f"the baseline (the model as it was scored) could not be loaded: {baseline.sweep.stop_reason}")
    for result in results.values():
        if baseline.sweep.outputs is not None and result.sweep.outputs is not None:
            result.quality = quality_of(result.sweep.outputs, baseline.sweep.outputs, data.summaries)
        if baseline.test_outputs is not None and result.test_outputs is not None:
            result.test_quality = quality_of(result.test_outputs, baseline.test_outputs, test_data.summaries)
    return OptimizeReport(cfg, parameter_count(model_dir), results)


def source_model_dir(model_uri: str) -> Path:
    """The saved-model folder of a logged dialogsum pyfunc (downloaded; the model is not loaded), which must be a
    trained model, not an optimised variant."""
    from dialogsum.serving import saved_model
    from dialogsum.serving.pyfunc import logged_model_dir

    try:
        folder = logged_model_dir(model_uri)
        variant = saved_model.read(folder).variant
    except (LookupError, saved_model.SavedModelError) as e:
        raise OptimizeError(str(e)) from e
    if variant:
        raise OptimizeError(f"{model_uri}: already an optimised '{variant}' model; optimise its source model instead")
    return folder


def _log_point(point: BatchPoint) -> None:
    import mlflow

    from dialogsum.quantize import VARIANTS

    prefix = VARIANTS[point.variant].metric_prefix
    metrics = {f"{prefix}_ok": float(point.ok), f"{prefix}_peak_memory_bytes": float(point.peak_memory_bytes)}
    if point.ok:
        metrics.update({f"{prefix}_throughput_sps": point.throughput_sps, f"{prefix}_latency_p50_s": point.latency_s(50),
                        f"{prefix}_latency_p95_s": point.latency_s(95)})  # fmt: skip
    mlflow.log_metrics(metrics, step=point.batch_size)


def _plot(report: OptimizeReport, path: Path) -> Path:
    from dialogsum import figures

    fig, (left, right) = figures.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for name, sweep in report.sweeps.items():
        points = [p for p in sweep.points if p.ok]
        sizes = [p.batch_size for p in points]
        left.plot(sizes, [p.throughput_sps for p in points], marker="o", label=name)
        line = right.plot(sizes, [p.latency_s(50) for p in points], marker="o", label=f"{name} p50")[0]
        right.plot(sizes, [p.latency_s(95) for p in points], marker="x", linestyle="--", color=line.get_color(), label=f"{name} p95")
    for ax, label in ((left, "throughput (samples/s)"), (right, "batch latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figures.save(fig, path)


def _summary_metrics(report: OptimizeReport, choice: Recommendation) -> dict[str, float]:
    """The computed fp32 size; per variant: size and its ratio to fp32's, memory, load and sweep time, speed-up, val/test
    ROUGE with intervals and the paired difference to the baseline; then the recommended batch point, and the logged
    variant's val_*/test_*."""
    from dialogsum.comparison import comparison_metrics
    from dialogsum.quantize import BASELINE, VARIANTS
    from dialogsum.stats import Comparison

    base = report.results[BASELINE]
    metrics: dict[str, float] = {"sweep_overhead": report.sweep_overhead, "fp32_size_bytes": report.fp32_size_bytes}
    for name, result in report.results.items():
        prefix = VARIANTS[name].metric_prefix
        metrics[f"{prefix}_load_ok"] = float(result.folder is not None)
        if result.folder is None:
            continue
        metrics[f"{prefix}_size_bytes"] = result.size_bytes
        metrics[f"{prefix}_size_ratio"] = report.fp32_size_bytes / result.size_bytes
        metrics[f"{prefix}_model_bytes"] = result.model_bytes
        metrics[f"{prefix}_load_s"] = result.load_s
        metrics[f"{prefix}_sweep_s"] = result.sweep_s
        point, base_point = result.sweep.point(choice.batch_size), base.sweep.point(choice.batch_size)
        if point and base_point:
            metrics[f"{prefix}_speedup"] = point.throughput_sps / base_point.throughput_sps
        for role, quality in (("val", result.quality), ("test", result.test_quality)):
            if quality is None:
                continue
            metrics.update({f"{prefix}_{role}_{k}": v for k, v in quality.rouge.items()})
            metrics.update({f"{prefix}_{role}_final_ci95_low": quality.interval.low, f"{prefix}_{role}_final_ci95_high": quality.interval.high})
            if name != BASELINE:
                metrics.update(comparison_metrics(f"{prefix}_{role}_diff_vs_{BASELINE}", Comparison(name, BASELINE, quality.difference)))
        if result.quality:
            metrics.update({f"{prefix}_rouge_drop": result.quality.rouge_drop, f"{prefix}_agreement_final": result.quality.agreement_final,
                            f"{prefix}_exact_match": result.quality.exact_match})  # fmt: skip
    chosen = report.results[choice.variant]
    point = chosen.sweep.point(choice.batch_size)
    metrics.update({"recommended_throughput_sps": point.throughput_sps, "recommended_latency_p95_s": point.latency_s(95),
                    "recommended_size_bytes": chosen.size_bytes})  # fmt: skip
    for role, quality in (("val", chosen.quality), ("test", chosen.test_quality)):
        if quality is not None:
            metrics.update({f"{role}_{k}": v for k, v in quality.rouge.items()})
            metrics.update({f"{role}_final_ci95_low": quality.interval.low, f"{role}_final_ci95_high": quality.interval.high})
    return metrics


def _prediction_rows(data, outputs: dict[str, list[str]], logged: str) -> list[dict[str, Any]]:
    """One row per dialogue: the logged variant's prediction and per-row ROUGE, and every variant's prediction."""
    from dialogsum.metrics import score_rows

    logged_outputs = outputs.get(logged, [""] * len(data))
    scores = score_rows(logged_outputs, data.summaries) if logged in outputs else [{}] * len(data)
    rows = []
    for i, row in enumerate(data.rows):
        variants = {f"{name}_prediction": texts[i] for name, texts in outputs.items()}
        rows.append({"fname": row.fname, "dialogue": row.dialogue, "reference": row.summary, "prediction": logged_outputs[i], **variants, **scores[i]})
    return rows


def _log_report(report: OptimizeReport, data, test_data, choice: Recommendation, budget: Budget, logged: str, workdir: Path) -> None:
    import mlflow
    import pandas as pd

    from dialogsum.data import dataset_rows_digest
    from dialogsum.quantize import BASELINE
    from dialogsum.serving.pyfunc import log_summarizer
    from dialogsum.tracking import TEST_PREDICTIONS_ARTIFACT, TEST_ROWS_TAG, VAL_ROWS_TAG, log_predictions

    mlflow.log_metrics(_summary_metrics(report, choice))
    mlflow.set_tags({VAL_ROWS_TAG: dataset_rows_digest(data), **({TEST_ROWS_TAG: dataset_rows_digest(test_data)} if test_data else {})})
    mlflow.log_table(pd.DataFrame([p.row() for sweep in report.sweeps.values() for p in sweep.points]), artifact_file=SWEEP_TABLE)
    mlflow.log_artifact(str(_plot(report, workdir / Path(SWEEP_PLOT).name)), artifact_path=str(Path(SWEEP_PLOT).parent))
    summary = {
        "rule": budget.rule,
        "budget": budget.__dict__,
        "recommended": {"variant": choice.variant, "batch_size": choice.batch_size, "reason": choice.reason},
        "logged_variant": logged,
        "sweep_overhead": report.sweep_overhead,
        "total_params": report.total_params,
        "fp32_size_bytes": report.fp32_size_bytes,
        "variants": {name: {"stop_reason": r.sweep.stop_reason, "size_bytes": r.size_bytes, "load_s": r.load_s,
                            "model_bytes": r.model_bytes, "warmup_s": r.sweep.warmup_s, "sweep_s": r.sweep_s, "generate_s": r.sweep.generate_s,
                            **{f"{role}_quality": None if q is None else {"rouge": q.rouge, "interval": str(q.interval), "rouge_drop": q.rouge_drop,
                                                                          "difference_vs_baseline": str(q.difference), "agreement_final": q.agreement_final,
                                                                          "exact_match": q.exact_match}
                               for role, q in (("val", r.quality), ("test", r.test_quality))}}
                     for name, r in report.results.items()},
    }  # fmt: skip
    mlflow.log_dict(summary, SUMMARY_FILE)
    rows = _prediction_rows(data, {n: r.sweep.outputs for n, r in report.results.items() if r.sweep.outputs is not None}, logged)
    log_predictions(rows)
    if test_data is not None:
        outputs = {n: r.test_outputs for n, r in report.results.items() if r.test_outputs is not None}
        log_predictions(_prediction_rows(test_data, outputs, logged), TEST_PREDICTIONS_ARTIFACT)
    n = min(2, len(rows))
    name = report.cfg.name if logged == BASELINE else f"{report.cfg.name}-{logged}"
    log_summarizer(report.results[logged].folder, name, report.cfg.generation, [r["dialogue"] for r in rows[:n]],
                   batch_size=choice.batch_size)


def optimize_run(
    run_id: str | None = None,
    *,
    model_uri: str | None = None,
    quantization: str | Sequence[str] = "auto",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    data_path: str | Path | None = None,
    test_path: str | Path | None = None,
    n_samples: int | None = None,
    parent_run_id: str | None = None,
    device: str | None = None,
    generation: dict[str, Any] | None = None,
    settings: SweepSettings | None = None,
    budget: Budget | None = None,
    log_variant: str | None = None,
) -> str:
    """Measure the model of `run_id` (the model it logged) or `model_uri` as it was scored and as each `quantization`
    variant on `n_samples` rows (default 64) of `data_path` (the validation rows: speed, and the quality that decides
    the recommendation; default: the bundled labelled dev sample), report each variant's quality on `test_path`
    when given, log everything to an `optimize` run and log the recommended variant (or `log_variant`) as its pyfunc
    model, named after the model and variant (`kobart-tiny-int8`); returns the run id."""
    import tempfile

    import mlflow

    from dialogsum.data import check_disjoint, read_dialogues, sample_data_path
    from dialogsum.precision import detect_device
    from dialogsum.quantize import VARIANTS, resolve_variants
    from dialogsum.registry import resolve_model_uri
    from dialogsum.serving.pyfunc import run_model_uri
    from dialogsum.tracking import (
        MODEL_TAG,
        configure_tracking,
        log_config,
        tracked_run,
    )

    if (run_id is None) == (model_uri is None):
        raise OptimizeError("give exactly one of a run id or a model URI")
    device = device or detect_device().kind
    variants = resolve_variants(quantization, device)
    if log_variant is not None and log_variant not in variants:
        raise OptimizeError(f"log_variant '{log_variant}' is not among the measured variants {variants}")
    budget = budget or Budget()
    data = read_dialogues(data_path or sample_data_path("dev"), require_summary=True).head(n_samples or DEFAULT_N_SAMPLES)
    test_data = read_dialogues(test_path, require_summary=True) if test_path else None
    if test_data is not None:
        check_disjoint({"validation": data, "test": test_data})
    configure_tracking()
    pinned, source_params = resolve_model_uri(model_uri or run_model_uri(run_id))
    tags = {"dialogsum.source_model_uri": pinned, "dialogsum.device": device}
    with tracked_run(run_name=f"optimize-{'-'.join(variants[1:]) or 'batch'}", kind="optimize", tags=tags, parent_run_id=parent_run_id,
                     system_metrics=True) as run:
        log_config({"source": {"model_uri": pinned, "run_id": run_id or source_params.get("model.source_run_id", "")},
                    "optimize": {"variants": variants, "batch_sizes": sorted(set(batch_sizes)), "device": device,
                                 "generation": generation or {}, "sweep": (settings or SweepSettings()).__dict__,
                                 "budget": budget.__dict__},
                    "data": {"path": str(data.report.path), "rows": len(data),
                             "test_path": str(test_data.report.path) if test_data else None}}, artifact_file="optimize/config.yaml")  # fmt: skip
        mlflow.log_params({"data.validation.file_digest": data.report.digest,
                           **({"data.testing.file_digest": test_data.report.digest} if test_data else {})})  # fmt: skip
        with run.stage_of("load"):
            model_dir = source_model_dir(pinned)
        with tempfile.TemporaryDirectory(prefix="dialogsum-optimize-") as tmp:
            with run.stage_of("sweep"):
                report = measure_variants(model_dir, variants, data, batch_sizes, device=device, workdir=Path(tmp),
                                          generation=generation, settings=settings, on_point=_log_point, test_data=test_data)  # fmt: skip
            quality = {name: r.quality for name, r in report.results.items() if r.quality}
            choice = recommend(report.sweeps, quality, {n: r.size_bytes for n, r in report.results.items()}, budget)
            logged = log_variant or choice.variant
            if report.results[logged].folder is None:
                raise OptimizeError(f"log_variant '{logged}' could not be loaded: {report.results[logged].sweep.stop_reason}")
            mlflow.log_param("model.total_params", report.total_params)
            mlflow.set_tags({MODEL_TAG: report.cfg.name, RECOMMENDED_VARIANT_TAG: choice.variant,
                             RECOMMENDED_BATCH_SIZE_TAG: str(choice.batch_size), RECOMMENDATION_TAG: choice.reason[:5000],
                             "dialogsum.logged_variant": logged, "dialogsum.logged_variant.description": VARIANTS[logged].description})  # fmt: skip
            with run.stage_of("log"):
                _log_report(report, data, test_data, choice, budget, logged, Path(tmp))
        return run.run_id
