"""Preflight's memory estimate against a measured training step, at the seed models' real dimensions.

Each seed architecture is built from a config at its real width (random init, so no download), loaded through
dialogsum's own `build_model` (the same dtype, LoRA wrapping, trainable tag rows and 4-bit nf4 quantization as a
training), and given one training step (forward, backward, AdamW) on a batch at the config's source and target
lengths. Each measurement runs in a fresh process:

- CPU (default): peak resident memory of the step (`VmHWM` reset after loading, minus the interpreter and
  libraries measured before loading), in the CPU's dtype (fp32). KoBART runs at its real size. The LLMs run at
  their real width with 2 and 4 layers, extrapolated linearly in layers to their real depth; the extrapolation is
  validated on KoBART (2 and 4 layers per stack against the real 6). Two cores cannot run an LLM step at the
  config's batch size in reasonable time, so the LLMs use `--llm-batch-size` (default 1) and the estimate is made
  for that same batch. The QLoRA rows on CPU measure bitsandbytes' CPU path, whose 4-bit matmul keeps each layer's
  dequantized fp32 weight for backward (about 4 bytes per parameter instead of 0.55): they show that path's cost
  and are not a check of the estimate, which is for CUDA; only `--device cuda` checks QLoRA.
- `--device cuda` (when a GPU is lent): every model at real size and at the config's batch size, QLoRA nf4 for
  SOLAR-10.7B and the two 12.8B models and bf16 LoRA for the 3-4B ones; peak is `torch.cuda.max_memory_allocated`
  during the step plus the weights, and tokens/s is reported. Then one KoBART epoch of 12,457 rows (the
  competition's train size; the labelled rows replicated) is timed and 10 epochs projected (goal: under 3 minutes
  on an H200).

The target is every estimate within -10% / +25% of the measured peak.

    python benchmarks/real_size.py                     # CPU table (about 15-25 minutes on 2 cores)
    python benchmarks/real_size.py --device cuda       # GPU table and the timed KoBART epoch
    python benchmarks/real_size.py --epoch-only --epoch-rows 64    # the epoch timing alone (a CPU smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
# What the model configs do not state (they give width, depth, MLP size and vocabulary): the rest of each real
# architecture, from the models' config.json on the hub.
ARCHITECTURES = {
    "kobart": {"model_type": "bart", "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 16,
               "decoder_attention_heads": 16, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072, "d_model": 768,
               "max_position_embeddings": 1026, "vocab_size": 30000},
    "llama-3.2-korean-3b": {"model_type": "llama", "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                            "max_position_embeddings": 4096},
    "qwen3-4b": {"model_type": "qwen3", "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 4096},
    "solar-10.7b": {"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 8,
                    "max_position_embeddings": 4096},
    "polyglot-ko-12.8b": {"model_type": "gpt_neox", "num_attention_heads": 40, "rotary_pct": 0.5,
                          "max_position_embeddings": 2048, "vocab_size": 30080},
    "kullm-v2": {"model_type": "gpt_neox", "num_attention_heads": 40, "rotary_pct": 0.5,
                 "max_position_embeddings": 2048, "vocab_size": 30080},
}  # fmt: skip
KOBART_LAYERS = (2, 4, 6)  # per stack
LLM_LAYERS = (2, 4)


def architecture(name: str, layers: int | None, cfg) -> dict:
    """The real architecture of `name`, with `layers` layers (per stack for KoBART) instead of its own depth."""
    arch = dict(ARCHITECTURES[name])
    d = cfg.dimensions
    if arch["model_type"] == "bart":
        if layers is not None:
            arch["encoder_layers"] = arch["decoder_layers"] = layers
        return arch
    arch.update({"hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size, "tie_word_embeddings": d.tied_embeddings,
                 "num_hidden_layers": layers or d.num_layers, "vocab_size": arch.get("vocab_size", d.vocab_size)})  # fmt: skip
    return arch


def measured_config(name: str, layers: int | None, batch_size: int):
    """The seed config as a config-source model of that architecture (random init), at `batch_size`."""
    from dialogsum.config import load_model_config

    cfg = load_model_config(name)
    return cfg.model_copy(update={"source": "config", "hub_id": None, "architecture": architecture(name, layers, cfg),
                                  "training": cfg.training.model_copy(update={"batch_size": batch_size})})  # fmt: skip


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(name: str, layers: int | None, batch_size: int, device: str, tokenizer_texts: list[str]) -> dict:
    """One training step of the model in this process: peak bytes, seconds, tokens/s."""
    import torch

    from dialogsum.models import build_model, load_tokenizer
    from dialogsum.precision import detect_device, resolve_precision

    cfg = measured_config(name, layers, batch_size)
    tokenizer = load_tokenizer(cfg, tokenizer_texts)
    policy = resolve_precision(cfg.precision if device == "cuda" else "fp32", detect_device())
    runtime = rss_bytes("VmRSS")
    model = build_model(cfg, tokenizer, policy).model
    if device == "cuda" and cfg.quantization == "none":
        model.to("cuda")
    t = cfg.training
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    if cfg.task == "seq2seq":
        batch = {"input_ids": torch.randint(0, vocab, (batch_size, t.max_source_length), generator=generator),
                 "labels": torch.randint(0, vocab, (batch_size, t.max_target_length), generator=generator)}  # fmt: skip
    else:
        ids = torch.randint(0, vocab, (batch_size, t.max_source_length + t.max_target_length), generator=generator)
        batch = {"input_ids": ids, "labels": ids.clone()}
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the step, not of loading
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=policy.torch_dtype(), enabled=policy.mixed_precision != "no"):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_bytes("VmHWM") - runtime
    seconds = time.perf_counter() - start
    tokens = batch["input_ids"].numel() + (batch["labels"].numel() if cfg.task == "seq2seq" else 0)
    return {"peak_bytes": peak, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "params": sum(p.numel() for p in model.parameters()), "loss": float(loss)}  # fmt: skip


def run_measurement(name: str, layers: int | None, batch_size: int, device: str) -> dict:
    """`measure` in a fresh process, after a first process has written the random-init checkpoint to the cache (so
    building the fp32 model for the checkpoint does not count)."""
    args = [name, str(layers or 0), str(batch_size), device]
    for phase in ("prepare", "measure"):
        result = subprocess.run([sys.executable, __file__, f"--{phase}", *args], capture_output=True, text=True)
        if result.returncode != 0:
            return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def estimate(name: str, batch_size: int, device: str, layers: int | None = None, compute_dtype: str | None = None) -> float:
    """Preflight's estimate for `name` at `batch_size` (KoBART at `layers` per stack when given), in `compute_dtype`,
    or when unset in the config's precision on this machine for `device` "cuda" and in fp32 for "cpu"."""
    from dialogsum.config import load_model_config
    from dialogsum.precision import detect_device, resolve_precision
    from dialogsum.preflight import estimate_memory

    cfg = load_model_config(name)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"batch_size": batch_size})})
    if layers is not None:  # KoBART at another depth: scale its parameters and layers
        real = cfg.dimensions.num_layers
        per_layer = (cfg.params_billions * 1e9 - cfg.dimensions.vocab_size * cfg.dimensions.hidden_size) / real
        params = cfg.dimensions.vocab_size * cfg.dimensions.hidden_size + per_layer * 2 * layers
        cfg = cfg.model_copy(update={"params_billions": params / 1e9,
                                     "dimensions": cfg.dimensions.model_copy(update={"num_layers": 2 * layers})})  # fmt: skip
    if compute_dtype is None:
        dtype = resolve_precision(cfg.precision, detect_device()).torch_dtype() if device == "cuda" else None
        compute_dtype = str(dtype).removeprefix("torch.") if dtype else "float32"
    return estimate_memory(cfg, compute_dtype).total


