"""Model configs: the six seed models, name resolution without file-name guessing, a schema that names the file
and the key of every mistake, and dotted overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dialogsum.config import (
    LORA_TARGETS_BY_FAMILY,
    ConfigError,
    ModelRegistry,
    configs_dir,
    load_model_config,
    model_registry,
    parse_set_options,
)

SEED_MODELS = {
    "kobart": ("digit82/kobart-summarization", "bart", "seq2seq"),
    "llama-3.2-korean-3b": ("Bllossom/llama-3.2-Korean-Bllossom-3B", "llama", "causal"),
    "qwen3-4b": ("Qwen/Qwen3-4B-Instruct-2507", "qwen3", "causal"),
    "solar-10.7b": ("upstage/SOLAR-10.7B-Instruct-v1.0", "llama", "causal"),
    "polyglot-ko-12.8b": ("EleutherAI/polyglot-ko-12.8b", "gpt_neox", "causal"),
    "kullm-v2": ("nlpai-lab/kullm-polyglot-12.8b-v2", "gpt_neox", "causal"),
}


def write_model_yaml(folder: Path, file_name: str, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def kobart_data() -> dict:
    return yaml.safe_load((configs_dir() / "models" / "kobart.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        # The three file names the original pipeline guessed and did not find.
        ("solar_10.7b", "solar-10.7b"),
        ("polyglot_ko_12.8b", "polyglot-ko-12.8b"),
        ("kullm_v2", "kullm-v2"),
        # Case, separators and declared aliases.
        ("Solar-10_7B", "solar-10.7b"),
        ("KULLM_v2", "kullm-v2"),
        ("Llama-3.2-Korean-3B", "llama-3.2-korean-3b"),
        ("bllossom-3b", "llama-3.2-korean-3b"),
        ("Qwen3_4B", "qwen3-4b"),
        ("KoBART", "kobart"),
        ("solar-10.7b", "solar-10.7b"),
    ],
)
def test_seed_spellings_resolve_to_the_canonical_name(spelling: str, canonical: str) -> None:
    assert model_registry().resolve(spelling) == canonical
    assert load_model_config(spelling).name == canonical


def test_unknown_name_lists_known_models_and_the_closest_match() -> None:
    with pytest.raises(ConfigError) as error:
        model_registry().resolve("solar-10.8b")
    message = str(error.value)
    assert "unknown model 'solar-10.8b'" in message
    for name in SEED_MODELS:
        assert name in message
    assert "Closest match: 'solar-10.7b'" in message


@pytest.mark.parametrize("name", sorted(SEED_MODELS))
def test_seed_models_have_real_hub_ids_and_lora_targets_of_their_family(name: str) -> None:
    hub_id, family, task = SEED_MODELS[name]
    cfg = load_model_config(name)
    assert (cfg.hub_id, cfg.family, cfg.task, cfg.source) == (hub_id, family, task, "hub")
    if cfg.lora is not None:
        assert set(cfg.lora.targets) <= LORA_TARGETS_BY_FAMILY[family]
    assert cfg.params_billions > 0


def test_unknown_top_level_key_names_the_file_and_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = write_model_yaml(tmp_path / "models", "kobart.yaml", {**kobart_data(), "learning_rate": 1e-4})
    monkeypatch.setenv("DIALOGSUM_CONFIGS", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        load_model_config("kobart")
    message = str(error.value)
    assert str(bad) in message
    assert "key 'learning_rate': unknown key" in message


def test_unknown_nested_key_names_the_file_and_the_dotted_key(tmp_path: Path) -> None:
    data = kobart_data()
    data["training"]["epoch"] = 3  # typo of `epochs`
    bad = write_model_yaml(tmp_path, "kobart.yaml", data)
    with pytest.raises(ConfigError) as error:
        ModelRegistry(tmp_path)
    assert str(bad) in str(error.value)
    assert "key 'training.epoch': unknown key" in str(error.value)


def test_file_name_must_be_the_canonical_name(tmp_path: Path) -> None:
    write_model_yaml(tmp_path, "kobart_base.yaml", kobart_data())
    with pytest.raises(ConfigError, match=r"kobart_base\.yaml: file name must be the canonical name 'kobart\.yaml'"):
        ModelRegistry(tmp_path)


def test_names_come_from_the_name_field_not_from_guessing(tmp_path: Path) -> None:
    write_model_yaml(tmp_path, "kobart.yaml", kobart_data())
    registry = ModelRegistry(tmp_path)
    assert registry.names == ["kobart"]
    with pytest.raises(ConfigError, match="Known models: kobart"):
        registry.resolve("kobart-large")


def test_alias_used_twice_is_rejected(tmp_path: Path) -> None:
    write_model_yaml(tmp_path, "kobart.yaml", kobart_data())
    write_model_yaml(tmp_path, "other.yaml", {**kobart_data(), "name": "other", "aliases": ["KoBART_Base"]})
    with pytest.raises(ConfigError, match="other.yaml: name or alias 'KoBART_Base' already used by 'kobart'"):
        ModelRegistry(tmp_path)


def test_inconsistent_config_is_rejected_with_the_file(tmp_path: Path) -> None:
    data = {**kobart_data(), "quantization": "4bit"}  # QLoRA without a lora section
    bad = write_model_yaml(tmp_path, "kobart.yaml", data)
    with pytest.raises(ConfigError) as error:
        ModelRegistry(tmp_path)
    assert str(bad) in str(error.value) and "needs a lora section" in str(error.value)


def test_overrides_apply_validate_and_leave_the_registry_untouched() -> None:
    cfg = load_model_config("kobart", {"training.epochs": 1, "generation.num_beams": 2})
    assert (cfg.training.epochs, cfg.generation.num_beams) == (1, 2)
    assert load_model_config("kobart").training.epochs == 10
    with pytest.raises(ConfigError, match="key 'training.epoch': unknown key"):
        load_model_config("kobart", {"training.epoch": 1})


def test_set_options_parse_yaml_scalars() -> None:
    assert parse_set_options(["training.seed=3", "training.group_by_length=false", "tokenizer.path=../t"]) == {
        "training.seed": 3,
        "training.group_by_length": False,
        "tokenizer.path": "../t",
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set_options(["training.seed"])
