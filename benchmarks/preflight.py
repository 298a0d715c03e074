"""Preflight on the seed models: how fast a doomed pipeline says so, and how much each model's lengths cut.

`python benchmarks/preflight.py` runs `dialogsum pipeline --config seed-full` offline (no weights reachable; the
bundled sample stands in for the competition files it names: data/train.csv, data/dev.csv, data/test.csv) against
an existing, empty SQLite store and prints the seconds from start until every one of the six seed models has its
verdict as a FAILED child run in the store, next to the original pipeline's 21 minutes until its last failure.

`python benchmarks/preflight.py truncation` measures, on the 400 labelled rows of shared/ with the real tokenizers,
the share of prompts and summaries that seed-full's lengths cut for each model: before (the seed's 512-token source
for all six, 128-token targets and new tokens) and after (each model's own lengths). The real tokenizers are put in
a temporary Hugging Face cache under the seed models' hub ids, so preflight loads them as it would the hub's: KoBART,
Qwen3, Llama-3.1 (Bllossom-3B's vocabulary) and Mistral-7B (SOLAR's vocabulary; SOLAR-10.7B-Instruct's chat
template is the one its model config pins). No Polyglot-Ko / KULLM tokenizer exists here: those two are measured with
two stand-ins, KoBART's (a Korean 30,000-piece vocabulary, as Polyglot-Ko's 30,003) and Llama-3's (byte-level BPE,
as GPT-NeoX's). Then it prints `dialogsum preflight --config seed-full --data labeled.csv` as run with that cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dialogsum.data import sample_data_path

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
from _assets import shared_path, tokenizer_folder  # noqa: E402

SEED_MODELS = {"kobart", "llama-3.2-korean-3b", "qwen3-4b", "solar-10.7b", "polyglot-ko-12.8b", "kullm-v2"}
ORIGINAL_SECONDS = 21 * 60
LABELLED = "data/dialogsum-ko/labeled.csv"
# seed model -> the folder under tokenizers/ (shared/ or .test-assets/) with its real tokenizer or vocabulary
REAL_TOKENIZERS = {"kobart": "kobart", "llama-3.2-korean-3b": "llama3", "qwen3-4b": "qwen3", "solar-10.7b": "mistral-7b"}
STAND_INS = {"polyglot-ko-12.8b": ("kobart", "llama3"), "kullm-v2": ("kobart", "llama3")}
# seed-full before each model had its own lengths: the YAML anchor's 512-token source for all six, the model
# configs' 128-token targets and max_new_tokens (KoBART's 100)
BEFORE = {"training.max_source_length": 512, "training.max_target_length": 128, "generation.max_new_tokens": 128}
BEFORE_KOBART = {**BEFORE, "generation.max_new_tokens": 100}
SNAPSHOT = "0" * 40  # the commit the stand-in cache's snapshots are filed under


def blocked_children(db: Path) -> dict[str, str]:
    """model → error message for FAILED train children, read straight from the store's database."""
    import sqlite3

    if not db.exists():
        return {}
    query = """
        SELECT m.value, e.value FROM runs r
        JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'dialogsum.kind' AND k.value = 'train'
        JOIN tags m ON m.run_uuid = r.run_uuid AND m.key = 'dialogsum.model'
        JOIN tags e ON e.run_uuid = r.run_uuid AND e.key = 'error.message'
        WHERE r.status = 'FAILED'
    """
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return dict(conn.execute(query).fetchall())
    except sqlite3.OperationalError:  # tables not created yet
        return {}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
        store_start = time.perf_counter()
        from mlflow import MlflowClient

        MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()  # a team's store exists before a pipeline runs
        store_s = time.perf_counter() - store_start
        (Path(tmp) / "data").mkdir()
        for name, split in (("train", "train"), ("dev", "dev"), ("test", "test")):
            shutil.copy(sample_data_path(split), Path(tmp) / "data" / f"{name}.csv")
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "dialogsum", "pipeline", "--config", "seed-full"],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        verdicts: dict[str, str] = {}
        while process.poll() is None and set(verdicts) != SEED_MODELS:
            time.sleep(0.1)
            verdicts = blocked_children(db)
        all_verdicts_s = time.perf_counter() - start
        process.wait(timeout=300)
        total_s = time.perf_counter() - start
    print(f"six seed models, offline, seed-full.yaml: {len(verdicts)}/6 verdicts stored as FAILED child runs")
    for model in sorted(verdicts):
        print(f"  {model:20s} {verdicts[model][:110]}")
    print(f"creating the empty SQLite store beforehand (MLflow's migrations, not timed below): {store_s:.1f} s")
    print(f"seconds from command start (interpreter start and imports included) until every verdict was in the store: "
          f"{all_verdicts_s:.1f} s (target < 10 s)")
    print(f"whole pipeline incl. skipped steps, matrix and report: {total_s:.1f} s (exit code {process.returncode})")
    print(f"original pipeline until its last failure: {ORIGINAL_SECONDS / 60:.0f} min -> {ORIGINAL_SECONDS / all_verdicts_s:.0f}x sooner")