def extrapolate(points: dict[int, float], depth: int) -> float:
    (l1, m1), (l2, m2) = sorted(points.items())[:2]
    return m1 + (m2 - m1) / (l2 - l1) * (depth - l1)


def verdict(estimated: float, measured: float) -> str:
    error = estimated / measured - 1
    return f"{100 * error:+.0f}% {'ok' if -0.10 <= error <= 0.25 else 'MISS'}"


def cpu_table(args) -> None:
    from dialogsum.config import load_model_config

    print(f"CPU, fp32, one AdamW step; KoBART at its config's batch size, LLMs at batch {args.llm_batch_size} "
          f"(estimate made for that batch); peak RSS of the step\n")
    kobart = load_model_config("kobart")
    points = {}
    for layers in KOBART_LAYERS:
        m = run_measurement("kobart", layers, kobart.training.batch_size, "cpu")
        points[layers] = m.get("peak_bytes", float("nan"))
        est = estimate("kobart", kobart.training.batch_size, "cpu", layers)
        print(f"kobart {layers}+{layers} layers: measured {points[layers] / GIB:.2f} GiB, estimate {est / GIB:.2f} GiB "
              f"({verdict(est, points[layers])}), step {m.get('step_s', float('nan')):.1f} s {m.get('error', '')}", flush=True)
    extrapolated = extrapolate({2: points[2], 4: points[4]}, 6)
    print(f"extrapolation check: kobart 6+6 from 2 and 4 layers {extrapolated / GIB:.2f} GiB vs measured "
          f"{points[6] / GIB:.2f} GiB ({100 * (extrapolated / points[6] - 1):+.1f}%)\n", flush=True)
    rows = [("kobart", "full FT fp32", kobart.training.batch_size, points[6], estimate("kobart", kobart.training.batch_size, "cpu"), "measured")]
    for name in args.models:
        cfg = load_model_config(name)
        measured = {}
        for layers in LLM_LAYERS:
            m = run_measurement(name, layers, args.llm_batch_size, "cpu")
            measured[layers] = m.get("peak_bytes", float("nan"))
            print(f"{name} {layers} layers: {measured[layers] / GIB:.2f} GiB, step {m.get('step_s', float('nan')):.1f} s, "
                  f"{m.get('tokens_per_s', float('nan')):.0f} tokens/s {m.get('error', '')}", flush=True)
        form = "QLoRA nf4" if cfg.quantization == "4bit" else "LoRA fp32"
        how = f"from {LLM_LAYERS[0]},{LLM_LAYERS[1]} layers"
        if cfg.quantization == "4bit":  # not a check of the GPU estimate: see the module docstring
            how += "; CPU bitsandbytes keeps each layer's dequantized fp32 weight for backward"
        rows.append((name, form, args.llm_batch_size, extrapolate(measured, cfg.dimensions.num_layers),
                     estimate(name, args.llm_batch_size, "cpu"), how))  # fmt: skip
    print(f"\n{'model':22s} {'training':12s} {'batch':>5s} {'measured':>10s} {'estimate':>10s}  error  (target -10%..+25%)")
    for name, form, batch, measured_bytes, est, how in rows:
        print(f"{name:22s} {form:12s} {batch:5d} {measured_bytes / GIB:8.2f} GiB {est / GIB:8.2f} GiB  {verdict(est, measured_bytes)}  [{how}]")


