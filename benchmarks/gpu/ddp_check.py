"""GPU check: DDP on 2 GPUs. (1) A 4-bit (QLoRA) and an 8-bit model load on each process's own GPU, not all on
GPU 0. (2) A 2-process QLoRA training generates half of the validation rows on each GPU, finishes every epoch on
both ranks together (no rank waits in an all-reduce while another generates), and logs one run with validation at
every epoch. That the split scores equal a one-process validation of the same weights is shown on CPU by
tests/test_distributed.py.

    python benchmarks/gpu/ddp_check.py

With fewer than 2 GPUs it says so and checks nothing (exit 0): one GPU cannot show where rank 1's model goes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEVICES_PROBE = """
import json, torch
from accelerate import PartialState
from dialogsum.config import load_model_config
from dialogsum.models import build_model, load_tokenizer
from dialogsum.precision import detect_device, resolve_precision
from dialogsum.data import sample_data_path, read_dialogues

state = PartialState()
torch.cuda.set_device(state.local_process_index)
rows = read_dialogues(sample_data_path("train"))
found = {}
for quantization in ("4bit", "8bit"):
    cfg = load_model_config("qwen3-tiny-qlora", {"quantization": quantization})
    tokenizer = load_tokenizer(cfg, rows.dialogues + rows.summaries)
    built = build_model(cfg, tokenizer, resolve_precision(cfg.precision, detect_device()))
    found[quantization] = sorted({str(p.device) for p in built.model.parameters()})
print("DEVICES", json.dumps({"rank": state.process_index, "local": state.local_process_index, **found}), flush=True)
"""
TRAIN = ["-m", "dialogsum", "train", "--model", "qwen3-tiny-qlora", "--epochs", "2", "--max-train-samples", "32",
         "--max-validation-samples", "8", "--set", "generation.max_new_tokens=16"]  # fmt: skip


def launch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def main() -> None:
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        print(f"only {count} GPU(s) here: the DDP check needs 2 (nothing checked)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DIALOGSUM_CACHE_DIR": str(Path(tmp) / "cache"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}"}  # fmt: skip
        probe = Path(tmp) / "probe.py"
        probe.write_text(DEVICES_PROBE, encoding="utf-8")
        out = launch([str(probe)], env).stdout
        ranks = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("DEVICES ")]
        for r in sorted(ranks, key=lambda r: r["rank"]):
            print(f"rank {r['rank']}: 4-bit model on {r['4bit']}, 8-bit model on {r['8bit']}")
        ok_devices = all(r["4bit"] == r["8bit"] == [f"cuda:{r['local']}"] for r in ranks) and len(ranks) == 2
        print(f"quantized models on each process's own GPU: {'yes' if ok_devices else 'NO'}")

        launch(TRAIN, env)
        import mlflow

        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 1, f"expected one run, found {len(runs)}"
        run = runs[0]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_final"))
        print(f"run {run.info.status}; validation rows per process: {run.data.params['runtime.generation_rows_per_process']}; "
              f"val_final logged at epochs {steps}")  # fmt: skip
        sys.exit(0 if ok_devices and run.info.status == "FINISHED" and steps == [1, 2] else 1)


if __name__ == "__main__":
    main()
