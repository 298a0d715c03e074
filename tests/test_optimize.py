"""`optimize` on a small trained BART (KoBART architecture at toy size, a tokenizer trained from the bundled sample,
trained briefly on the sample's training rows): the INT8 model is smaller on disk than the computed fp32 size and
loads back from MLflow in a fresh process; the sweep loads each variant once and records every batch size; an
out-of-memory batch size stops the growth; each variant loads straight into its dtype on its device, fp32 is never
written, and a variant that runs out of memory while loading or would not fit on the disk fails alone. A QLoRA
model's baseline is its nf4 base with the adapter, as it was scored. Optimize measures on the trained run's validation rows (held out of its training rows) and reports on
its test rows (the sample's dev rows): neither was trained on.

One optimize run (module fixture) serves most tests. An out-of-memory error cannot be provoked safely on this
machine, so a spy on the real generation call raises `torch.cuda.OutOfMemoryError` for one batch size of the
int8 variant: it stands in for a CUDA OOM, and everything else is the real model generating real summaries.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch

import dialogsum.data
import dialogsum.generate
import dialogsum.optimize
from dialogsum.data import read_dialogues, split_validation, write_dialogues
from dialogsum.optimize import (
    RECOMMENDED_BATCH_SIZE_TAG,
    RECOMMENDED_VARIANT_TAG,
    SWEEP_TABLE,
    BatchPoint,
    Budget,
    Quality,
    SweepSettings,
    VariantSweep,
    load_variant,
    optimize_run,
    recommend,
    sweep_batch_sizes,
)
from dialogsum.quantize import VariantError, resolve_variants
from dialogsum.serving import saved_model
from dialogsum.serving.pyfunc import run_model_uri
from dialogsum.tracking import (
    KIND_TAG,
    STATUS_TAG,
    load_predictions,
)

REPO = Path(__file__).resolve().parents[1]
KOREAN_OR_SPEAKER = re.compile(r"[\uac00-\ud7a3]|#Person\d#")
FAST_GENERATION = {"num_beams": 1, "max_new_tokens": 8}
BATCH_SIZES = (1, 2, 4, 8)
OOM_BATCH_SIZE = 4


def is_quantized(module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized.dynamic")


@pytest.fixture(scope="module")
def labelled(module_store) -> Path:
    """The trained run's validation rows (held out of the sample's training rows by fname hash), as a CSV."""
    _, validation = split_validation(read_dialogues(dialogsum.data.sample_data_path("train")), 0.2)
    return write_dialogues(validation, module_store / "validation.csv")


@pytest.fixture(scope="module")
def test_csv() -> Path:
    return dialogsum.data.sample_data_path("dev")


@pytest.fixture(scope="module")
def trained_run(module_store) -> str:
    from dialogsum.training.recipe import train_model

    return train_model("kobart-tiny", overrides={"training.epochs": 1, "training.max_train_samples": 32,
                                                 "training.max_test_samples": 4, "generation.max_new_tokens": 8})  # fmt: skip


@pytest.fixture(scope="module")
def optimized(trained_run, labelled, test_csv):
    """One int8 optimize run, counting model loads, with an out-of-memory error injected at batch size 4 of int8."""
    loads: list[str] = []
    real_load = saved_model.load
    real_summarize = dialogsum.generate.summarize

    def counting_load(folder, device=None, dtype=None, merge=False):
        loads.append(str(folder))
        return real_load(folder, device, dtype, merge)

    def summarize_or_oom(model, tokenizer, cfg, dialogues, batch_size=16, overrides=None, on_batch=None):
        quantized = any(is_quantized(m) for m in model.modules())
        if quantized and batch_size == OOM_BATCH_SIZE:  # stands in for a CUDA OOM at this batch size
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_summarize(model, tokenizer, cfg, dialogues, batch_size, overrides, on_batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(saved_model, "load", counting_load)
        mp.setattr(dialogsum.generate, "summarize", summarize_or_oom)
        run_id = optimize_run(trained_run, quantization="int8", batch_sizes=BATCH_SIZES, data_path=labelled, n_samples=6,
                              test_path=test_csv, generation=FAST_GENERATION, settings=SweepSettings(min_gain=None, min_batches=2),
                              log_variant="int8")  # fmt: skip
    return {"run_id": run_id, "loads": loads}


def test_int8_model_is_smaller_on_disk_and_loads_back_in_a_fresh_process_with_korean_summaries(optimized, module_store, labelled):
    run = mlflow.get_run(optimized["run_id"])
    assert run.data.tags[KIND_TAG] == "optimize" and run.data.tags[STATUS_TAG] == "succeeded"
    metrics = run.data.metrics
    assert metrics["int8_size_bytes"] < metrics["fp32_size_bytes"] and metrics["scored_size_bytes"] > metrics["int8_size_bytes"]
    model_uri = f"runs:/{optimized['run_id']}/kobart-tiny-int8"
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    logged_weights = sum(p.stat().st_size for p in Path(local).rglob("weights/*") if p.is_file())
    assert logged_weights < metrics["fp32_size_bytes"]
    assert "bitsandbytes" not in (Path(local) / "requirements.txt").read_text()

    dialogues = read_dialogues(labelled).dialogues[8:10]
    script = textwrap.dedent(f"""
        import json, sys
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({model_uri!r})
        inner = model.unwrap_python_model().model
        quantized = sum(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in inner.modules())
        summaries = list(model.predict(pd.DataFrame({{"dialogue": json.loads(sys.argv[1])}}), params={{"num_beams": 1, "max_new_tokens": 12}}))
        print(json.dumps({{"quantized_linears": quantized, "summaries": summaries}}, ensure_ascii=False))
    """)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(dialogues, ensure_ascii=False)], capture_output=True,
                          text=True, cwd=module_store, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["quantized_linears"] > 0
    assert len(result["summaries"]) == 2
    assert all(KOREAN_OR_SPEAKER.search(s) for s in result["summaries"]), result["summaries"]


def test_sweep_loads_each_variant_once_and_logs_every_batch_size_as_a_step(optimized):
    source, *others = optimized["loads"]
    assert optimized["loads"].count(source) == 2  # the baseline and int8, each loaded once from the source for the whole sweep
    assert all(Path(f).name == "int8" for f in others if f != source)  # MLflow validating the logged int8 model
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(optimized["run_id"], "scored_throughput_sps")]
    assert sorted(steps) == list(BATCH_SIZES)
    table = load_predictions(optimized["run_id"], SWEEP_TABLE)
    scored = table[table.variant == "scored"]
    assert list(scored.batch_size) == list(BATCH_SIZES) and set(scored.status) == {"ok"}
    assert (scored.throughput_sps > 0).all() and (scored.latency_p95_s >= scored.latency_p50_s).all()
    assert (scored.peak_memory_bytes > 0).all()


def test_out_of_memory_batch_size_is_recorded_and_stops_growth(optimized):
    table = load_predictions(optimized["run_id"], SWEEP_TABLE)
    int8 = table[table.variant == "int8"].set_index("batch_size")
    assert list(int8.index) == [1, 2, OOM_BATCH_SIZE]  # 8 was never tried
    assert list(int8.status) == ["ok", "ok", "oom"]
    assert "OutOfMemoryError" in int8.loc[OOM_BATCH_SIZE, "error"]
    summary = mlflow.artifacts.load_dict(f"runs:/{optimized['run_id']}/optimize/summary.json")
    assert "oom" in summary["variants"]["int8"]["stop_reason"]


def test_recommendation_follows_the_rule_and_quality_is_logged_for_validation_and_test(optimized):
    run = mlflow.get_run(optimized["run_id"])
    tags, metrics = run.data.tags, run.data.metrics
    sweep = load_predictions(optimized["run_id"], SWEEP_TABLE)
    kept = [v for v in ("scored", "int8") if metrics[f"{v}_rouge_drop"] <= Budget().max_rouge_drop]
    ok = sweep[(sweep.status == "ok") & sweep.variant.isin(kept)]
    best = ok.sort_values(["throughput_sps", "batch_size"], ascending=[False, True]).iloc[0]
    assert (tags[RECOMMENDED_VARIANT_TAG], int(tags[RECOMMENDED_BATCH_SIZE_TAG])) == (best.variant, best.batch_size)
    for role, rows in (("val", 6), ("test", 20)):
        for name in ("scored", "int8"):
            assert metrics[f"{name}_{role}_final_ci95_low"] <= metrics[f"{name}_{role}_final"] <= metrics[f"{name}_{role}_final_ci95_high"]
        difference = metrics[f"int8_{role}_final"] - metrics[f"scored_{role}_final"]
        assert metrics[f"int8_{role}_diff_vs_scored"] == pytest.approx(difference), "the paired difference is int8 − scored on the same rows"
        assert metrics[f"int8_{role}_diff_vs_scored_ci95_low"] <= difference <= metrics[f"int8_{role}_diff_vs_scored_ci95_high"]
    assert metrics["int8_rouge_drop"] == pytest.approx(-(metrics["int8_val_final"] - metrics["scored_val_final"]))
    assert metrics["scored_rouge_drop"] == 0.0 and metrics["scored_exact_match"] == 1.0
    assert metrics["sweep_overhead"] >= 1.0
    assert run.data.tags["dialogsum.val_rows_digest"] != run.data.tags["dialogsum.test_rows_digest"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(optimized["run_id"], "optimize")}
    assert "optimize/throughput_latency.png" in artifacts
    predictions = load_predictions(optimized["run_id"])
    assert len(predictions) == 6 and {"scored_prediction", "int8_prediction", "reference"} <= set(predictions.columns)
    assert len(load_predictions(optimized["run_id"], "test_predictions.json")) == 20


def test_failing_batch_size_is_recorded_and_the_sweep_goes_on_while_a_memory_budget_stops_it(trained_run, module_store):
    model_dir = dialogsum.optimize.source_model_dir(run_model_uri(trained_run))
    model, tokenizer, cfg = load_variant(model_dir, "scored", "cpu", module_store / "staging")
    dialogues = read_dialogues(dialogsum.data.sample_data_path("dev")).dialogues[:4]

    def generate(rows: list[int]) -> list[str]:
        if len(rows) == 2:
            raise ValueError("a bad batch")  # a non-memory failure: recorded, larger batches still tried
        return dialogsum.generate.summarize(model, tokenizer, cfg, [dialogues[i] for i in rows], len(rows), FAST_GENERATION)

    sweep = sweep_batch_sizes(generate, len(dialogues), (1, 2, 4), variant="scored", device="cpu", settings=SweepSettings(min_gain=None))
    assert [(p.batch_size, p.status) for p in sweep.points] == [(1, "ok"), (2, "failed"), (4, "ok")]
    assert "a bad batch" in sweep.points[1].error
    assert all(KOREAN_OR_SPEAKER.search(o) for o in sweep.outputs)

    budget = SweepSettings(min_gain=None, max_memory_bytes=1)
    limited = sweep_batch_sizes(generate, len(dialogues), (1, 2, 4), variant="scored", device="cpu", settings=budget)
    assert [(p.batch_size, p.status) for p in limited.points] == [(1, "over_memory")]
    assert "budget" in limited.stop_reason


def test_recommendation_rule_keeps_quality_and_the_latency_budget():
    def sweep(variant: str, latencies: dict[int, float]) -> VariantSweep:
        points = [BatchPoint(variant, b, latencies_s=[s] * 3, samples=3 * b) for b, s in latencies.items()]
        return VariantSweep(variant, points, outputs=[], stop_reason="", warmup_s=0.0)

    sweeps = {"scored": sweep("scored", {1: 1.0, 8: 4.0}), "int8": sweep("int8", {1: 0.4, 8: 1.2})}
    quality = {"scored": Quality({}, [], None, 0.0, None, 100.0, 1.0), "int8": Quality({}, [], None, 0.3, None, 95.0, 0.8)}
    sizes = {"scored": 500, "int8": 130}
    choice = recommend(sweeps, quality, sizes, Budget(max_rouge_drop=0.5))
    assert (choice.variant, choice.batch_size) == ("int8", 8)
    assert "drops by at most 0.5" in choice.reason
    assert (recommend(sweeps, quality, sizes, Budget(max_rouge_drop=0.2)).variant) == "scored"  # int8 loses too much
    choice = recommend(sweeps, quality, sizes, Budget(max_latency_p95_s=1.0))
    assert (choice.variant, choice.batch_size) == ("int8", 1)  # batch 8 is over the latency budget
    choice = recommend(sweeps, quality, sizes, Budget(max_latency_p95_s=0.1))
    assert (choice.variant, choice.batch_size) == ("int8", 1) and "lowest p95" in choice.reason


def test_unknown_or_misplaced_variants_are_rejected_with_the_choices():
    assert resolve_variants("none", "cpu") == ["scored"]
    assert resolve_variants("int8", "cpu") == ["scored", "int8"]
    with pytest.raises(VariantError, match="runs on cuda"):
        resolve_variants("bf16", "cpu")
    assert resolve_variants("bnb-nf4,bnb-int8", "cpu") == ["scored", "bnb-nf4", "bnb-int8"]
    assert resolve_variants("auto", "cpu") == ["scored", "int8"] and resolve_variants("auto", "cuda") == ["scored", "fp16", "bf16"]
    with pytest.raises(VariantError, match="size of fp32 weights is computed"):
        resolve_variants("fp32,fp16", "cuda")
    with pytest.raises(VariantError, match="choose from"):
        resolve_variants("int4", "cpu")


def test_bitsandbytes_variants_run_on_cpu_and_the_logged_nf4_model_summarises(trained_run, labelled):
    """bitsandbytes' CPU backend: both variants are swept, saved smaller than fp32, and the logged NF4 model loads
    back from MLflow with its 4-bit layers and writes Korean summaries."""
    run_id = optimize_run(trained_run, quantization="bnb-nf4,bnb-int8", batch_sizes=(2,), data_path=labelled, n_samples=4,
                          generation=FAST_GENERATION, settings=SweepSettings(min_batches=1), log_variant="bnb-nf4")
    metrics = mlflow.get_run(run_id).data.metrics
    for prefix in ("bnb_nf4", "bnb_int8"):
        assert metrics[f"{prefix}_ok"] == 1.0 and metrics[f"{prefix}_throughput_sps"] > 0
        assert metrics[f"{prefix}_size_bytes"] < metrics["fp32_size_bytes"], prefix
    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/kobart-tiny-bnb-nf4/requirements.txt")).read_text()
    assert "bitsandbytes==" in requirements and "torch==" in requirements
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/kobart-tiny-bnb-nf4")
    inner = model.unwrap_python_model().model
    assert any(type(m).__name__ == "Linear4bit" for m in inner.modules())
    summaries = list(model.predict([{"dialogue": d} for d in read_dialogues(labelled).dialogues[4:6]], params={"num_beams": 2, "max_new_tokens": 12}))
    assert len(summaries) == 2 and all(KOREAN_OR_SPEAKER.search(s) for s in summaries), summaries


def test_mlflow_run_entry_point_optimizes_into_the_run_it_creates(trained_run, labelled):
    command = ["mlflow", "run", str(REPO), "-e", "optimize", "--env-manager", "local", "-P", f"run={trained_run}",
               "-P", "quantization=int8", "-P", "batch_sizes=1,2", "-P", f"data={labelled}", "-P", "n_samples=4",
               "-P", "params=num_beams=1 max_new_tokens=8"]  # fmt: skip
    before = {r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    created = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list") if r.info.run_id not in before]
    assert len(created) == 1, "optimize logs into the run that `mlflow run` created"
    run = created[0]
    assert run.info.status == "FINISHED" and run.data.tags[KIND_TAG] == "optimize"
    assert run.data.tags["dialogsum.logged_variant"] == run.data.tags[RECOMMENDED_VARIANT_TAG]
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "int8_throughput_sps")]
    assert sorted(steps) == [1, 2]
    assert run.data.params["optimize.generation.max_new_tokens"] == "8"


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> list[dict]:
    """Every `from_pretrained` call's keyword arguments, recorded by a wrapper around the real one. No GPU exists here:
    a `device_map` onto GPU 0 is recorded as asked, then loaded on the CPU."""
    from transformers import PreTrainedModel

    real = PreTrainedModel.__dict__["from_pretrained"].__func__
    calls: list[dict] = []

    def recording(cls, *args, **kwargs):
        calls.append(dict(kwargs))
        if kwargs.get("device_map") == {"": 0}:
            kwargs["device_map"] = {"": "cpu"}
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(recording))
    return calls


def test_each_variant_loads_straight_from_the_folder_onto_its_device_in_its_dtype(trained_run, tmp_path, from_pretrained_calls):
    """fp16 for a GPU (the device a CPU machine cannot have is stood in for by the recorder) and bf16 on the CPU load
    in one `from_pretrained` call each, placed by `device_map`, in their own dtype: no fp32 copy is made first."""
    from dialogsum.optimize import source_model_dir

    model_dir = source_model_dir(run_model_uri(trained_run))
    for name, device, dtype, placed in (("fp16", "cuda", torch.float16, {"": 0}), ("bf16", "cpu", torch.bfloat16, {"": "cpu"})):
        from_pretrained_calls.clear()
        model, _, _ = load_variant(model_dir, name, device, tmp_path / "staging")
        assert [(c["dtype"], c["device_map"]) for c in from_pretrained_calls] == [(dtype, placed)], name
        assert {p.dtype for p in model.parameters()} == {dtype}, f"{name}: loaded as {dtype}, not converted from fp32"
    from_pretrained_calls.clear()
    scored, _, _ = load_variant(model_dir, "scored", "cpu", tmp_path / "staging")
    assert [(c["dtype"], c["device_map"]) for c in from_pretrained_calls] == [(torch.float32, {"": "cpu"})]
    assert saved_model.read(model_dir).numerics.dtype == "float32" and {p.dtype for p in scored.parameters()} == {torch.float32}
    assert not (tmp_path / "staging").exists()


def _measure(model_dir: Path, variants: list[str], labelled: Path, workdir: Path):
    from dialogsum.optimize import measure_variants

    data = read_dialogues(labelled).head(2)
    return measure_variants(model_dir, variants, data, [1], device="cpu", workdir=workdir, generation=FAST_GENERATION,
                            settings=SweepSettings(min_gain=None, min_batches=1))  # fmt: skip


def test_an_oom_while_loading_fails_only_that_variant_and_fp32_is_never_written(trained_run, labelled, tmp_path, monkeypatch):
    """A real out-of-memory error cannot be provoked safely here: loading int8 raises the error CUDA would
    (`torch.OutOfMemoryError`); bf16 and the baseline are measured, and the recommendation is made among them."""
    from dialogsum.optimize import _summary_metrics, source_model_dir

    model_dir = source_model_dir(run_model_uri(trained_run))
    real_load_variant = dialogsum.optimize.load_variant

    def oom_for_int8(model_dir, name, device, staging):
        if name == "int8":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")
        return real_load_variant(model_dir, name, device, staging)

    monkeypatch.setattr(dialogsum.optimize, "load_variant", oom_for_int8)
    report = _measure(model_dir, ["scored", "bf16", "int8"], labelled, tmp_path)
    failed = report.results["int8"]
    assert failed.folder is None and failed.sweep.stop_reason.startswith("out of memory while loading")
    assert [p.status for p in failed.sweep.points] == ["oom"] and "24.00 GiB" in failed.sweep.points[0].error
    for name in ("scored", "bf16"):
        assert all(p.ok for p in report.results[name].sweep.points) and report.results[name].quality is not None, name
    quality = {name: r.quality for name, r in report.results.items() if r.quality}
    choice = recommend(report.sweeps, quality, {n: r.size_bytes for n, r in report.results.items()}, Budget(max_rouge_drop=100))
    metrics = _summary_metrics(report, choice)
    assert choice.variant in ("scored", "bf16") and metrics["int8_load_ok"] == 0.0 and metrics["bf16_load_ok"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"], "only the variant that ran is written; never fp32"
    model, _, _ = saved_model.load(model_dir, device="cpu")
    assert metrics["fp32_size_bytes"] == 4 * sum(p.numel() for p in model.parameters()), "computed: 4 bytes a parameter"
    assert metrics["bf16_size_ratio"] == pytest.approx(metrics["fp32_size_bytes"] / metrics["bf16_size_bytes"])
    assert report.results["scored"].folder == model_dir, "the baseline is the saved model itself, not a copy"


def test_a_variant_that_would_not_fit_on_the_disk_is_recorded_as_failed_and_not_written(trained_run, labelled, tmp_path, monkeypatch):
    """A full disk is stood in for by `shutil.disk_usage` reporting 1 MB free (of 1 TB) to optimize's check; the
    baseline, already saved, needs no room and is still measured and recommended."""
    from dialogsum.optimize import source_model_dir

    model_dir = source_model_dir(run_model_uri(trained_run))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(dialogsum.optimize.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    report = _measure(model_dir, ["scored", "int8"], labelled, tmp_path)
    failed = report.results["int8"]
    assert failed.folder is None and failed.sweep.points[0].status == "failed"
    assert re.fullmatch(r"not enough disk: int8 needs [\d.e-]+ GB on disk, .+ has 0\.001 GB free", failed.sweep.stop_reason), failed.sweep.stop_reason
    assert not list(tmp_path.iterdir()), "nothing was written"
    quality = {name: r.quality for name, r in report.results.items() if r.quality}
    assert recommend(report.sweeps, quality, {n: r.size_bytes for n, r in report.results.items()}, Budget()).variant == "scored"


def test_a_qlora_models_baseline_is_its_nf4_base_with_the_adapter_as_scored(tmp_path, from_pretrained_calls):
    """A QLoRA model saved as training saves it (qwen3-tiny-qlora, 4-bit through bitsandbytes' CPU backend as
    tests/test_train.py trains it; not trained: the form, not the quality, is what is checked): the baseline is the
    adapter unmerged on the nf4 base, while bf16 merges it into a base loaded in bf16; the fp32 size is counted from
    the base's config with the tag rows, without loading it."""
    from peft import PeftModel

    from dialogsum.config import load_model_config
    from dialogsum.models import build_model, load_tokenizer
    from dialogsum.optimize import parameter_count
    from dialogsum.precision import detect_device, resolve_precision

    cfg = load_model_config("qwen3-tiny-qlora")
    rows = read_dialogues(dialogsum.data.sample_data_path("train"))
    tokenizer = load_tokenizer(cfg, rows.dialogues + rows.summaries)
    built = build_model(cfg, tokenizer, resolve_precision(cfg.precision, detect_device()))
    model_dir = saved_model.write_trained(tmp_path / "qlora", built, cfg, built.model)
    from_pretrained_calls.clear()
    scored, _, _ = load_variant(model_dir, "scored", "cpu", tmp_path / "staging")
    [call] = from_pretrained_calls
    assert call["quantization_config"].bnb_4bit_quant_type == "nf4" and call["device_map"] == {"": "cpu"}
    assert isinstance(scored, PeftModel) and any(type(m).__name__ == "Linear4bit" for m in scored.modules())
    assert any("lora_A" in name for name, _ in scored.named_modules()), "the adapter is attached, not merged"
    merged, _, _ = load_variant(model_dir, "bf16", "cpu", tmp_path / "staging")
    assert not isinstance(merged, PeftModel) and {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert parameter_count(model_dir) == sum(p.numel() for p in merged.parameters())
