"""GPU check: QLoRA (nf4, double quant) on a small Llama-family model under bf16 and under fp16, a few steps each.

The original pipeline paired bf16 compute with fp16 AMP gradient scaling and crashed every LLM on step 1. This
script trains through dialogsum's own builders and `train_epoch` with the precision policy applied (bf16: no
scaler; fp16: GradScaler), prints both loss series, and shows that the crashing combination is rejected by
the policy before any weight is loaded. Needs CUDA, torch, transformers, peft, accelerate, bitsandbytes,
pydantic (no MLflow, no Korean analyser).

    python benchmarks/gpu/qlora_precision.py [--steps 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

OVERRIDES = {
    "quantization": "4bit",
    "architecture.hidden_size": 512,
    "architecture.intermediate_size": 1376,
    "architecture.num_hidden_layers": 4,
    "architecture.num_attention_heads": 8,
    "architecture.num_key_value_heads": 4,
    "training.batch_size": 8,
    "training.learning_rate": 2e-3,
    "training.max_source_length": 384,
}


def train_steps(precision: str, steps: int) -> dict:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from dialogsum.config import load_model_config
    from dialogsum.data import read_dialogues, sample_data_path
    from dialogsum.features import EpochSeededSampler, build_collator, tokenize_rows
    from dialogsum.models import build_model, load_tokenizer
    from dialogsum.precision import detect_device, resolve_precision
    from dialogsum.training.recipe import train_epoch

    cfg = load_model_config("llama-tiny", {**OVERRIDES, "precision": precision})
    policy = resolve_precision(cfg.precision, detect_device())
    data = read_dialogues(sample_data_path("train"))
    tokenizer = load_tokenizer(cfg, data.dialogues + data.summaries)
    built = build_model(cfg, tokenizer, policy)
    accelerator = Accelerator(mixed_precision=policy.mixed_precision)
    examples = tokenize_rows(cfg, tokenizer, data.dialogues, data.summaries)
    sampler = EpochSeededSampler([len(ids) for ids in examples["input_ids"]], cfg.training.batch_size, cfg.training.seed, True)
    loader = DataLoader(examples, batch_size=cfg.training.batch_size, sampler=sampler, collate_fn=build_collator(cfg, tokenizer))
    params = [p for p in built.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.training.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    model, optimizer, loader, scheduler = accelerator.prepare(built.model, optimizer, loader, scheduler)
    losses: list[float] = []
    start = time.perf_counter()
    while len(losses) < steps:
        sampler.set_epoch(len(losses))
        train_epoch(model, loader, optimizer, scheduler, accelerator, 1.0, lambda loss, _synced: losses.append(loss))
    torch.cuda.synchronize()
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "compute_dtype")]
    return {
        "policy": policy.label,
        "scaler": type(accelerator.scaler).__name__ if accelerator.scaler is not None else "none",
        "compute_dtype": str(quantized[0].compute_dtype) if quantized else "none",
        "linear4bit": len(quantized),
        "losses": losses[:steps],
        "seconds": time.perf_counter() - start,
        "peak_gib": torch.cuda.max_memory_allocated() / 1024**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precision", choices=["bf16", "fp16"], action="append",
                        help="repeatable; default both, each in its own process (accelerate's state is per process)")
    args = parser.parse_args()

    from dialogsum.precision import PrecisionError, PrecisionPolicy, detect_device

    if not args.precision:  # parent: the policy check, then each precision in its own process
        print(f"device: {detect_device()}")
        try:
            PrecisionPolicy("cuda", "bfloat16", "bf16", True)
            print("FAIL: bf16 compute with fp16 gradient scaling was accepted")
        except PrecisionError as e:
            print(f"bf16 compute + fp16 AMP scaling rejected before loading: {e}")
        for precision in ("bf16", "fp16"):
            subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--precision", precision], check=True)
        return
    if detect_device().kind != "cuda":
        sys.exit("this check needs a CUDA device")
    for precision in args.precision:
        r = train_steps(precision, args.steps)
        losses = " ".join(f"{v:.3f}" for v in r["losses"])
        print(f"{precision}: policy {r['policy']}, scaler {r['scaler']}, 4-bit compute {r['compute_dtype']}, "
              f"{r['linear4bit']} Linear4bit layers, {r['seconds']:.1f} s, peak {r['peak_gib']:.2f} GiB")  # fmt: skip
        print(f"  losses: {losses}")
        print(f"  first→last: {r['losses'][0]:.3f} → {r['losses'][-1]:.3f} (finite: {all(v == v for v in r['losses'])})")


if __name__ == "__main__":
    main()
