"""Generation on a small BART (KoBART architecture at toy size, random init, a tokenizer trained from the bundled
sample) and its Korean dialogues: beam search with the cache that keeps cross-attention keys and values in place writes exactly
the summaries transformers' own cache writes, and every beam reorder it skips stays within one dialogue."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import dialogsum.generate
from dialogsum.config import load_model_config
from dialogsum.data import read_dialogues, sample_data_path
from dialogsum.generate import BeamSharedCrossAttentionCache, summarize
from dialogsum.models import build_model, load_tokenizer
from dialogsum.precision import detect_device, resolve_precision

NUM_BEAMS = 4
BATCH_SIZE = 3


@pytest.fixture(scope="module")
def model_and_dialogues():
    cfg = load_model_config("kobart-tiny")
    train = read_dialogues(sample_data_path("train"))
    tokenizer = load_tokenizer(cfg, train.dialogues + train.summaries)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, resolve_precision("fp32", detect_device()), for_training=False).model
    rows = read_dialogues(sample_data_path("dev"), require_summary=True).head(6).rows
    return model, tokenizer, cfg, [r.dialogue for r in rows]


def test_beam_search_without_cross_attention_reorder_writes_the_same_summaries(model_and_dialogues, monkeypatch):
    model, tokenizer, cfg, dialogues = model_and_dialogues
    generation = {"num_beams": NUM_BEAMS, "max_new_tokens": 12, "min_new_tokens": 12}
    reorders: list[torch.Tensor] = []
    skipping_reorder = BeamSharedCrossAttentionCache.reorder_cache

    def recording_reorder(self, beam_idx):
        reorders.append(beam_idx.clone())
        skipping_reorder(self, beam_idx)

    monkeypatch.setattr(BeamSharedCrossAttentionCache, "reorder_cache", recording_reorder)
    shared_cross = summarize(model, tokenizer, cfg, dialogues, BATCH_SIZE, generation)
    monkeypatch.setattr(dialogsum.generate, "BeamSharedCrossAttentionCache", lambda: EncoderDecoderCache(DynamicCache(), DynamicCache()))
    reordered_cross = summarize(model, tokenizer, cfg, dialogues, BATCH_SIZE, generation)

    assert shared_cross == reordered_cross
    assert any(summary.strip() for summary in shared_cross)
    rows = torch.arange(BATCH_SIZE * NUM_BEAMS)
    assert reorders, "beam search never reordered its cache"
    assert any(not torch.equal(idx, rows) for idx in reorders), "no beam moved: the reorder was never exercised"
    for idx in reorders:  # a beam only ever takes the place of a beam of its own dialogue
        assert torch.equal(idx // NUM_BEAMS, rows // NUM_BEAMS)


def test_greedy_generation_uses_the_default_cache(model_and_dialogues, monkeypatch):
    model, tokenizer, cfg, dialogues = model_and_dialogues
    created: list[object] = []
    monkeypatch.setattr(dialogsum.generate, "BeamSharedCrossAttentionCache", lambda: created.append(1))
    summarize(model, tokenizer, cfg, dialogues[:2], 2, {"num_beams": 1, "max_new_tokens": 4})
    assert created == []
