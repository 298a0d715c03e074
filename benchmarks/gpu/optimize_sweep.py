"""GPU check: batch-size sweep of a KoBART-sized BART for fp32, fp16 and bf16 (and, with `--variants`, bitsandbytes'
bnb-int8 / bnb-nf4, which need the bitsandbytes package) on CUDA, printed as one table.

The model has KoBART's shape (6+6 layers, d_model 768, 16 heads, FFN 3072, vocabulary 30,000), random init.
Each variant is made once from the same fp32 weights (fp32 itself: a copy on the GPU; the others by
`dialogsum.quantize.prepare_variant`) and swept with
`dialogsum.optimize.sweep_batch_sizes`, the code `dialogsum optimize` runs: warm-up, at least `--min-batches`
timed batches per batch size over real dialogues in data order, growth stopped at an out-of-memory error or
when throughput improves by less than `--min-gain`. Random weights never emit EOS early, so every output has
exactly `--max-new-tokens` tokens and all variants do the same work. Agreement: the share of rows whose
generated tokens equal fp32's.

Inputs: the real KoBART tokenizer and Korean DialogSum rows from ../shared when this checkout has them; else
the bundled sample dialogues with a BPE tokenizer trained on them (token counts then run somewhat higher).
`--cpu-int8` adds the CPU comparison fp32 vs int8 (dynamic INT8) on this machine's CPU with `--cpu-threads`.
Needs torch with CUDA and transformers (no MLflow, pydantic or Korean analyser).

    python benchmarks/gpu/optimize_sweep.py [--variants fp32,fp16,bf16,bnb-int8,bnb-nf4] [--batch-sizes 1,2,4,...,256] [--cpu-int8]
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

SHARED_CANDIDATES = (ROOT / "shared", ROOT.parent / "shared")
KOBART_SHAPE = {"vocab_size": 30000, "d_model": 768, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 16,
                "decoder_attention_heads": 16, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072, "max_position_embeddings": 1026}  # fmt: skip
MAX_SOURCE_TOKENS = 512
REFERENCE = "fp32"  # the random-init model as made, every variant's reference here


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    sizes = lambda s: [int(x) for x in s.split(",") if x.strip()]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fp32,fp16,bf16", help="comma-separated, fp32 first: fp32, fp16, bf16, bnb-int8, bnb-nf4")
    parser.add_argument("--batch-sizes", type=sizes, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--n-samples", type=int, default=64, help="real dialogues used (cycled to fill big batches)")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-batches", type=int, default=3)
    parser.add_argument("--min-gain", type=float, default=0.05)
    parser.add_argument("--cpu-int8", action="store_true", help="also compare fp32 and int8 on the CPU")
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--cpu-batch-sizes", type=sizes, default=[1, 8])
    parser.add_argument("--cpu-samples", type=int, default=8)
    parser.add_argument("--cpu-max-new-tokens", type=int, default=32)
    return parser.parse_args(argv)


def shared_path(relative: str) -> Path | None:
    return next((base / relative for base in SHARED_CANDIDATES if (base / relative).exists()), None)


def dialogues_and_tokenizer(n: int):
    """(dialogues, tokenizer, where they came from)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    data, tokenizer_dir = shared_path("data/dialogsum-ko/labeled.csv"), shared_path("tokenizers/kobart")
    if data and tokenizer_dir:
        with open(data, encoding="utf-8-sig", newline="") as f:
            dialogues = [row["dialogue"] for row in csv.DictReader(f)][:n]
        return dialogues, AutoTokenizer.from_pretrained(tokenizer_dir), f"{data} + KoBART tokenizer"
    from tokenizers import SentencePieceBPETokenizer

    samples = ROOT / "src" / "dialogsum" / "sample_data"
    dialogues = []
    for split in ("train", "dev"):
        with open(samples / f"{split}.csv", encoding="utf-8-sig", newline="") as f:
            dialogues += [row["dialogue"] for row in csv.DictReader(f)]
    raw = SentencePieceBPETokenizer(unk_token="<unk>")
    raw.train_from_iterator(dialogues, vocab_size=8000, special_tokens=["<s>", "</s>", "<pad>", "<unk>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    return dialogues[:n], tokenizer, "bundled sample dialogues + BPE trained on them (no ../shared here)"


def build_model(tokenizer):
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = BartConfig(**KOBART_SHAPE, **ids, decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=None)
    torch.manual_seed(0)
    return BartForConditionalGeneration(config).eval()


def make_generate(model, encoded: list[list[int]], pad_id: int, device: str, num_beams: int, new_tokens: int):
    import torch

    def generate(rows: list[int]):
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            attention[r, : len(encoded[i])] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), num_beams=num_beams,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)  # fmt: skip
        return [tuple(t.tolist()) for t in out.cpu()]

    return generate


