"""Generation on a small BART (KoBART architecture at toy size, random init, a tokenizer trained from the bundled
sample) and its Korean dialogues: beam search with the cache that keeps cross-attention keys and values in place writes exactly
the summaries transformers' own cache writes, and every beam reorder it skips stays within one dialogue. Forced by a hook on
its output layer to write a given summary, it shows what the no-repeat-n-gram rules let through: a speaker named twice
under the tag-aware rule, not under transformers'; a repeated phrase under neither."""

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


def test_repetition_penalty_counts_generated_tokens_only():
    """A token seen only in the prompt keeps its logit; a generated one is penalised as transformers would."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from dialogsum.generate import GeneratedRepetitionPenalty

    prompt, generated = [5, 6, 7], [8, 9]
    input_ids = torch.tensor([prompt + generated])
    scores = torch.randn(1, 16)
    scores[0, 8], scores[0, 9] = 2.0, -2.0
    ours = GeneratedRepetitionPenalty(1.5, prompt_length=len(prompt))(input_ids, scores.clone())
    for token in prompt:
        assert ours[0, token] == scores[0, token], "a prompt-only token's logit is untouched"
    theirs = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([generated]), scores.clone())
    assert torch.equal(ours, theirs), "on generated tokens it is transformers' penalty"
    assert ours[0, 8] == pytest.approx(2.0 / 1.5) and ours[0, 9] == pytest.approx(-3.0)


def test_stop_tokens_are_the_models_own_terminators_plus_the_tokenizers_eos(model_and_dialogues):
    from dialogsum.generate import stop_token_ids

    model, tokenizer, cfg, dialogues = model_and_dialogues
    terminator = tokenizer.convert_tokens_to_ids("<pad>")
    model.generation_config.eos_token_id = [terminator, tokenizer.eos_token_id]  # a model card with two terminators
    with_card = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"stop_tokens": ["<unk>"]})})
    try:
        assert stop_token_ids(model, tokenizer, with_card) == [terminator, tokenizer.eos_token_id, tokenizer.unk_token_id]
        unknown = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"stop_tokens": ["<|eot_id|>"]})})
        with pytest.raises(ValueError, match="<\\|eot_id\\|>"):
            stop_token_ids(model, tokenizer, unknown)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def test_seed_models_state_their_terminators():
    for name, stops in {"llama-3.2-korean-3b": ["<|eot_id|>", "<|end_of_text|>"], "qwen3-4b": ["<|im_end|>", "<|endoftext|>"],
                        "solar-10.7b": ["</s>"], "polyglot-ko-12.8b": ["<|endoftext|>"], "kullm-v2": ["<|endoftext|>"],
                        "kobart": ["</s>"]}.items():  # fmt: skip
        assert load_model_config(name).generation.stop_tokens == stops, name


@pytest.mark.real_assets("qwen3-tokenizer")
def test_qwen3_chat_summaries_stop_at_im_end(real_asset):
    """The real Qwen3 tokenizer knows `<|im_end|>`, the terminator its chat template ends a turn with."""
    from dialogsum.generate import stop_token_ids

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_asset("qwen3-tokenizer"))
    cfg = load_model_config("qwen3-4b")

    class Card:  # the model's generation config as Qwen ships it: the tokenizer's EOS only
        generation_config = type("G", (), {"eos_token_id": tokenizer.eos_token_id})()

    ids = stop_token_ids(Card(), tokenizer, cfg)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids and tokenizer.convert_tokens_to_ids("<|endoftext|>") in ids


# --- no-repeat n-grams that let a summary name a speaker twice ------------------------------------------------------

# Reference summaries of the bundled sample, as written: the first names #Person2# after a space twice, so it repeats
# the bigram (`▁`, `#Person2#`); the second repeats the bigram (`▁함께`, `▁가기로`) of ordinary words.
SPEAKERS_TWICE = "#Person1#과 #Person2#는 과학 실험 보고서를 함께 쓰기로 하고, 4시에 도서관에서 만나 #Person1#이 그래프를, #Person2#가 요약을 맡기로 합니다."
PHRASE_TWICE = "#Person1#과 #Person2#는 함께 가기로 하고, 함께 가기로 합니다."


def forced_to_write(model, token_ids: list[int]):
    """A forward hook on the output layer adding 100 to the logit of the next token of `token_ids` (then EOS) in
    every row, so beam search writes exactly `token_ids` unless a logits processor forbids one of them."""
    script = token_ids + [model.config.eos_token_id]
    steps: list[int] = []

    def lift(module, args, logits):
        step = min(len(steps), len(script) - 1)
        steps.append(1)
        logits = logits.clone()
        logits[:, -1, script[step]] += 100.0
        return logits

    return model.get_output_embeddings().register_forward_hook(lift)


def summarize_forced(model, tokenizer, cfg, dialogues, text: str, ngram_size: int) -> list[str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    hook = forced_to_write(model, ids)
    try:
        generation = {"num_beams": 2, "max_new_tokens": len(ids) + 1, "min_new_tokens": 1,
                      "no_repeat_ngram_size": ngram_size, "repetition_penalty": 1.0}  # fmt: skip
        return summarize(model, tokenizer, cfg, dialogues[:2], 2, generation)
    finally:
        hook.remove()


def test_a_speaker_can_be_named_twice_under_no_repeat_ngrams(model_and_dialogues, monkeypatch):
    """The tiny BART is forced to write a real summary that names #Person2# twice (beam search, two dialogues in a
    batch): transformers' rule at size 2 blocks the second (`▁`, `#Person2#`); the tag-aware rule lets it through."""
    from transformers import NoRepeatNGramLogitsProcessor

    model, tokenizer, cfg, dialogues = model_and_dialogues
    assert summarize_forced(model, tokenizer, cfg, dialogues, SPEAKERS_TWICE, 0) == [SPEAKERS_TWICE] * 2  # the forcing works
    assert summarize_forced(model, tokenizer, cfg, dialogues, SPEAKERS_TWICE, 2) == [SPEAKERS_TWICE] * 2
    monkeypatch.setattr(dialogsum.generate, "TagAwareNoRepeatNGram", lambda n, *exempt: NoRepeatNGramLogitsProcessor(n))
    blocked = summarize_forced(model, tokenizer, cfg, dialogues, SPEAKERS_TWICE, 2)
    assert all(summary != SPEAKERS_TWICE for summary in blocked), blocked