def stand_in_cache(cache: Path, hub_ids: dict[str, str]) -> None:
    """A Hugging Face cache at `cache` holding, under each seed model's hub id, its real tokenizer's files; its
    config.json is filed as missing (the cache's `.no_exist/` marker), so
    transformers loads the tokenizer without it and preflight finds no weights."""
    for model, folder_name in REAL_TOKENIZERS.items():
        source = tokenizer_folder(folder_name)
        if source is None:
            print(f"  {model}: no tokenizers/{folder_name} here (scripts/fetch_test_assets.sh fetches llama3)")
            continue
        repo = cache / f"models--{hub_ids[model].replace('/', '--')}"
        snapshot = repo / "snapshots" / SNAPSHOT
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(SNAPSHOT)
        (repo / ".no_exist" / SNAPSHOT).mkdir(parents=True)
        (repo / ".no_exist" / SNAPSHOT / "config.json").touch()
        for file in source.iterdir():
            if file.is_file() and file.name not in ("config.json", "SOURCE.txt"):
                shutil.copy(file, snapshot / file.name)


def truncation_line(label: str, before, after) -> str:
    """One model's before → after shares and its prompt and target percentiles."""
    def share(cut) -> str:
        return f"{cut.limit:>4} {cut.share:6.1%}"

    def spread(cut) -> str:
        return "/".join(f"{cut.percentiles[p]:.0f}" for p in (50, 95, 99)) + f" (≤1%: {cut.fits_99pct})"

    cells = [f"{share(b)} → {share(a)}" for b, a in zip(before.limits, after.limits)]
    return f"  {label:38s} {cells[0]:26s} {cells[1]:26s} {cells[2]:26s} {spread(after.source):24s} {spread(after.target)}"


def truncation() -> None:
    """seed-full's truncation before and after per model on the labelled rows, then preflight's own table."""
    labelled = shared_path(LABELLED)
    if labelled is None:
        raise SystemExit(f"no {LABELLED} in shared/ (see benchmarks/gpu/_assets.py for where it is looked for)")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "hf-cache"
        os.environ.update({"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})  # before huggingface_hub is imported
        from dialogsum.config import load_pipeline_config, model_registry
        from dialogsum.data import read_dialogues
        from dialogsum.preflight import run_preflight

        seed_full = load_pipeline_config("seed-full")
        stand_in_cache(cache, {name: model_registry().get(name).hub_id for name in REAL_TOKENIZERS})
        rows = [read_dialogues(labelled, require_summary=True)]
        print(f"seed-full's lengths on the {len(rows[0])} rows of {labelled}: limit and share of rows cut, before → after")
        print(f"  {'model (tokenizer)':38s} {'max_source_length':26s} {'max_target_length':26s} {'max_new_tokens':26s} "
              f"{'prompt p50/p95/p99':24s} target p50/p95/p99")  # fmt: skip
        for model in seed_full.models:
            after_overrides = model.overrides
            before_overrides = {**after_overrides, **(BEFORE_KOBART if model.name == "kobart" else BEFORE)}
            tokenizers = {f"{model.name} ({REAL_TOKENIZERS[model.name]})": {}} if model.name in REAL_TOKENIZERS else {
                f"{model.name} (stand-in: {name})": {"tokenizer.path": str(tokenizer_folder(name))} for name in STAND_INS[model.name]}
            for label, tokenizer in tokenizers.items():
                before, after = (run_preflight([model.name], overrides={model.name: {**o, **tokenizer}}, measure_on=rows)[0]
                                 for o in (before_overrides, after_overrides))  # fmt: skip
                if after.truncation is None:
                    print(f"  {label:38s} not measured: {after.truncation_problem}")
                    continue
                print(truncation_line(label, before.truncation, after.truncation))
        command = [sys.executable, "-m", "dialogsum", "preflight", "--config", "seed-full", "--data", str(labelled), "--format", "table"]
        print(f"\n$ dialogsum preflight --config seed-full --data {labelled}   (with the tokenizers above in the Hugging Face cache)")
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"}, timeout=600)
        print(done.stdout + done.stderr)


if __name__ == "__main__":
    truncation() if sys.argv[1:] == ["truncation"] else main()
