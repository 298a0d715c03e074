"""INT8 on CPU, measured side by side in one process: size, speed and sweep overhead on a KoBART-sized BART, and the
ROUGE change on a trained small model.

1. Speed and size: a BART of KoBART's shape (6+6 layers, d_model 768, 16 heads, FFN 3072, the real KoBART
   tokenizer: 30,000 pieces + the dialogue tags), random init, saved like a trained model. The model as saved
   (`scored`: fp32 on the CPU) and each variant (`--variants`, default int8; bnb-nf4 and bnb-int8 run on
   bitsandbytes' CPU backend) are each loaded once and swept over every batch size on real Korean dialogues (their
   real length mix), through `dialogsum.optimize.measure_variants`. Random weights never emit EOS early, so every
   summary has exactly `--max-new-tokens` tokens and every variant does the same work. Printed: size of each model
   and the computed fp32 size over it; each variant's throughput ratio to fp32 per batch size and each at its best batch size; the
   chosen variant's ratio at the chosen batch size (`recommend`'s rule on speed alone: random weights have no
   quality to keep) by wall time and by process CPU time per sample; the sweep overhead (load + quantize +
   warm-up + sweep wall time over pure generation time). Other work on a shared machine inflates wall time (and,
   through OpenMP spin-waits, CPU time): the load average is printed.
2. Quality: a kobart-tiny model trained briefly on real rows, optimised by `optimize_run` into a temporary
   MLflow store on rows it never trained on; printed: Korean ROUGE final of the fp32 model and each variant on the same
   rows, the change with its paired-bootstrap interval, the agreement.

Targets: throughput ratio >= 3, ROUGE change <= 0.5 final, sweep overhead <= 1.2.

    python benchmarks/optimize.py [--variants int8,bnb-nf4,bnb-int8] [--n-samples 16] [--batch-sizes 1,2,4,8] [--num-beams 1] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
LABELLED = SHARED / "data" / "dialogsum-ko" / "labeled.csv"
KOBART_TOKENIZER = SHARED / "tokenizers" / "kobart"
KOBART_SHAPE = {
    "architecture.d_model": 768,
    "architecture.encoder_layers": 6,
    "architecture.decoder_layers": 6,
    "architecture.encoder_attention_heads": 16,
    "architecture.decoder_attention_heads": 16,
    "architecture.encoder_ffn_dim": 3072,
    "architecture.decoder_ffn_dim": 3072,
    "tokenizer.path": str(KOBART_TOKENIZER),
    "training.max_source_length": 512,
}


def kobart_sized_model(folder: Path) -> Path:
    from dialogsum.config import load_model_config
    from dialogsum.models import build_model, load_tokenizer
    from dialogsum.precision import detect_device, resolve_precision
    from dialogsum.serving import saved_model

    cfg = load_model_config("kobart-tiny", KOBART_SHAPE)
    tokenizer = load_tokenizer(cfg)
    built = build_model(cfg, tokenizer, resolve_precision("fp32", detect_device()), for_training=False)
    return saved_model.write_trained(folder, built, cfg, built.model)


def speed_and_size(args, workdir: Path) -> None:
    from dialogsum.data import read_dialogues
    from dialogsum.optimize import Budget, SweepSettings, measure_variants, recommend
    from dialogsum.quantize import BASELINE, resolve_variants

    data = read_dialogues(LABELLED, require_summary=True).head(args.n_samples)
    generation = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
                  "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}  # fmt: skip
    model_dir = kobart_sized_model(workdir / "kobart-sized")
    variants = resolve_variants(args.variants, "cpu")
    report = measure_variants(model_dir, variants, data, args.batch_sizes, device="cpu", workdir=workdir / "variants",
                              generation=generation, settings=SweepSettings(min_gain=args.min_gain))  # fmt: skip
    results = report.results
    fp32 = results[BASELINE]  # the saved model, which trained (and so is scored) in fp32 on the CPU
    print(f"\n== KoBART-sized BART ({report.total_params / 1e6:.1f}M parameters), {len(data)} real dialogues, generation {generation}")
    print(f"{'variant':<9}{'batch':>6}{'status':>8}{'p50 s':>9}{'p95 s':>9}{'samples/s':>11}{'cpu s/sample':>14}{'peak RSS GB':>13}")
    for result in results.values():
        for p in result.sweep.points:
            per_sample = p.cpu_s / p.samples if p.samples else float("nan")
            print(f"{p.variant:<9}{p.batch_size:>6}{p.status:>8}{p.latency_s(50):>9.2f}{p.latency_s(95):>9.2f}{p.throughput_sps:>11.2f}"
                  f"{per_sample:>14.2f}{p.peak_memory_bytes / 1e9:>13.2f}")  # fmt: skip
        print(f"  {result.sweep.variant}: {result.sweep.stop_reason}")
    print("size on disk / weights in memory (peak RSS above is the whole process, including what earlier variants left behind):")
    for name, r in results.items():
        print(f"  {name:<9}{r.size_bytes / 1e6:>8.1f} MB (computed fp32 / this: {report.fp32_size_bytes / r.size_bytes:.2f}x), "
              f"{r.model_bytes / 1e6:.1f} MB in memory")  # fmt: skip
    quality = {name: r.quality for name, r in results.items() if r.quality}
    choice = recommend(report.sweeps, quality, {n: r.size_bytes for n, r in results.items()}, Budget(max_rouge_drop=float("inf")))
    print(f"chosen: {choice.variant} at batch size {choice.batch_size} ({choice.reason})")
    best = {name: max((p for p in r.sweep.points if p.ok), key=lambda p: p.throughput_sps) for name, r in results.items()}
    for name in variants[1:]:
        ratios = [f"{p.batch_size}: {p.throughput_sps / base.throughput_sps:.2f}x" for p in results[name].sweep.points
                  if p.ok and (base := fp32.sweep.point(p.batch_size)) is not None]  # fmt: skip
        print(f"{name}/fp32 throughput by batch size: {', '.join(ratios)}; each at its best batch size: "
              f"{best[name].throughput_sps:.2f} (batch {best[name].batch_size}) / {best[BASELINE].throughput_sps:.2f} "
              f"(batch {best[BASELINE].batch_size}) = {best[name].throughput_sps / best[BASELINE].throughput_sps:.2f}x")  # fmt: skip
    fast, slow = results[choice.variant].sweep.point(choice.batch_size), fp32.sweep.point(choice.batch_size)
    if choice.variant == BASELINE:
        print(f"no quantized variant beat fp32 (batch size {choice.batch_size}); no throughput ratio")
    elif slow is None:
        print(f"fp32 did not run batch size {choice.batch_size}; no throughput ratio there")
    else:
        cpu_ratio = (slow.cpu_s / slow.samples) / (fast.cpu_s / fast.samples)
        print(f"throughput {choice.variant}/fp32 at the chosen batch size {choice.batch_size}: {fast.throughput_sps / slow.throughput_sps:.2f}x "
              f"wall-clock, {cpu_ratio:.2f}x by CPU time per sample (target >= 3)")  # fmt: skip
    generate = sum(r.sweep.generate_s for r in results.values())
    loads = ", ".join(f"{n} {r.load_s:.1f} s" for n, r in results.items())
    warmups = ", ".join(f"{n} {r.sweep.warmup_s:.1f} s" for n, r in results.items())
    print(f"sweep overhead: {report.sweep_overhead:.3f} (load+quantize+warm-up+sweep {sum(r.load_s + r.sweep_s for r in results.values()):.1f} s / "
          f"timed generation {generate:.1f} s; load (with quantization) {loads}; warm-up batch {warmups}; target <= 1.2)")  # fmt: skip


def quality(args, workdir: Path) -> None:
    """Train kobart-tiny on the labelled rows except the last `quality_samples`, then measure each variant's ROUGE on
    those held-out rows: rows the model never trained on."""
    import mlflow

    from dialogsum.data import read_dialogues, write_dialogues
    from dialogsum.optimize import SweepSettings, optimize_run
    from dialogsum.quantize import VARIANTS, resolve_variants
    from dialogsum.training.recipe import train_model

    data = read_dialogues(LABELLED)
    cut = len(data) - args.quality_samples
    train = write_dialogues(data.subset(data.rows[:cut], f"first {cut} rows"), workdir / "train.csv")
    held_out = write_dialogues(data.subset(data.rows[cut:], f"last {args.quality_samples} rows"), workdir / "held_out.csv")
    run_id = train_model("kobart-tiny", train_path=train,
                         overrides={"training.epochs": args.train_epochs, "training.max_validation_samples": 8,
                                    "tokenizer.path": str(KOBART_TOKENIZER)})  # fmt: skip
    optimized = optimize_run(run_id, quantization=args.variants, batch_sizes=(8,), data_path=held_out,
                             n_samples=args.quality_samples, settings=SweepSettings(min_batches=1))  # fmt: skip
    m = mlflow.get_run(optimized).data.metrics
    print(f"\n== trained kobart-tiny ({cut} training rows), its own generation settings, on the {args.quality_samples} held-out "
          f"rows it never trained on; Korean ROUGE final: fp32 {m['scored_val_final']:.2f}")  # fmt: skip
    for name in resolve_variants(args.variants, "cpu")[1:]:
        prefix = VARIANTS[name].metric_prefix
        print(f"{name}: {m[f'{prefix}_val_final']:.2f} -> change {-m[f'{prefix}_rouge_drop']:+.2f} (target: drop <= 0.5), "
              f"paired difference {m[f'{prefix}_val_diff_vs_scored']:+.2f} [{m[f'{prefix}_val_diff_vs_scored_ci95_low']:+.2f}, "
              f"{m[f'{prefix}_val_diff_vs_scored_ci95_high']:+.2f}]; agreement with fp32: ROUGE final "
              f"{m[f'{prefix}_agreement_final']:.1f}, identical {m[f'{prefix}_exact_match']:.0%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="int8", help="variants besides the saved fp32 model, e.g. int8,bnb-nf4,bnb-int8")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-gain", type=float, default=None,
                        help="stop growing a variant's batch at a smaller gain (default: measure every batch size, so the "
                             "int8/fp32 ratio exists at each)")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--quality-samples", type=int, default=64)
    args = parser.parse_args()
    from transformers.utils.logging import disable_progress_bar

    for path in (LABELLED, KOBART_TOKENIZER):
        if not path.exists():
            raise SystemExit(f"missing shared data: {path}")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dialogsum-bench-optimize-") as tmp:
        os.chdir(tmp)  # MLflow's default artifact root is ./mlruns
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ.setdefault("DIALOGSUM_CACHE_DIR", f"{tmp}/cache")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        disable_progress_bar()
        speed_and_size(args, Path(tmp))
        quality(args, Path(tmp))
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} CPUs: other work on this machine inflates wall-clock numbers)")  # fmt: skip


if __name__ == "__main__":
    main()
