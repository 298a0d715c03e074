"""Preflight's truncation report: on the 400 real labelled rows with each real tokenizer, how many prompts and
summaries each length limit cuts, seed-full's per-model lengths against that measurement, the warning above the
configured share, and the shares recorded on a pipeline's parent run (a real SQLite MLflow store).

Tokenizers only: `build_model` and transformers' `from_pretrained` of a model raise if anything tries to load
weights. SOLAR's tokenizer is the Mistral-7B one in shared/ (SOLAR-10.7B's exact vocabulary); SOLAR-10.7B-Instruct-v1.0's
chat template is the one pinned in its model config.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from dialogsum import preflight
from dialogsum.config import ConfigError, PipelineConfig, load_pipeline_config, parse_config
from dialogsum.data import read_dialogues, sample_data_path
from dialogsum.features import full_prompt_ids, prompt_ids, target_ids
from dialogsum.models import load_tokenizer
from dialogsum.preflight import run_preflight, truncation_rows
from dialogsum.tracking import TRUNCATION_FIT_PARAM, TRUNCATION_ROWS_PARAM, TRUNCATION_SHARE_METRIC, TRUNCATION_WARN_SHARE_PARAM
from dialogsum.truncation import FIT_SHARE, fitting_limit, limit_cut

REAL_TOKENIZERS = {"kobart": "kobart-tokenizer", "llama-3.2-korean-3b": "llama3-tokenizer", "qwen3-4b": "qwen3-tokenizer",
                   "solar-10.7b": "solar-tokenizer"}  # fmt: skip
SEED_CAP = {"training.max_source_length": 512}  # the YAML anchor seed-full applied to all six before
WARN_SHARE = 0.02


@pytest.fixture(scope="module")
def labelled(real_asset: Callable[[str], Path]):
    return read_dialogues(real_asset("labeled"), require_summary=True)


@pytest.fixture(scope="module")
def no_weights() -> Iterator[None]:
    """Loading any model weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("preflight's truncation report loaded model weights")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dialogsum.models.build_model", refuse)
        mp.setattr("transformers.PreTrainedModel.from_pretrained", refuse)
        yield


def tokenizer_path(model: str, real_asset: Callable[[str], Path]) -> str:
    return str(real_asset(REAL_TOKENIZERS[model]))


def seed_full_overrides(model: str) -> dict:
    [entry] = [m for m in load_pipeline_config("seed-full").models if m.name == model]
    return entry.overrides


def measured(model: str, overrides: dict, labelled, warn_share: float = WARN_SHARE) -> preflight.Verdict:
    [verdict] = run_preflight([model], overrides={model: overrides}, measure_on=[labelled], warn_share=warn_share)
    assert verdict.truncation is not None, verdict.truncation_problem
    return verdict


def print_table(verdicts: list[preflight.Verdict]) -> None:
    from dialogsum.output import emit

    emit(truncation_rows(verdicts, WARN_SHARE), preflight.TRUNCATION_COLUMNS, "truncation", "plain")


# --- the numerics ---------------------------------------------------------------------------------------


def test_fitting_limit_cuts_at_most_one_percent_and_no_smaller_limit_does() -> None:
    for n in (1, 99, 100, 300, 400, 700, 12457):
        lengths = list(np.random.default_rng(n).integers(10, 2000, size=n))
        fit = fitting_limit(lengths)
        assert sum(x > fit for x in lengths) <= n * FIT_SHARE, n
        assert fit == min(lengths) or sum(x > fit - 1 for x in lengths) > n * FIT_SHARE, n
    cut = limit_cut("source", 390, list(range(1, 401)))
    assert (cut.rows, cut.cut, cut.share, cut.fits_99pct) == (400, 10, 0.025, 396)
    assert cut.percentiles == {50: 200.5, 95: pytest.approx(380.05), 99: pytest.approx(396.01)}
    assert cut.warning(0.02) == ("training.max_source_length 390 cuts 10/400 prompts (2.5%, above 2%); 396 would cut "
                                 "at most 1%")  # fmt: skip
    assert cut.warning(0.025) is None


# --- the real rows, the real tokenizers ------------------------------------------------------------------


