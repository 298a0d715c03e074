"""GPU dress rehearsal of the seed pipeline: the six seed architectures at their real width, a few real training
steps each as `dialogsum train` takes them, on one GPU in under 8 minutes; then the GPU scheduler's plan for a node.

Each model of `src/dialogsum/configs/models/` is built at its real hidden size, heads, MLP size and vocabulary
(`benchmarks/real_size.py`'s architectures; random init, the GPU machine reaches no hub) through dialogsum's own
builders and trained the way `run_training` trains it: the precision policy (bf16 autocast on an H200), full
fine-tuning for KoBART, LoRA on a bf16 base for Llama-3.2-3B and Qwen3-4B, QLoRA nf4 (bitsandbytes) for SOLAR-10.7B,
Polyglot-Ko-12.8B and KULLM-v2, gradient checkpointing, batch size, lengths and gradient accumulation as the config
says, the length-grouped sampler (the longest batch comes first, so step 1 is the peak), transformers' collator,
AdamW, the warm-up schedule and `train_epoch`. `--steps` counts optimizer steps, each the config's
gradient-accumulation micro-batches.

Rows: the competition's labelled rows, looked for as `benchmarks/gpu/_assets.py` says (`$DIALOGSUM_SHARED`,
`./shared`, `../shared`); without them the run stops, unless `--allow-sample` lets it use the 64 bundled rows.
Tokenizers: the real ones where present (KoBART and Qwen3 from shared/, Llama-3.1's for Llama-3.2-Korean from
shared/ or `.test-assets/`, Mistral-7B's 32,000 pieces for SOLAR with SOLAR's own chat template added, since
Mistral's files carry none). Polyglot-Ko and KULLM have no tokenizer on these machines: a BPE of their vocabulary
size is trained from the rows, as a config-source model does, and the output says so.

KoBART runs at its real depth. The LLMs run with 2 and 4 layers; peak memory and seconds per token are extrapolated
linearly to their real depth (`real_size.extrapolate`, checked on KoBART to -0.9%). Peak memory is
`torch.cuda.max_memory_allocated` and `max_memory_reserved` over the steps, weights included, against preflight's
`estimate_memory` for the full depth (`real_size.estimate`; target -10% / +25%). Tokens/s counts the unpadded
prompt and target tokens, the first micro-batch (warm-up) left out. Each model trains in its own process; the time
guard (`--time-limit`) starts no model with less than a minute left and stops one that would overrun. At the end:
one summary table, then `dialogsum.pipeline.gpu_scheduler`'s placement of the six trainings on an 8 x 80 GiB node,
once from preflight's estimates and once from the measured peaks (reserved, extrapolated to full depth).

A GPU-only check, not a test: without CUDA it stops at once. `--dry-run` is its CPU part (configs, tokenizers,
the rows' longest batch per model, the estimates and the estimate plan; no model is built).

    python benchmarks/gpu/seed_rehearsal.py                       # all six on the GPU
    python benchmarks/gpu/seed_rehearsal.py --models kobart qwen3-4b --steps 1 --rows 200
    python benchmarks/gpu/seed_rehearsal.py --dry-run             # the CPU part, in well under a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[1:1] = [str(REPO / "src"), str(REPO / "benchmarks")]  # dialogsum from this checkout; real_size's helpers

import real_size  # noqa: E402
from _assets import FETCHED_TOKENIZERS, labelled_rows, shared_roots, tokenizer_folder  # noqa: E402

GIB = real_size.GIB
SEED_MODELS = ("kobart", "llama-3.2-korean-3b", "qwen3-4b", "solar-10.7b", "polyglot-ko-12.8b", "kullm-v2")
REAL_TOKENIZERS = {"kobart": "kobart", "llama-3.2-korean-3b": "llama3", "qwen3-4b": "qwen3", "solar-10.7b": "mistral-7b"}
NODE_GPUS = 8
NODE_GPU_BYTES = 80 * GIB
TIME_LIMIT_S = 450
MIN_MODEL_S = 60  # the time guard starts no model with less than this left
PLANS_S = 15  # kept back from the time limit for the summary and the plans


@dataclass
class Outcome:
    """One model's line of the summary table (bytes and tokens/s at the model's full depth)."""

    name: str
    training: str = "-"
    tokenizer: str = "-"
    layers: str = "-"
    longest_batch: str = "-"
    estimate: float | None = None
    peak_allocated: float | None = None
    peak_reserved: float | None = None
    tokens_per_s: float | None = None
    seconds: float | None = None
    note: str = ""


def measured_depths(name: str) -> list[int | None]:
    """KoBART at its own depth (None); the LLMs at `real_size.LLM_LAYERS` layers, extrapolated."""
    return [None] if name == "kobart" else list(real_size.LLM_LAYERS)


def layers_label(depths: list[int | None]) -> str:
    return "real depth" if depths == [None] else ",".join(map(str, depths)) + " extrapolated"


def width(cfg) -> str:
    """The real width the model is built at: hidden size, attention heads, MLP size, vocabulary, and its depth."""
    a = cfg.architecture
    layers = a.get("num_hidden_layers") or f"{a['encoder_layers']}+{a['decoder_layers']}"
    return (f"hidden {a.get('hidden_size', a.get('d_model'))}, heads {a.get('num_attention_heads', a.get('encoder_attention_heads'))}, "
            f"MLP {a.get('intermediate_size', a.get('encoder_ffn_dim'))}, vocab {a['vocab_size']}, {layers} layers")  # fmt: skip


def real_tokenizer(name: str) -> Path | None:
    """The folder of `name`'s real tokenizer; None for the models that have none on these machines (Polyglot-Ko,
    KULLM); SystemExit when one that should be here is missing."""
    if name not in REAL_TOKENIZERS:
        return None
    folder = tokenizer_folder(REAL_TOKENIZERS[name])
    if folder is None:
        raise SystemExit(f"{name}: its real tokenizer tokenizers/{REAL_TOKENIZERS[name]} is in no shared folder "
                         f"({', '.join(map(str, shared_roots()))}) and not in {FETCHED_TOKENIZERS} (scripts/fetch_test_assets.sh)")  # fmt: skip
    return folder


def rehearsal_config(name: str, layers: int | None, pad_to_max_length: bool):
    """The seed config of `name` as a random-init model of its real architecture with `layers` layers (its own depth
    when None), at its own batch size, with its real tokenizer (or, for the models without one, a tokenizer of its
    vocabulary size trained from the rows)."""
    from dialogsum.config import load_model_config

    seed = load_model_config(name)
    cfg = real_size.measured_config(name, layers, seed.training.batch_size)
    folder = real_tokenizer(name)
    tokenizer = {"path": str(folder)} if folder else {"vocab_size": cfg.dimensions.vocab_size}
    return cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update=tokenizer),
                                  "training": cfg.training.model_copy(update={"pad_to_max_length": pad_to_max_length})})  # fmt: skip


def rehearsal_tokenizer(cfg, rows):
    """(the model's tokenizer, how it was had): the real one (its config's pinned chat template noted where the
    tokenizer's files lack one), or one trained from the rows."""
    from dialogsum.models import load_tokenizer

    tokenizer = load_tokenizer(cfg, rows.dialogues + rows.summaries)
    if cfg.tokenizer.path is None:
        return tokenizer, (f"TRAINED from the rows: {len(tokenizer):,} tokens for a {cfg.tokenizer.vocab_size:,} vocabulary "
                           "(no real tokenizer of this model exists on these machines)")  # fmt: skip
    how = f"real: {cfg.tokenizer.path}"
    if cfg.prompt.format == "chat" and cfg.prompt.chat_template and not tokenizer.chat_template:
        how += " + the model card's chat template (prompt.chat_template)"
    return tokenizer, how


def training_order(cfg, encoded, micro_batches: int) -> list[int]:
    """The row indices of the training's first `micro_batches` batches: the length-grouped sampler's order of epoch
    1, 2, ... as `run_training` draws them."""
    from dialogsum.features import EpochSeededSampler

    t = cfg.training
    lengths = [len(ids) for ids in encoded["input_ids"]]
    sampler = EpochSeededSampler(lengths, t.batch_size, t.seed, t.group_by_length and not t.pad_to_max_length)
    order: list[int] = []
    epoch = 0
    while len(order) < micro_batches * t.batch_size:
        epoch += 1
        sampler.set_epoch(epoch)
        order += list(sampler)
    return order[: micro_batches * t.batch_size]


def batch_tokens(cfg, encoded, order: list[int]) -> list[int]:
    """The unpadded tokens (prompt and target) of each batch of `order`."""
    per_row = [len(ids) + (len(labels) if cfg.task == "seq2seq" else 0) for ids, labels in zip(encoded["input_ids"], encoded["labels"])]
    b = cfg.training.batch_size
    return [sum(per_row[i] for i in order[start : start + b]) for start in range(0, len(order), b)]


def padded_shape(cfg, tokenizer, encoded, order: list[int]) -> str:
    """The shape the collator gives the first (the longest) batch of `order`."""
    from dialogsum.features import build_collator

    batch = build_collator(cfg, tokenizer)([encoded[i] for i in order[: cfg.training.batch_size]])
    shape = "x".join(map(str, batch["input_ids"].shape))
    return f"{shape} + labels {batch['labels'].shape[1]}" if cfg.task == "seq2seq" else shape


def training_form(cfg, compute_dtype: str) -> str:
    if cfg.lora is None:
        form = f"full FT fp32, {compute_dtype} autocast"
    else:
        form = "QLoRA nf4" if cfg.quantization == "4bit" else f"LoRA {compute_dtype}"
    return form + (", grad ckpt" if cfg.training.gradient_checkpointing else "")


def train_micro_batches(cfg, tokenizer, model, encoded, order: list[int], policy) -> tuple[list[float], list[float]]:
    """Train on the rows of `order` as `run_training` does: accelerate with the policy's mixed precision and the
    config's gradient accumulation, transformers' collator, AdamW with the config's weight decay, the warm-up
    schedule of the whole training, `train_epoch` (clipping included). Returns (seconds each micro-batch took, its
    loss); the accelerator lets go of everything it prepared."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from dialogsum.features import build_collator
    from dialogsum.training.recipe import linear_schedule, train_epoch

    t = cfg.training
    accelerator = Accelerator(mixed_precision=policy.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
                              cpu=policy.device == "cpu")  # fmt: skip
    loader = DataLoader(encoded, batch_size=t.batch_size, sampler=order, collate_fn=build_collator(cfg, tokenizer))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = linear_schedule(optimizer, t.warmup_steps, math.ceil(len(encoded) / t.batch_size / t.gradient_accumulation_steps) * t.epochs)
    prepared, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    prepared.train()
    finished: list[float] = []
    losses: list[float] = []

    def on_step(loss: float, _synced: bool) -> None:
        finished.append(time.perf_counter())
        losses.append(loss)

    start = time.perf_counter()
    train_epoch(prepared, loader, optimizer, scheduler, accelerator, t.max_grad_norm, on_step)
    accelerator.free_memory()
    return [end - begin for begin, end in zip([start, *finished], finished)], losses


def measure_depth(name: str, layers: int | None, rows, steps: int, pad_to_max_length: bool) -> dict:
    """Build `name` with `layers` layers on the GPU and train it `steps` optimizer steps: peak memory (weights
    included, anything left from before subtracted), seconds and tokens per micro-batch, losses."""
    import torch

    from dialogsum.features import tokenize_rows
    from dialogsum.models import build_model, cache_dir
    from dialogsum.precision import detect_device, resolve_precision

    cfg = rehearsal_config(name, layers, pad_to_max_length)
    tokenizer, tokenizer_source = rehearsal_tokenizer(cfg, rows)
    policy = resolve_precision(cfg.precision, detect_device())
    encoded = tokenize_rows(cfg, tokenizer, rows.dialogues, rows.summaries, cache_dir() / "tokenized")
    order = training_order(cfg, encoded, steps * cfg.training.gradient_accumulation_steps)
    torch.cuda.empty_cache()
    allocated_before, reserved_before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    started = time.perf_counter()
    built = build_model(cfg, tokenizer, policy)
    load_s = time.perf_counter() - started
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds, losses = train_micro_batches(cfg, tokenizer, built.model, encoded, order, policy)
    torch.cuda.synchronize()
    measured = {
        "layers": layers, "peak_allocated": torch.cuda.max_memory_allocated() - allocated_before,
        "peak_reserved": torch.cuda.max_memory_reserved() - reserved_before, "left_before": allocated_before,
        "load_s": load_s, "seconds": seconds, "tokens": batch_tokens(cfg, encoded, order), "losses": losses,
        "longest_batch": padded_shape(cfg, tokenizer, encoded, order), "tokenizer": tokenizer_source,
        "training": training_form(cfg, policy.compute_dtype), "width": width(cfg), "policy": policy.label, "gpu": torch.cuda.get_device_name(),
        "trainable_params": sum(p.numel() for p in built.model.parameters() if p.requires_grad),
        "nf4_layers": sum(1 for m in built.model.modules() if type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"),
    }  # fmt: skip
    shutil.rmtree(built.base_source, ignore_errors=True)  # the random-init checkpoint: up to 6 GB of disk
    del built
    gc.collect()
    torch.cuda.empty_cache()
    return measured


def seconds_per_token(depth: dict) -> float:
    """Seconds per trained token over the micro-batches after the first (warm-up), or the only one."""
    seconds, tokens = (depth["seconds"][1:], depth["tokens"][1:]) if len(depth["seconds"]) > 1 else (depth["seconds"], depth["tokens"])
    return sum(seconds) / sum(tokens)


def at_full_depth(name: str, depths: list[dict], value) -> float:
    """`value(depth)` at the model's real depth: measured there (KoBART), or extrapolated from the measured depths."""
    if len(depths) == 1:
        return value(depths[0])
    from dialogsum.config import load_model_config

    return real_size.extrapolate({d["layers"]: value(d) for d in depths}, load_model_config(name).dimensions.num_layers)


def preflight_estimate(name: str, compute_dtype: str) -> float:
    """Preflight's `estimate_memory` for the seed config at its full depth and own batch size."""
    from dialogsum.config import load_model_config

    return real_size.estimate(name, load_model_config(name).training.batch_size, "cuda", compute_dtype=compute_dtype)


def outcome_of(name: str, measured: dict, estimate: float, seconds: float) -> Outcome:
    """The summary line of a model from its measured depths."""
    depths = measured["depths"]
    first = depths[0]
    losses = [loss for d in depths for loss in d["losses"]]
    return Outcome(name, first["training"], first["tokenizer"], layers_label([d["layers"] for d in depths]), first["longest_batch"], estimate,
                   at_full_depth(name, depths, lambda d: d["peak_allocated"]), at_full_depth(name, depths, lambda d: d["peak_reserved"]),
                   1 / at_full_depth(name, depths, seconds_per_token), seconds,
                   "" if all(math.isfinite(loss) for loss in losses) else "NON-FINITE LOSS")  # fmt: skip


def describe_depths(name: str, measured: dict) -> str:
    """The per-depth measurements of one model, for the progress lines."""
    lines = [f"{name}: {measured['depths'][0]['tokenizer']}; {measured['depths'][0]['policy']} on {measured['depths'][0]['gpu']}"]
    for d in measured["depths"]:
        lines.append(f"  {d['width']}: peak {d['peak_allocated'] / GIB:.2f} GiB allocated, {d['peak_reserved'] / GIB:.2f} GiB reserved "
                     f"(left before: {d['left_before'] / GIB:.2f} GiB); load {d['load_s']:.1f} s; {len(d['seconds'])} micro-batches in "
                     f"{sum(d['seconds']):.1f} s, {1 / seconds_per_token(d):,.0f} tokens/s; trainable {d['trainable_params']:,}, "
                     f"nf4 layers {d['nf4_layers']}; losses {', '.join(f'{x:.2f}' for x in d['losses'])}")  # fmt: skip
    return "\n".join(lines)


def run_worker(name: str, args, seconds_left: float) -> tuple[dict | None, str]:
    """`measure_depth` of every depth of `name` in a fresh process, stopped after `seconds_left`: (its result or
    None, why not)."""
    command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
               *(["--rows", str(args.rows)] if args.rows else []), *(["--allow-sample"] if args.allow_sample else []),
               *(["--pad-to-max-length"] if args.pad_to_max_length else [])]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds_left)
    except subprocess.TimeoutExpired:
        return None, f"stopped by the time guard after {seconds_left:.0f} s"
    if result.returncode != 0:
        errors = [line for line in result.stderr.strip().splitlines() if line.strip()]
        print("\n".join(errors[-15:]), file=sys.stderr)
        return None, f"failed: {errors[-1] if errors else f'exit {result.returncode}'}"
    return json.loads(result.stdout.strip().splitlines()[-1]), ""