def kobart_epoch(rows: int, device: str, data: Path | None) -> dict:
    """One epoch of real-size KoBART over `rows` training rows (the labelled rows replicated: the competition's
    train set has 12,457), at the config's batch size and lengths, through dialogsum's tokenizer, length-grouped
    sampler, collator and the precision policy's autocast, with AdamW; seconds, and 10 epochs projected."""
    import torch
    from torch.utils.data import DataLoader

    from dialogsum.config import load_model_config
    from dialogsum.data import read_dialogues, sample_data_path
    from dialogsum.features import EpochSeededSampler, build_collator, tokenize_rows
    from dialogsum.models import build_model, load_tokenizer
    from dialogsum.precision import detect_device, resolve_precision

    labelled = read_dialogues(data or sample_data_path("train"))
    repeat = -(-rows // len(labelled))
    dialogues, summaries = (labelled.dialogues * repeat)[:rows], (labelled.summaries * repeat)[:rows]
    cfg = measured_config("kobart", None, load_model_config("kobart").training.batch_size)
    tokenizer = load_tokenizer(cfg, sample_texts())
    policy = resolve_precision(cfg.precision if device == "cuda" else "fp32", detect_device())
    model = build_model(cfg, tokenizer, policy).model.to(device)
    encoded = tokenize_rows(cfg, tokenizer, dialogues, summaries)
    t = cfg.training
    sampler = EpochSeededSampler([len(ids) for ids in encoded["input_ids"]], t.batch_size, t.seed, True)
    loader = DataLoader(encoded, batch_size=t.batch_size, sampler=sampler, collate_fn=build_collator(cfg, tokenizer), num_workers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate)
    model.train()
    start = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device_type=device, dtype=policy.torch_dtype(), enabled=policy.mixed_precision != "no"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"rows": rows, "epoch_s": seconds, "ten_epochs_min": 10 * seconds / 60, "rows_per_s": rows / seconds}