def sweep(base, names: list[str], encoded, pad_id: int, device: str, batch_sizes: list[int], generation: tuple[int, int], args) -> list[tuple]:
    """One row per (variant, batch size): the point, the variant's load seconds, and agreement with fp32."""
    from dialogsum.optimize import SweepSettings, release_memory, sweep_batch_sizes
    from dialogsum.quantize import prepare_variant

    settings = SweepSettings(min_batches=args.min_batches, min_gain=args.min_gain)
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as staging:
        for name in names:
            start = time.perf_counter()
            fresh = copy.deepcopy(base)
            model = fresh.to(device) if name == REFERENCE else prepare_variant(fresh, name, device, Path(staging) / name)
            load_s = time.perf_counter() - start
            result = sweep_batch_sizes(make_generate(model, encoded, pad_id, device, *generation), len(encoded), batch_sizes,
                                       variant=name, device=device, settings=settings)  # fmt: skip
            reference = reference or result.outputs
            agree = sum(a == b for a, b in zip(result.outputs or [], reference or [])) / len(encoded)
            rows += [(p, load_s, agree, result.stop_reason) for p in result.points]
            del model
            release_memory(device)
    return rows


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print(f"{'batch':>6} {'variant':<8}{'status':>8}{'p50 s':>9}{'p95 s':>9}{'samples/s':>11}{'x fp32':>8}{'peak GB':>9}{'agree':>7}")
    fp32 = {p.batch_size: p.throughput_sps for p, *_ in rows if p.variant == "fp32" and p.ok}
    for p, _load_s, agree, _ in sorted(rows, key=lambda r: (r[0].batch_size, r[0].variant)):
        ratio = f"{p.throughput_sps / fp32[p.batch_size]:.2f}" if p.ok and fp32.get(p.batch_size) else "-"
        print(f"{p.batch_size:>6} {p.variant:<8}{p.status:>8}{p.latency_s(50):>9.3f}{p.latency_s(95):>9.3f}{p.throughput_sps:>11.1f}"
              f"{ratio:>8}{p.peak_memory_bytes / 1e9:>9.2f}{agree:>7.0%}")  # fmt: skip
    for variant in dict.fromkeys(p.variant for p, *_ in rows):
        load_s, stop = next((load, stop) for p, load, _, stop in rows if p.variant == variant)
        best = max((p for p, *_ in rows if p.variant == variant and p.ok), key=lambda p: p.throughput_sps, default=None)
        shown = f"best {best.throughput_sps:.1f} samples/s at batch {best.batch_size}" if best else "no batch size ran"
        print(f"  {variant}: made in {load_s:.1f} s; {shown}; {stop}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from dialogsum.quantize import BASELINE, VARIANTS

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    on_cuda = [REFERENCE] + [name for name, v in VARIANTS.items() if v.device in (None, "cuda") and name != BASELINE]
    if any(v not in on_cuda for v in names) or not names or names[0] != REFERENCE:
        raise SystemExit(f"--variants must start with fp32 and use {', '.join(on_cuda)} (got {args.variants})")
    dialogues, tokenizer, source = dialogues_and_tokenizer(args.n_samples)
    encoded = [tokenizer(d)["input_ids"][:MAX_SOURCE_TOKENS] for d in dialogues]
    base = build_model(tokenizer)
    lengths = sorted(len(e) for e in encoded)
    print(f"inputs: {len(encoded)} dialogues from {source}; tokens min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    print(f"model: KoBART-sized BART, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, random init; "
          f"generation: {args.num_beams} beams, exactly {args.max_new_tokens} new tokens")  # fmt: skip
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        generation = (args.num_beams, args.max_new_tokens)
        print_table("CUDA sweep", sweep(base, names, encoded, tokenizer.pad_token_id, "cuda", args.batch_sizes, generation, args))
    else:
        print("no CUDA device: the CUDA sweep is skipped")
    if args.cpu_int8:
        torch.set_num_threads(args.cpu_threads)
        cpu_encoded = encoded[: args.cpu_samples]
        generation = (1, args.cpu_max_new_tokens)
        print_table(f"CPU sweep ({args.cpu_threads} threads, {len(cpu_encoded)} dialogues, greedy, exactly {args.cpu_max_new_tokens} new tokens)",
                    sweep(base, [REFERENCE, "int8"], cpu_encoded, tokenizer.pad_token_id, "cpu", args.cpu_batch_sizes, generation, args))  # fmt: skip


if __name__ == "__main__":
    main()
