"""A small real-size KoBART study on the GPU: `dialogsum tune` with the median pruner over learning rate, warm-up and
beams, KoBART at its real dimensions (random init: the device reaches no hub), the KoBART tokenizer from
`shared/tokenizers/kobart` when present, on the competition's labelled rows from `shared/data/dialogsum-ko` (the
first `--rows` of them; a fifth, by fname hash, score the trials). `shared/` is looked for as
`benchmarks/gpu/_assets.py` says (`$DIALOGSUM_SHARED`, `./shared`, `../shared`); without the rows the run stops,
unless `--allow-sample` lets it use the 64 bundled sample rows. Prints which rows it used, the trials per minute,
the pruned and failed counts and the best score.

    python benchmarks/gpu/tune_kobart.py [--trials 6] [--rows 400] [--allow-sample]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _assets import labelled_rows, tokenizer_folder

MODEL = """\
name: kobart-real-random
description: KoBART at its real size, random init (the GPU benchmark reaches no hub).
family: bart
task: seq2seq
source: config
architecture: {{model_type: bart, d_model: 768, encoder_layers: 6, decoder_layers: 6, encoder_attention_heads: 16,
               decoder_attention_heads: 16, encoder_ffn_dim: 3072, decoder_ffn_dim: 3072, max_position_embeddings: 1026, vocab_size: 30000}}
params_billions: 0.124
dimensions: {{hidden_size: 768, num_layers: 12, intermediate_size: 3072, vocab_size: 30000}}
tokenizer: {{path: {tokenizer}, vocab_size: 30000}}
prompt: {{format: seq2seq}}
generation: {{num_beams: 4, max_new_tokens: 60, min_new_tokens: 5}}
training: {{epochs: 3, batch_size: 16, eval_batch_size: 64, learning_rate: 5.0e-5, warmup_steps: 50, max_source_length: 512, max_target_length: 128}}
checkpoint: {{keep: none}}
"""
SPACE = """\
model: kobart-real-random
params:
  training.learning_rate: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}
  training.warmup_steps: {type: int, low: 0, high: 100, step: 25}
  generation.num_beams: {type: int, low: 1, high: 4}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--rows", type=int, help="tune on the first N labelled rows (default: all)")
    parser.add_argument("--allow-sample", action="store_true", help="without the competition's rows, use the 64 bundled sample rows instead of stopping")
    args = parser.parse_args()
    rows, rows_used = labelled_rows(args.rows, args.allow_sample)
    tokenizer = tokenizer_folder("kobart")
    print(f"rows: {rows_used}\ntokenizer: {tokenizer or 'no KoBART tokenizer found: a BPE trained from the rows'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from dialogsum.config import configs_dir
        from dialogsum.data import write_dialogues

        shutil.copytree(configs_dir(), folder / "configs")
        (folder / "configs" / "models" / "kobart-real-random.yaml").write_text(
            MODEL.format(tokenizer=str(tokenizer) if tokenizer else "null"), encoding="utf-8")
        (folder / "space.yaml").write_text(SPACE, encoding="utf-8")
        env = {**os.environ, "DIALOGSUM_CONFIGS": str(folder / "configs"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        command = [sys.executable, "-m", "dialogsum", "tune", "--model", "kobart-real-random", "--space", str(folder / "space.yaml"),
                   "--trials", str(args.trials), "--study", "gpu", "--pruner", "median", "--seed", "7",
                   "--train-data", str(write_dialogues(rows, folder / "labelled.csv"))]  # fmt: skip
        start = time.perf_counter()
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(result.stdout[-2000:])
        if result.returncode != 0:
            raise SystemExit(result.stderr[-4000:])
    print(f"{args.trials} trials in {seconds:.0f} s: {args.trials / seconds * 60:.2f} trials/min (rows: {rows_used})")


if __name__ == "__main__":
    main()