def rehearse(args, estimates: dict[str, float], deadline: float) -> list[Outcome]:
    """Every model in its own process (sharing this process's cache folder), in order, as long as the time guard
    allows."""
    outcomes = []
    for name in args.models:
        left = deadline - time.monotonic()
        if left < MIN_MODEL_S:
            outcomes.append(Outcome(name, estimate=estimates[name], note=f"skipped by the time guard ({left:.0f} s left)"))
            continue
        started = time.monotonic()
        measured, why_not = run_worker(name, args, left)
        seconds = time.monotonic() - started
        if measured is None:
            outcomes.append(Outcome(name, estimate=estimates[name], seconds=seconds, note=why_not))
            print(f"{name}: {why_not}", flush=True)
            continue
        print(describe_depths(name, measured), flush=True)
        outcomes.append(outcome_of(name, measured, estimates[name], seconds))
    return outcomes


def dry_run(args, rows, estimates: dict[str, float], compute_dtypes: dict[str, str]) -> list[Outcome]:
    """The CPU part: each model's configs at every measured depth, its tokenizer, its rows encoded and the longest
    batch the collator makes of them; no model is built."""
    from dialogsum.features import tokenize_rows

    outcomes = []
    for name in args.models:
        started = time.monotonic()
        depths = measured_depths(name)
        configs = [rehearsal_config(name, layers, args.pad_to_max_length) for layers in depths]
        cfg = configs[0]
        tokenizer, tokenizer_source = rehearsal_tokenizer(cfg, rows)
        encoded = tokenize_rows(cfg, tokenizer, rows.dialogues, rows.summaries)
        order = training_order(cfg, encoded, args.steps * cfg.training.gradient_accumulation_steps)
        tokens = batch_tokens(cfg, encoded, order)
        print(f"{name}: {tokenizer_source}\n  {'; '.join(width(c) for c in configs)}\n  {len(tokens)} micro-batches of "
              f"{sum(tokens):,} tokens; estimate {estimates[name] / GIB:.2f} GiB at full depth", flush=True)  # fmt: skip
        outcomes.append(Outcome(name, training_form(cfg, compute_dtypes[name]), tokenizer_source, layers_label(depths),
                                padded_shape(cfg, tokenizer, encoded, order), estimates[name],
                                seconds=time.monotonic() - started, note="dry run: not trained"))  # fmt: skip
    return outcomes


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def summary_table(outcomes: list[Outcome]) -> str:
    """One line per model: bytes and tokens/s at its full depth."""
    header = ("model", "training", "tokenizer", "layers", "longest batch", "peak alloc GiB", "peak resv GiB",
              "estimate GiB", "estimate vs alloc", "tokens/s", "s", "note")  # fmt: skip
    rows = [header]
    for o in outcomes:
        error = real_size.verdict(o.estimate, o.peak_allocated) if o.estimate and o.peak_allocated else "-"
        tokenizer = o.tokenizer.split(":")[0] + (" + card template" if "chat template" in o.tokenizer else "")
        rows.append((o.name, o.training, tokenizer, o.layers, o.longest_batch, gib(o.peak_allocated), gib(o.peak_reserved),
                     gib(o.estimate), error, "-" if o.tokens_per_s is None else f"{o.tokens_per_s:,.0f}",
                     "-" if o.seconds is None else f"{o.seconds:.0f}", o.note))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def node_plans(scheduler, estimates: dict[str, float], outcomes: list[Outcome]) -> str:
    """The scheduler's placement of the trainings on 8 x 80 GiB GPUs: from preflight's estimates, then from the
    measured peaks (reserved, at full depth) of the models that were measured."""
    devices = [scheduler.GpuDevice(index=i, total_bytes=NODE_GPU_BYTES, free_bytes=NODE_GPU_BYTES) for i in range(NODE_GPUS)]
    measured = {o.name: o.peak_reserved for o in outcomes if o.peak_reserved is not None}
    unmeasured = [name for name in estimates if name not in measured]
    measured_title = "the measured peaks (reserved, extrapolated to full depth)" + (f"; not measured, so left out: {', '.join(unmeasured)}" if unmeasured else "")
    plans = []
    for title, sizes in (("preflight's estimates", estimates), (measured_title, measured)):
        if not sizes:
            continue
        requests = [scheduler.GpuRequest(name=name, gpus=None, estimate_bytes=int(size)) for name, size in sizes.items()]
        plans.append(f"Plan for {NODE_GPUS} x {NODE_GPU_BYTES // GIB} GiB GPUs from {title}:\n"
                     + scheduler.format_plan(scheduler.plan_placement(requests, devices)))  # fmt: skip
    return "\n\n".join(plans)