def test_a_repeated_phrase_is_still_blocked(model_and_dialogues):
    """Forced to write `함께 가기로` twice, beam search under the tag-aware rule writes it once (where it gives up
    the forced token is the beams' choice)."""
    model, tokenizer, cfg, dialogues = model_and_dialogues
    assert summarize_forced(model, tokenizer, cfg, dialogues, PHRASE_TWICE, 0) == [PHRASE_TWICE] * 2
    for summary in summarize_forced(model, tokenizer, cfg, dialogues, PHRASE_TWICE, 2):
        assert summary.count("함께 가기로") == 1, summary


def test_tag_aware_no_repeat_is_transformers_rule_on_the_generated_tokens():
    """Without tags it bans what transformers' processor bans on the generated part, row by row (3 dialogues × 2
    beams); an n-gram seen only in the prompt bans nothing; n-grams holding a tag, or ending with the space piece,
    are not banned."""
    from transformers import NoRepeatNGramLogitsProcessor

    from dialogsum.generate import TagAwareNoRepeatNGram

    torch.manual_seed(0)
    input_ids, scores = torch.randint(0, 6, (6, 14)), torch.randn(6, 12)
    for n in (2, 3):
        theirs = NoRepeatNGramLogitsProcessor(n)(input_ids[:, 4:], scores.clone())
        assert torch.isinf(theirs).any()
        assert torch.equal(TagAwareNoRepeatNGram(n, [], [], prompt_length=4)(input_ids, scores.clone()), theirs)
    prompt, space, tag = [7, 8], 9, 10
    rule = TagAwareNoRepeatNGram(2, [tag], [space], prompt_length=len(prompt))

    def banned(generated: list[int]) -> list[int]:
        return torch.isinf(rule(torch.tensor([prompt + generated]), torch.zeros(1, 12))[0]).nonzero().flatten().tolist()

    assert banned([7]) == [], "(7, 8) is only in the prompt"
    assert banned([7, 8, 7]) == [8]
    assert banned([space, tag, 5, space]) == [], "(space, tag) holds a tag"
    assert banned([5, space, 6, 5]) == [], "(5, space) ends with the space piece"
    assert banned([5, space, 6, space]) == [6], "a space inside an n-gram exempts nothing"
