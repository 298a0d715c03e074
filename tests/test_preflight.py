"""Preflight and the precision policy: every seed model gets a verdict with its reasons, in seconds, before any
weight is loaded; each kind of doomed configuration is blocked with a reason that says why."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dialogsum import preflight
from dialogsum.precision import DeviceInfo, PrecisionError, PrecisionPolicy, check_quantization, resolve_precision
from dialogsum.data import sample_data_path
from dialogsum.preflight import hub_reachable, run_preflight

SEED_MODELS = ["kobart", "llama-3.2-korean-3b", "qwen3-4b", "solar-10.7b", "polyglot-ko-12.8b", "kullm-v2"]
GIB = 1024**3
ROOMY_CPU = DeviceInfo("cpu", "cpu", False, 256 * GIB, 256 * GIB)
BF16_GPU = DeviceInfo("cuda", "NVIDIA H100", True, 80 * GIB, 80 * GIB)
FP16_GPU = DeviceInfo("cuda", "Tesla T4", False, 16 * GIB, 15 * GIB)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No hub and an empty Hugging Face cache, so verdicts do not depend on what this machine has downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    preflight.hub_reachable.cache_clear()
    yield
    preflight.hub_reachable.cache_clear()


def only_verdict(model: str, device: DeviceInfo = ROOMY_CPU, **overrides) -> preflight.Verdict:
    (verdict,) = run_preflight([model], overrides={model: overrides} if overrides else None, device=device)
    return verdict


def test_six_seed_models_on_cpu_are_each_blocked_with_their_reason(offline: None) -> None:
    verdicts = run_preflight(SEED_MODELS, device=ROOMY_CPU)
    assert [v.model for v in verdicts] == SEED_MODELS
    for v in verdicts:
        assert (v.ok, v.precision) == (False, "cpu:float32"), v
        assert len(v.reasons) == 1, v.reasons
        assert v.reasons[0].startswith(f"weights unreachable: '{v.config.hub_id}' is not a local folder"), v.reasons
        assert "HF_HUB_OFFLINE is set" in v.reasons[0]
        assert v.estimate_gib is not None and v.estimate_gib > 0


def test_six_seed_models_on_this_machine(offline: None) -> None:
    for v in run_preflight(SEED_MODELS):
        assert not v.ok
        assert any(r.startswith("weights unreachable") for r in v.reasons), v.reasons


def test_weights_in_the_hugging_face_cache_pass_offline(offline: None) -> None:
    import huggingface_hub.constants

    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--digit82--kobart-summarization"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    verdict = only_verdict("kobart")
    assert verdict.ok and verdict.notes == [f"weights: Hugging Face cache (commit {commit})"]
    pinned = run_preflight(["kobart"], overrides={"kobart": {"revision": commit}})[0]
    assert pinned.ok and pinned.notes == [f"weights: Hugging Face cache (commit {commit}, pinned)"]
    elsewhere = run_preflight(["kobart"], overrides={"kobart": {"revision": "1" * 40}})[0]
    assert not elsewhere.ok and f"at revision {'1' * 40}" in elsewhere.reasons[0], "a pinned commit not in the cache is unreachable offline"


def test_without_offline_flags_the_answer_is_still_quick(monkeypatch: pytest.MonkeyPatch, slowdown: float) -> None:
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    preflight.hub_reachable.cache_clear()
    try:
        start = time.perf_counter()
        verdicts = run_preflight(SEED_MODELS, device=ROOMY_CPU)
        elapsed = time.perf_counter() - start
    finally:
        preflight.hub_reachable.cache_clear()
    print(f"preflight of six models without offline flags: {elapsed:.2f} s")
    assert elapsed < 2 + 8 * slowdown  # one network probe, bounded to 2 s, for all six; the rest is CPU
    for v in verdicts:  # offline here; on a machine with network the hub may answer instead
        assert any(r.startswith("weights unreachable") for r in v.reasons) or "weights: Hugging Face hub" in v.notes


def test_config_source_model_passes_on_cpu(offline: None) -> None:
    verdict = only_verdict("kobart-tiny")
    assert verdict.ok and verdict.reasons == [] and verdict.precision == "cpu:float32"


def test_lora_targets_missing_from_the_family_are_blocked(offline: None) -> None:
    verdict = only_verdict("polyglot-ko-12.8b", **{"lora.targets": ["q_proj", "v_proj"]})
    assert verdict.reasons[0] == (
        "LoRA targets ['q_proj', 'v_proj'] do not exist in the gpt_neox family "
        "(it has ['dense', 'dense_4h_to_h', 'dense_h_to_4h', 'query_key_value'])"
    )


def test_bf16_on_cpu_is_blocked(offline: None) -> None:
    verdict = only_verdict("kobart", precision="bf16")
    assert verdict.reasons[0] == "precision: precision 'bf16' needs a CUDA device; this is cpu (use auto or fp32)"
    assert verdict.precision is None


def test_bf16_on_a_gpu_without_bf16_is_blocked(offline: None) -> None:
    verdict = only_verdict("qwen3-4b", device=FP16_GPU, precision="bf16")
    assert "Tesla T4 does not support bf16" in verdict.reasons[0]
    assert only_verdict("qwen3-4b", device=FP16_GPU).precision == "cuda:float16+grad-scaling"
    assert only_verdict("qwen3-4b", device=BF16_GPU).precision == "cuda:bfloat16"


def test_memory_estimate_over_available_memory_is_blocked(offline: None) -> None:
    small = DeviceInfo("cpu", "small-cpu", False, 4 * GIB, 1 * GIB)
    verdict = only_verdict("kobart", device=small)
    assert verdict.reasons[0].startswith(f"memory: needs ~{verdict.estimate_gib:.1f} GiB (weights ")
    assert verdict.reasons[0].endswith("but small-cpu has 1.0 GiB available")
    assert not any(r.startswith("memory") for r in only_verdict("kobart").reasons)


def test_qlora_memory_estimate_is_far_below_full_precision(offline: None) -> None:
    qlora = only_verdict("solar-10.7b", device=BF16_GPU)  # batch 2 of 1536 + 256 tokens: activations ~16 GiB
    assert qlora.precision == "cuda:bfloat16" and 6 < qlora.estimate_gib < 30
    full = only_verdict("solar-10.7b", device=BF16_GPU, quantization="none")
    assert full.estimate_gib > qlora.estimate_gib + 10


def test_old_or_missing_bitsandbytes_blocks_quantization(offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dialogsum.precision.bitsandbytes_version", lambda: (0, 42, 0))
    with pytest.raises(PrecisionError, match="bitsandbytes 0.42.0 has no 4bit support on cuda; need >= 0.43.0"):
        check_quantization("4bit", BF16_GPU)
    assert "quantization: bitsandbytes 0.42.0" in only_verdict("kullm-v2").reasons[0]
    monkeypatch.setattr("dialogsum.precision.bitsandbytes_version", lambda: None)
    with pytest.raises(PrecisionError, match="needs bitsandbytes, which is not installed"):
        check_quantization("8bit", ROOMY_CPU)
    check_quantization("none", ROOMY_CPU)


def test_unknown_model_is_a_blocked_verdict_not_a_crash(offline: None) -> None:
    verdicts = run_preflight(["solar_10.7b", "kobart-large"], device=ROOMY_CPU)
    assert verdicts[0].model == "solar-10.7b"  # a seed spelling that failed before resolves and is checked
    assert verdicts[1].reasons[0].startswith("config: unknown model 'kobart-large'. Known models: ")


def test_missing_tokenizer_folder_is_blocked(offline: None, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    verdict = only_verdict("kobart-tiny", **{"tokenizer.path": str(missing)})
    why = "is neither an existing local folder nor a valid hub id"
    assert verdict.reasons == [f"tokenizer unreachable: '{missing}' {why}"]


@pytest.mark.real_assets("kobart-tokenizer")
def test_real_tokenizer_folder_passes(offline: None, real_asset: Callable[[str], Path]) -> None:
    verdict = only_verdict("kobart-tiny", **{"tokenizer.path": str(real_asset("kobart-tokenizer"))})
    assert verdict.ok, verdict.reasons


def test_invalid_data_file_blocks_every_model(offline: None, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("fname,dialogue,summary\ntrain_0,안녕,\n", encoding="utf-8")
    verdicts = run_preflight(["kobart-tiny", "llama-tiny"], data_paths=[sample_data_path("train"), bad])
    for v in verdicts:
        assert v.reasons == [f"data: 1 data problem(s):\n  {bad}, row 1, column 'summary': empty cell"]


# --- precision policy -----------------------------------------------------------------------------------


def test_bf16_compute_with_fp16_scaling_is_rejected() -> None:
    with pytest.raises(PrecisionError, match="gradient scaling is only for fp16 autocast"):
        PrecisionPolicy("cuda", "bfloat16", "bf16", True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("cuda", "float16", "fp16", False), "fp16 autocast needs gradient scaling"),
        (("cpu", "bfloat16", "bf16", False), "mixed precision on CPU"),
        (("cuda", "float32", "bf16", False), "compute dtype float32 does not match bf16 autocast"),
    ],
)
def test_other_invalid_policies_are_rejected(args: tuple, message: str) -> None:
    with pytest.raises(PrecisionError, match=message):
        PrecisionPolicy(*args)


def test_auto_precision_per_device() -> None:
    assert resolve_precision("auto", BF16_GPU) == PrecisionPolicy("cuda", "bfloat16", "bf16", False)
    assert resolve_precision("auto", FP16_GPU) == PrecisionPolicy("cuda", "float16", "fp16", True)
    assert resolve_precision("auto", ROOMY_CPU) == PrecisionPolicy("cpu", "float32", "no", False)
    assert resolve_precision("fp16", BF16_GPU).grad_scaling
    assert resolve_precision("fp32", BF16_GPU).mixed_precision == "no"
    with pytest.raises(PrecisionError, match="precision 'fp16' needs a CUDA device"):
        resolve_precision("fp16", ROOMY_CPU)
    with pytest.raises(PrecisionError, match="unknown precision 'int4'"):
        resolve_precision("int4", BF16_GPU)


# --- command line ---------------------------------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m dialogsum ARGS` offline with an empty Hugging Face cache; (result, wall seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "COLUMNS": "200"}
    start = time.perf_counter()
    command = [sys.executable, "-m", "dialogsum", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    return done, time.perf_counter() - start


def _any_free_memory(text: str) -> str:
    return re.sub(r"has [0-9.]+ GiB available", "has N GiB available", text)


def test_cli_preflight_of_the_six_seed_models_through_a_pipe_keeps_every_name_and_reason_whole(tmp_path: Path, monkeypatch, slowdown) -> None:
    done, elapsed = run_cli(tmp_path, "preflight", "--models", ",".join(SEED_MODELS))
    print(f"`python -m dialogsum preflight --models <six>`: {elapsed:.2f} s wall")
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("# dialogsum preflight\n"), "not a terminal: plain lines, one per model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub_reachable.cache_clear()
    lines = done.stdout.splitlines()
    for verdict in run_preflight(SEED_MODELS):
        [line] = [line for line in lines if line.startswith(f"{verdict.model}\t")]
        assert line.split("\t")[1] == "blocked"
        for reason in verdict.reasons:  # free memory moves between the two calls: its figure is not compared
            assert _any_free_memory(reason) in _any_free_memory(line), f"{reason!r} cut in {line!r}"
    assert elapsed < 10 * slowdown, f"preflight CLI took {elapsed:.2f} s (bound 10 s × slowdown {slowdown:.2f})"
    hub_reachable.cache_clear()


def test_cli_preflight_formats(tmp_path: Path) -> None:
    done, _ = run_cli(tmp_path, "preflight", "--models", "kobart-tiny,kobart", "--data", str(sample_data_path("train")), "--format", "json")
    rows = {row["model"]: row for row in json.loads(done.stdout)["rows"]}  # one document, truncation inside each row
    assert rows["kobart-tiny"]["verdict"] == "ok" and rows["kobart"]["verdict"] == "blocked"
    assert any(r.startswith("weights unreachable") for r in rows["kobart"]["reasons / notes"])
    assert [t["limit"].split()[0] for t in rows["kobart-tiny"]["truncation"]] == [
        "training.max_source_length", "training.max_target_length", "generation.max_new_tokens"]  # fmt: skip
    assert rows["kobart"]["truncation"][0]["warning"].startswith("not measured: no tokenizer files of 'digit82/kobart-summarization'")
    table, _ = run_cli(tmp_path, "preflight", "--models", "kobart-tiny", "--format", "table")
    assert "┃ model" in table.stdout and "kobart-tiny" in table.stdout


def test_cli_preflight_exits_0_when_every_model_passes(tmp_path: Path) -> None:
    done, _ = run_cli(tmp_path, "preflight", "--models", "kobart-tiny,llama-tiny", "--data", str(sample_data_path("train")))
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = done.stdout.split("\n# truncation on ")[0]  # then each model's truncation on the rows (tests/test_truncation.py)
    assert [line.split("\t")[1] for line in verdicts.splitlines()[2:]] == ["ok", "ok"]


def test_a_chat_prompt_without_a_chat_template_is_blocked_before_any_weight_loads(tmp_path: Path) -> None:
    from dialogsum.config import load_model_config
    from dialogsum.data import read_dialogues
    from dialogsum.models import load_tokenizer

    rows = read_dialogues(sample_data_path("train"))
    load_tokenizer(load_model_config("llama-tiny"), rows.dialogues + rows.summaries).save_pretrained(tmp_path / "tok")
    chat = {"prompt.format": "chat", "prompt.system": "요약하세요.", "prompt.instruction": "{dialogue}"}
    no_template = only_verdict("llama-tiny", **chat, **{"tokenizer.path": str(tmp_path / "tok")})
    assert not no_template.ok and any("has no chat template" in r and str(tmp_path / "tok") in r for r in no_template.reasons)
    own_tokenizer = only_verdict("llama-tiny", **chat)
    assert not own_tokenizer.ok and any("trains its own tokenizer" in r for r in own_tokenizer.reasons)
    with_template = tmp_path / "tok-chat"
    (tmp_path / "tok").rename(with_template)
    (with_template / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    templated = only_verdict("llama-tiny", **chat, **{"tokenizer.path": str(with_template)})
    assert templated.ok and any("chat template: found" in n for n in templated.notes), templated.reasons


@pytest.mark.real_assets("qwen3-tokenizer")
def test_the_real_qwen3_tokenizer_has_the_chat_template_qwen3_4b_needs(real_asset) -> None:
    verdict = only_verdict("qwen3-4b", **{"tokenizer.path": str(real_asset("qwen3-tokenizer"))})
    assert any("chat template: found" in n for n in verdict.notes), (verdict.reasons, verdict.notes)
    assert not any("chat template" in r for r in verdict.reasons)