@pytest.mark.real_assets("labeled", "kobart-tokenizer", "qwen3-tokenizer", "llama3-tokenizer", "solar-tokenizer")
def test_seed_full_lengths_cut_at_most_one_percent_for_every_real_tokenizer(real_asset, labelled, no_weights) -> None:
    """seed-full's per-model lengths (each model's config) against the 400 labelled rows: no limit cuts more than
    1% of the prompts or summaries, so preflight warns about none; the counts are those of the lengths measured
    here with `full_prompt_ids` and `target_ids`."""
    verdicts = []
    for model in REAL_TOKENIZERS:
        overrides = {**seed_full_overrides(model), "tokenizer.path": tokenizer_path(model, real_asset)}
        verdict = measured(model, overrides, labelled)
        verdicts.append(verdict)
        report, cfg = verdict.truncation, verdict.config
        assert report.rows == len(labelled) == 400
        for cut in report.limits:
            assert cut.share <= FIT_SHARE, (model, cut)
        assert verdict.warnings == []
        if model == "solar-10.7b":  # the floor for SOLAR: 1536 source, 256 target and new tokens
            assert (cfg.training.max_source_length, cfg.training.max_target_length, cfg.generation.max_new_tokens) >= (1536, 256, 256)
        elif model != "kobart":
            assert cfg.training.max_source_length >= 1024 and min(cfg.training.max_target_length, cfg.generation.max_new_tokens) >= 160
    print_table(verdicts)
    kobart = verdicts[0]
    tokenizer = load_tokenizer(kobart.config)
    lengths = [len(full_prompt_ids(kobart.config, tokenizer, d)) for d in labelled.dialogues]
    assert lengths[0] == len(tokenizer.encode(labelled.dialogues[0])) + 2, "KoBART's input: BOS + dialogue + EOS"
    assert kobart.truncation.source.cut == sum(x > 512 for x in lengths) == 2
    assert kobart.truncation.source.percentiles == {p: pytest.approx(v) for p, v in zip((50, 95, 99), np.percentile(lengths, (50, 95, 99)))}
    assert kobart.truncation.source.fits_99pct == fitting_limit(lengths)


@pytest.mark.real_assets("labeled", "solar-tokenizer")
def test_the_seed_512_cap_cuts_solar_prompts_and_preflight_warns(real_asset, labelled, no_weights) -> None:
    """SOLAR under the seed's 512-token source and 128-token targets: the rows preflight counts as cut are exactly
    the rows whose training prompt (`prompt_ids`) and target (`target_ids`) lose tokens, and preflight warns."""
    overrides = {**seed_full_overrides("solar-10.7b"), **SEED_CAP, "training.max_target_length": 128,
                 "generation.max_new_tokens": 128, "tokenizer.path": tokenizer_path("solar-10.7b", real_asset)}  # fmt: skip
    verdict = measured("solar-10.7b", overrides, labelled)
    print_table([verdict])
    cfg, report = verdict.config, verdict.truncation
    tokenizer = load_tokenizer(cfg)
    prompts_cut = sum(prompt_ids(cfg, tokenizer, d) != full_prompt_ids(cfg, tokenizer, d) for d in labelled.dialogues)
    targets_cut = sum(target_ids(cfg, tokenizer, s)[:-1] != tokenizer(s, add_special_tokens=False)["input_ids"] for s in labelled.summaries)
    assert report.source.cut == prompts_cut and report.source.share > 0.25, report.source
    assert report.target.cut == report.new_tokens.cut == targets_cut and 0.03 < report.target.share < 0.08, report.target
    assert report.source.fits_99pct > 1000 and report.target.fits_99pct > 160
    assert [w.split(" cuts ")[0] for w in verdict.warnings] == ["truncation: training.max_source_length 512",
                                                                "truncation: training.max_target_length 128",
                                                                "truncation: generation.max_new_tokens 128"]  # fmt: skip
    rows = truncation_rows([verdict], WARN_SHARE)
    assert [row["warning"] for row in rows] == ["WARNING above 2%"] * 3
    assert any(note.startswith("WARNING truncation: training.max_source_length 512 cuts") for note in preflight.verdict_rows([verdict])[0]["reasons / notes"])
    assert [w.split(" cuts ")[0] for w in report.warnings(0.1)] == ["training.max_source_length 512"], "5% of targets is not above 10%"
    assert report.warnings(0.3) == []


# --- configuration, offline, the command line, the pipeline's run ----------------------------------------


def test_the_warning_share_is_a_pipeline_setting_that_rejects_bad_values() -> None:
    base = {"name": "p", "models": [{"name": "kobart-tiny"}]}
    assert parse_config(PipelineConfig, base, Path("p.yaml")).preflight.truncation_warn_share == WARN_SHARE
    assert parse_config(PipelineConfig, {**base, "preflight": {"truncation_warn_share": 0.05}}, Path("p.yaml")).preflight.truncation_warn_share == 0.05
    with pytest.raises(ConfigError, match="key 'preflight.truncation_warn_share'"):
        parse_config(PipelineConfig, {**base, "preflight": {"truncation_warn_share": 1.5}}, Path("p.yaml"))
    with pytest.raises(ConfigError, match="key 'preflight.warn'.*unknown key"):
        parse_config(PipelineConfig, {**base, "preflight": {"warn": 0.05}}, Path("p.yaml"))