def gpu_or_exit():
    """This machine's CUDA device, or SystemExit saying this is a GPU-only check."""
    from dialogsum.precision import detect_device

    device = detect_device()
    if device.kind != "cuda":
        raise SystemExit("seed_rehearsal.py is a GPU-only check and this machine has no CUDA device "
                         f"(detected: {device.name}). Run it on a GPU machine, or pass --dry-run for its CPU part.")  # fmt: skip
    return device


def gpu_scheduler():
    """`dialogsum.pipeline.gpu_scheduler`, imported before any training so that a checkout without it stops at once."""
    try:
        from dialogsum.pipeline import gpu_scheduler as scheduler
    except ImportError as e:
        raise SystemExit(f"seed_rehearsal.py prints the plan of dialogsum.pipeline.gpu_scheduler, which this checkout "
                         f"cannot import ({e})") from e  # fmt: skip
    return scheduler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=SEED_MODELS, default=list(SEED_MODELS), help="seed models to rehearse, in this order")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per model and depth (each the config's gradient-accumulation micro-batches)")
    parser.add_argument("--rows", type=int, help="train on the first N labelled rows (default: all)")
    parser.add_argument("--allow-sample", action="store_true", help="without the competition's rows, use the 64 bundled sample rows instead of stopping")
    parser.add_argument("--pad-to-max-length", action="store_true", help="pad every batch to the config's lengths (the shape preflight estimates)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds the whole rehearsal may take (the time guard)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU part: configs, tokenizers, batches, estimates and the estimate plan; no model")
    parser.add_argument("--worker", metavar="MODEL", choices=SEED_MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = list(dict.fromkeys(args.models))
    if args.steps < 1:
        parser.error("--steps takes a positive number of optimizer steps")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        rows, _ = labelled_rows(args.rows, args.allow_sample)
        depths = [measure_depth(args.worker, layers, rows, args.steps, args.pad_to_max_length) for layers in measured_depths(args.worker)]
        print(json.dumps({"model": args.worker, "depths": depths}))
        return
    deadline = time.monotonic() + args.time_limit - PLANS_S
    from dialogsum.config import load_model_config
    from dialogsum.precision import DeviceInfo, resolve_precision

    device = DeviceInfo("cuda", "an H200 (assumed by --dry-run)", True, 141 * 10**9, 141 * 10**9) if args.dry_run else gpu_or_exit()
    scheduler = gpu_scheduler()
    rows, rows_used = labelled_rows(args.rows, args.allow_sample)
    for name in args.models:
        real_tokenizer(name)  # a missing real tokenizer stops the run before any training
    print(f"rows: {rows_used}\ndevice: {device.name}; models: {', '.join(args.models)}; {args.steps} optimizer step(s) each\n", flush=True)
    compute_dtypes = {name: resolve_precision(load_model_config(name).precision, device).compute_dtype for name in args.models}
    estimates = {name: preflight_estimate(name, compute_dtypes[name]) for name in args.models}
    with tempfile.TemporaryDirectory(prefix="dialogsum-rehearsal-") as cache:
        os.environ["DIALOGSUM_CACHE_DIR"] = cache
        outcomes = dry_run(args, rows, estimates, compute_dtypes) if args.dry_run else rehearse(args, estimates, deadline)
    print(f"\n{summary_table(outcomes)}\n\n{node_plans(scheduler, estimates, outcomes)}")


if __name__ == "__main__":
    main()
