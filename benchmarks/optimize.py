"""INT8 on CPU, measured side by side in one process: size, speed and sweep overhead on a KoBART-sized BART, and the
ROUGE change on a trained small model.

1. Speed and size: a BART of KoBART's shape (6+6 layers, d_model 768, 16 heads, FFN 3072, the real KoBART
   tokenizer: 30,000 pieces + the dialogue tags), random init, saved like a trained model. fp32 and int8 are
   each loaded once and swept over batch sizes on real Korean dialogues (their real length mix), through
   `dialogsum.optimize.measure_variants`. Random weights never emit EOS early, so every summary has exactly
   `--max-new-tokens` tokens and both variants do the same work. Printed: size on disk of each saved model and
   their ratio; the int8/fp32 throughput ratio at the chosen batch size (`recommend`'s rule on speed alone:
   random weights have no quality to keep) by wall time and by process CPU time per sample; the sweep
   overhead (load + quantize + warm-up + sweep wall time over pure generation time). Other work on a shared
   machine inflates wall time (and, through OpenMP spin-waits, CPU time): the load average is printed.
2. Quality: a kobart-tiny model trained briefly on real rows, optimised by `optimize_run` into a temporary
   MLflow store; printed: Korean ROUGE final of fp32 and int8 on the same rows, the change, the agreement.

Targets: throughput ratio >= 3, ROUGE change <= 0.5 final, sweep overhead <= 1.2.

    python benchmarks/optimize.py [--n-samples 16] [--batch-sizes 1,2,4,8] [--num-beams 1] [--max-new-tokens 32]
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
    from dialogsum.models import build_model, load_tokenizer, save_for_inference
    from dialogsum.precision import detect_device, resolve_precision

    cfg = load_model_config("kobart-tiny", KOBART_SHAPE)
    tokenizer = load_tokenizer(cfg)
    built = build_model(cfg, tokenizer, resolve_precision("fp32", detect_device()), for_training=False)
    return save_for_inference(built, cfg, folder, built.model)


def speed_and_size(args, workdir: Path) -> None:
    from dialogsum.data import read_dialogues
    from dialogsum.optimize import Budget, SweepSettings, measure_variants, recommend

    data = read_dialogues(LABELLED, require_summary=True).head(args.n_samples)
    generation = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
                  "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}  # fmt: skip
    model_dir = kobart_sized_model(workdir / "kobart-sized")
    report = measure_variants(model_dir, ["fp32", "int8"], data, args.batch_sizes, device="cpu", workdir=workdir / "variants",
                              generation=generation, settings=SweepSettings(min_gain=args.min_gain))  # fmt: skip
    fp32, int8 = report.results["fp32"], report.results["int8"]
    print(f"\n== KoBART-sized BART ({report.total_params / 1e6:.1f}M parameters), {len(data)} real dialogues, generation {generation}")
    print(f"{'variant':<8}{'batch':>6}{'status':>8}{'p50 s':>9}{'p95 s':>9}{'samples/s':>11}{'cpu s/sample':>14}{'peak RSS GB':>13}")
    for result in (fp32, int8):
        for p in result.sweep.points:
            per_sample = p.cpu_s / p.samples if p.samples else float("nan")
            print(f"{p.variant:<8}{p.batch_size:>6}{p.status:>8}{p.latency_s(50):>9.2f}{p.latency_s(95):>9.2f}{p.throughput_sps:>11.2f}"
                  f"{per_sample:>14.2f}{p.peak_memory_bytes / 1e9:>13.2f}")  # fmt: skip
        print(f"  {result.sweep.variant}: {result.sweep.stop_reason}")
    sizes = {"fp32": fp32.size_bytes, "int8": int8.size_bytes}
    quality = {name: r.quality for name, r in report.results.items() if r.quality}
    choice = recommend(report.sweeps, quality, sizes, Budget(max_rouge_drop=float("inf")))
    fast, slow = int8.sweep.point(choice.batch_size), fp32.sweep.point(choice.batch_size)
    print(f"size on disk: fp32 {fp32.size_bytes / 1e6:.1f} MB, int8 {int8.size_bytes / 1e6:.1f} MB -> ratio {fp32.size_bytes / int8.size_bytes:.2f}x; "
          f"weights in memory: fp32 {fp32.model_bytes / 1e6:.1f} MB, int8 {int8.model_bytes / 1e6:.1f} MB "
          "(peak RSS above is the whole process, including what the fp32 phase left behind)")  # fmt: skip
    print(f"chosen: {choice.variant} at batch size {choice.batch_size} ({choice.reason})")
    for p in int8.sweep.points:
        base = fp32.sweep.point(p.batch_size)
        if p.ok and base is not None:
            print(f"  int8/fp32 at batch size {p.batch_size}: {p.throughput_sps / base.throughput_sps:.2f}x")
    if fast is None or slow is None:
        print(f"fp32 or int8 did not run batch size {choice.batch_size}; no throughput ratio")
    else:
        cpu_ratio = (slow.cpu_s / slow.samples) / (fast.cpu_s / fast.samples)
        print(f"throughput int8/fp32 at batch size {choice.batch_size}: {fast.throughput_sps / slow.throughput_sps:.2f}x wall-clock, "
              f"{cpu_ratio:.2f}x by CPU time per sample (target >= 3)")  # fmt: skip
    best = {r.sweep.variant: max((p for p in r.sweep.points if p.ok), key=lambda p: p.throughput_sps) for r in (fp32, int8)}
    print(f"each at its best batch size: int8 {best['int8'].throughput_sps:.2f} samples/s (batch {best['int8'].batch_size}) / fp32 "
          f"{best['fp32'].throughput_sps:.2f} (batch {best['fp32'].batch_size}) = {best['int8'].throughput_sps / best['fp32'].throughput_sps:.2f}x")  # fmt: skip
    generate = sum(r.sweep.generate_s for r in (fp32, int8))
    print(f"sweep overhead: {report.sweep_overhead:.3f} (load+quantize+warm-up+sweep {sum(r.load_s + r.sweep_s for r in (fp32, int8)):.1f} s / "
          f"timed generation {generate:.1f} s; load fp32 {fp32.load_s:.1f} s, int8 {int8.load_s:.1f} s (with quantization); "
          f"warm-up batch fp32 {fp32.sweep.warmup_s:.1f} s, int8 {int8.sweep.warmup_s:.1f} s; target <= 1.2)")  # fmt: skip


def quality(args) -> None:
    import mlflow

    from dialogsum.optimize import SweepSettings, optimize_run
    from dialogsum.train import train_model

    run_id = train_model("kobart-tiny", train_path=LABELLED, eval_path=LABELLED,
                         overrides={"training.epochs": args.train_epochs, "training.max_train_samples": 400,
                                    "training.max_eval_samples": 8, "tokenizer.path": str(KOBART_TOKENIZER)})  # fmt: skip
    optimized = optimize_run(run_id, quantization="int8", batch_sizes=(8,), data_path=LABELLED, n_samples=args.quality_samples,
                             settings=SweepSettings(min_batches=1))  # fmt: skip
    m = mlflow.get_run(optimized).data.metrics
    print(f"\n== trained kobart-tiny, {args.quality_samples} rows, its own generation settings")
    print(f"Korean ROUGE final: fp32 {m['fp32_eval_final']:.2f}, int8 {m['int8_eval_final']:.2f} -> change {-m['int8_rouge_drop']:+.2f} "
          f"(target: drop <= 0.5); agreement with fp32: ROUGE final {m['int8_agreement_final']:.1f}, "
          f"identical {m['int8_exact_match']:.0%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        quality(args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} CPUs: other work on this machine inflates wall-clock numbers)")  # fmt: skip


if __name__ == "__main__":
    main()
