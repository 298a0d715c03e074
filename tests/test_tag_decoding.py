"""Dialogue tags decode as written: with the tags added, KoBART's Metaspace pre-tokenizer (`prepend_scheme:
always`) made `#Person2#는` decode as `#Person2# 는`; `load_tokenizer` sets it to `first`, so every reference
summary and dialogue of the competition's 400 labelled rows comes back from encode → decode unchanged, also after
`save_pretrained` and the `AutoTokenizer` load a saved model's tokenizer gets. The other real tokenizers (byte-level
BPE, or Mistral's Metaspace already set to `first`) round-trip too."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dialogsum.config import load_model_config
from dialogsum.data import read_dialogues
from dialogsum.models import add_dialogue_tokens, load_tokenizer


def round_trips(tokenizer, texts: list[str]) -> int:
    """How many texts decode back to themselves."""
    return sum(tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == t for t in texts)


@pytest.fixture(scope="module")
def labeled(real_asset: Callable[[str], Path]):
    return read_dialogues(real_asset("labeled"))


@pytest.fixture(scope="module")
def kobart(real_asset: Callable[[str], Path]):
    return load_tokenizer(load_model_config("kobart", {"tokenizer.path": str(real_asset("kobart-tokenizer"))}))


@pytest.mark.real_assets("labeled", "kobart-tokenizer")
def test_every_kobart_reference_summary_and_dialogue_round_trips(real_asset, labeled, kobart):
    as_shipped = AutoTokenizer.from_pretrained(real_asset("kobart-tokenizer"))
    add_dialogue_tokens(as_shipped)  # the tags added, the pre-tokenizer left at `always`
    before = round_trips(as_shipped, labeled.summaries)
    after, dialogues = round_trips(kobart, labeled.summaries), round_trips(kobart, labeled.dialogues)
    print(f"\nkobart round trip: summaries {before}/400 with prepend_scheme always, {after}/400 with first; dialogues {dialogues}/400")
    assert as_shipped.decode(as_shipped("#Person2#는", add_special_tokens=False)["input_ids"]) == "#Person2# 는"
    assert before < len(labeled.summaries)
    assert after == dialogues == len(labeled.summaries) == 400


@pytest.mark.real_assets("kobart-tokenizer")
def test_kobart_keeps_the_setting_through_save_pretrained(kobart, tmp_path):
    """The tokenizer is saved with the model (`serving/saved_model.py`: `save_pretrained(folder / "tokenizer")`) and
    loaded back with `AutoTokenizer.from_pretrained`, as here."""
    kobart.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["pre_tokenizer"]["prepend_scheme"] == saved["decoder"]["prepend_scheme"] == "first"
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "#Person1#는 #Person2#에게 #PhoneNumber#로 전화하라고 합니다."
    assert reloaded.decode(reloaded(text, add_special_tokens=False)["input_ids"]) == text
    assert reloaded("#Person2#는", add_special_tokens=False)["input_ids"] == kobart("#Person2#는", add_special_tokens=False)["input_ids"]


@pytest.mark.real_assets("kobart-tokenizer")
def test_kobart_splits_the_text_after_a_tag_as_it_did_before_the_tag_was_a_token(real_asset, kobart):
    """Only the `▁` after a tag goes: `#Person1#:` ends in `:` as KoBART's own vocabulary split `#Person1#:` (the
    speaker's first word keeps its `▁`), and a summary's first word keeps the `▁` of the start of a text."""
    untagged = AutoTokenizer.from_pretrained(real_asset("kobart-tokenizer"))
    line = "#Person1#: 안녕하세요, #Person2#는 괜찮아요?"
    assert kobart.tokenize(line) == ["#Person1#", ":", "▁안녕", "하세요", ",", "▁", "#Person2#", "는", "▁괜찮", "아", "요?"]
    pieces = untagged.tokenize(line)  # the tags as KoBART's vocabulary splits them: ▁# P ers on 1 #
    assert pieces[5:8] == ["#", ":", "▁안녕"] and pieces[15:17] == ["#", "는"]
    assert kobart.tokenize("의사는 #Person2#에게")[0] == untagged.tokenize("의사는")[0] == "▁의"


@pytest.mark.real_assets("labeled", "qwen3-tokenizer", "llama3-tokenizer", "solar-tokenizer")
@pytest.mark.parametrize(("model", "asset"), [("qwen3-4b", "qwen3-tokenizer"), ("llama-3.2-korean-3b", "llama3-tokenizer"),
                                              ("solar-10.7b", "solar-tokenizer")])  # fmt: skip
def test_the_other_real_tokenizers_round_trip_every_reference(real_asset, labeled, model, asset):
    tokenizer = load_tokenizer(load_model_config(model, {"tokenizer.path": str(real_asset(asset))}))
    summaries, dialogues = round_trips(tokenizer, labeled.summaries), round_trips(tokenizer, labeled.dialogues)
    print(f"\n{model} round trip: summaries {summaries}/400, dialogues {dialogues}/400")
    assert summaries == dialogues == 400