def cuda_table(args) -> None:
    from dialogsum.config import load_model_config

    print("CUDA, the config's precision and batch size, one AdamW step; peak = torch.cuda.max_memory_allocated\n")
    print(f"{'model':22s} {'batch':>5s} {'measured':>10s} {'estimate':>10s}  error  tokens/s")
    for name in ["kobart", *args.models]:
        cfg = load_model_config(name)
        m = run_measurement(name, None, cfg.training.batch_size, "cuda")
        if "error" in m:
            print(f"{name:22s} failed: {m['error']}")
            continue
        est = estimate(name, cfg.training.batch_size, "cuda")
        print(f"{name:22s} {cfg.training.batch_size:5d} {m['peak_bytes'] / GIB:8.2f} GiB {est / GIB:8.2f} GiB  "
              f"{verdict(est, m['peak_bytes'])}  {m['tokens_per_s']:.0f}", flush=True)
    epoch = kobart_epoch(args.epoch_rows, "cuda", args.data)
    print(f"\nKoBART real size, one epoch of {epoch['rows']} rows: {epoch['epoch_s']:.1f} s ({epoch['rows_per_s']:.0f} rows/s); "
          f"10 epochs projected {epoch['ten_epochs_min']:.1f} min (goal < 3 min on an H200)")


def sample_texts() -> list[str]:
    from dialogsum.data import read_dialogues, sample_data_path

    rows = read_dialogues(sample_data_path("train"))
    return rows.dialogues + rows.summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", default=["llama-3.2-korean-3b", "qwen3-4b", "solar-10.7b", "polyglot-ko-12.8b"])
    parser.add_argument("--llm-batch-size", type=int, default=1)
    parser.add_argument("--epoch-rows", type=int, default=12457, help="rows of the timed KoBART epoch (--device cuda, or --epoch-only)")
    parser.add_argument("--data", type=Path, help="labelled CSV replicated for the KoBART epoch (default: the bundled sample)")
    parser.add_argument("--epoch-only", action="store_true", help="only time the KoBART epoch, on --device")
    parser.add_argument("--prepare", nargs=4, metavar=("MODEL", "LAYERS", "BATCH", "DEVICE"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=4, metavar=("MODEL", "LAYERS", "BATCH", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare or args.measure:
        name, layers, batch, device = (args.prepare or args.measure)
        if args.prepare:
            from dialogsum.models import load_tokenizer, materialize_random_init

            cfg = measured_config(name, int(layers) or None, int(batch))
            materialize_random_init(cfg, load_tokenizer(cfg, sample_texts()))
            return
        print(json.dumps(measure(name, int(layers) or None, int(batch), device, sample_texts())))
        return
    os.environ.setdefault("DIALOGSUM_CACHE_DIR", tempfile.mkdtemp(prefix="dialogsum-real-size-"))
    if args.epoch_only:
        print(json.dumps(kobart_epoch(args.epoch_rows, args.device, args.data)))
        return
    (cuda_table if args.device == "cuda" else cpu_table)(args)


if __name__ == "__main__":
    main()