def test_a_tokenizer_that_cannot_be_loaded_offline_is_a_message_not_a_crash(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    preflight.hub_reachable.cache_clear()
    try:
        [verdict] = run_preflight(["solar-10.7b"], measure_on=[read_dialogues(sample_data_path("train"))])
    finally:
        preflight.hub_reachable.cache_clear()
    assert verdict.truncation is None
    assert verdict.truncation_problem == ("no tokenizer files of 'upstage/SOLAR-10.7B-Instruct-v1.0' in a local folder or the "
                                          "Hugging Face cache; the hub is offline (HF_HUB_OFFLINE is set)")  # fmt: skip
    assert truncation_rows([verdict], WARN_SHARE) == [{"model": "solar-10.7b", "limit": "-", "warning": f"not measured: {verdict.truncation_problem}"}]


@pytest.mark.real_assets("labeled", "kobart-tokenizer")
def test_cli_preflight_of_a_pipeline_config_prints_the_truncation_table(real_asset, tmp_path) -> None:
    """`dialogsum preflight --config PIPELINE --data FILE`: the pipeline's models with their overrides and its warning
    share; KoBART measured with the real tokenizer (a seed-cap of 256 tokens cuts above 3%), Qwen3-4B's hub tokenizer
    not reachable offline: a line saying so."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""name: truncation-cli
models:
  - {{name: kobart, overrides: {{tokenizer.path: {real_asset("kobart-tokenizer")}, training.max_source_length: 256}}}}
  - {{name: qwen3-4b}}
preflight: {{truncation_warn_share: 0.03}}
""", encoding="utf-8")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    done = subprocess.run([sys.executable, "-m", "dialogsum", "preflight", "--config", str(config), "--data", str(real_asset("labeled"))],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    print(done.stdout)
    assert done.returncode == 1, done.stderr  # both models' weights are unreachable offline
    table = done.stdout.split("# truncation on 400 rows (tokenizer only)\n")[1].splitlines()
    assert table[0].split("\t") == list(preflight.TRUNCATION_COLUMNS)
    source = table[1].split("\t")
    assert source[:2] == ["kobart", "training.max_source_length 256"] and source[-1] == "WARNING above 3%", source
    assert float(source[2].split("(")[1].rstrip("%)")) > 3
    assert table[2].split("\t")[-1] == table[3].split("\t")[-1] == ""
    assert table[4].startswith("qwen3-4b\t-\t") and "not measured: no tokenizer files of 'Qwen/Qwen3-4B-Instruct-2507'" in table[4]


@pytest.mark.real_assets("labeled", "kobart-tokenizer")
def test_the_pipeline_runs_the_report_before_any_stage_and_logs_the_shares_on_its_run(real_asset, mlflow_store, tmp_path, monkeypatch, capsys) -> None:
    """A pipeline whose one model preflight blocks (its weights are not reachable offline) still measures it, on its
    train and validation rows, prints the table and logs the shares and lengths on the parent run."""
    import mlflow

    from dialogsum.pipeline.orchestrator import run_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    preflight.hub_reachable.cache_clear()
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""name: truncation-run
data: {{train: {real_asset("labeled")}, validation_fraction: 0.2}}
models:
  - {{name: kobart, overrides: {{tokenizer.path: {real_asset("kobart-tokenizer")}, training.max_source_length: 300}}}}
steps: [train]
""", encoding="utf-8")  # fmt: skip
    try:
        parent_id = run_pipeline(config)
    finally:
        preflight.hub_reachable.cache_clear()
    assert "preflight: truncation on the train + validation rows" in capsys.readouterr().err
    run = mlflow.MlflowClient().get_run(parent_id)
    params, metrics = run.data.params, run.data.metrics
    assert params[TRUNCATION_WARN_SHARE_PARAM] == "0.02"
    assert params[TRUNCATION_ROWS_PARAM.format(model="kobart")] == "400"  # train + validation: every labelled row
    assert params["truncation.kobart.source.limit"] == "300"
    source_share = metrics[TRUNCATION_SHARE_METRIC.format(model="kobart", limit="source")]
    assert 0.02 < source_share < 0.1
    assert int(params[TRUNCATION_FIT_PARAM.format(model="kobart", limit="source")]) > 300
    assert metrics[TRUNCATION_SHARE_METRIC.format(model="kobart", limit="target")] == 0.0
    assert metrics[TRUNCATION_SHARE_METRIC.format(model="kobart", limit="new_tokens")] == 0.0

