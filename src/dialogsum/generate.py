"""Summarise dialogues with a loaded model: batched, length-sorted, generation settings from the config."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import transformers
from packaging.version import Version
from transformers import LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from dialogsum.config import GenerationSettings, ModelConfig
from dialogsum.data import SPECIAL_TOKENS
from dialogsum.features import prompt_ids

# transformers 5.24 renamed generate's `past_key_values` to `cache`; the old name warns until it goes in 6.0.
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"


def generation_kwargs(settings: GenerationSettings, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`generate` keyword arguments from the settings and per-request overrides; `repetition_penalty` and
    `no_repeat_ngram_size` stay in (`summarize` turns them into `GeneratedRepetitionPenalty` and
    `TagAwareNoRepeatNGram`), `stop_tokens` is not overridable."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "stop_tokens" in overrides:
        raise ValueError("stop_tokens is part of the model's config, not a per-request parameter")
    merged = settings.model_copy(update=overrides)
    GenerationSettings.model_validate(merged.model_dump())  # reject unknown or ill-typed overrides
    return merged.model_dump(exclude={"stop_tokens"})


def stop_token_ids(model, tokenizer, cfg: ModelConfig) -> list[int]:
    """Every id that ends a summary: the model's generation-config EOS ids (an int or a list), the tokenizer's EOS
    and the config's `generation.stop_tokens`, without repeats. A stop token the tokenizer lacks is an error."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(found) if isinstance(found, (list, tuple)) else [found]
    ids.append(tokenizer.eos_token_id)
    for token in cfg.generation.stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(f"model '{cfg.name}': generation.stop_tokens: {token!r} is not a token of its tokenizer")
        ids.append(token_id)
    return list(dict.fromkeys(i for i in ids if i is not None))


class GeneratedRepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty (CTRL: a seen token's positive logit divided by `penalty`, a negative one
    multiplied), counting only the tokens generated after the first `prompt_length` positions. transformers'
    own processor counts the prompt too, so every name and `#PersonN#` tag of the dialogue would be penalised."""

    def __init__(self, penalty: float, prompt_length: int):
        self.penalty = penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        seen = torch.gather(scores, 1, generated)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, generated, seen)


class TagAwareNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """transformers' no-repeat-n-gram rule (a token that would complete an n-gram already in the sequence gets
    -inf, row by row, so per beam and per dialogue of a batch), with two differences:

    - n-grams that hold a dialogue tag, or that end with the piece a tokenizer writes for the space before a tag
      (KoBART's bare `▁`), are never blocked: the reference summaries name a speaker again and again (`▁`,
      `#Person2#`, `는` …), and a repeated (`다.`, `▁`) would keep the next tag from being written at all;
    - only generated tokens count, after the first `prompt_length` positions (as `GeneratedRepetitionPenalty`):
      transformers' processor also counts a causal model's prompt, so every n-gram of the dialogue and of the
      chat template would be blocked from the summary.

    A space piece inside an n-gram does not exempt it (SOLAR's vocabulary writes a bare `▁` before most Korean
    words), so a repeated phrase of the summary is still blocked. The matching is transformers': the last n-1
    tokens against every window of the sequence."""

    def __init__(self, ngram_size: int, tag_ids: list[int], space_ids: list[int], prompt_length: int):
        import torch

        super().__init__(ngram_size)
        self.tag_ids = torch.tensor(tag_ids, dtype=torch.long)
        self.space_ids = torch.tensor(space_ids, dtype=torch.long)
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_length :]
        n, length = self.ngram_size, generated.shape[-1]
        if length < n:
            return scores
        prefix = generated[:, length + 1 - n :]
        windows = generated.unfold(dimension=1, size=n, step=1)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        exempt = torch.isin(windows, self.tag_ids.to(windows.device)).any(dim=-1)
        exempt |= torch.isin(windows[..., -1], self.space_ids.to(windows.device))
        # Windows that ban nothing (and ids beyond the scores' width) go to a spare column that is dropped.
        vocab_size = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], vocab_size + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches & ~exempt, windows[..., -1].clamp(max=vocab_size), vocab_size), True)
        return scores.masked_fill(banned[:, :vocab_size], -float("inf"))


def tag_and_space_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The ids of the dialogue tags the tokenizer holds as tokens, and of the piece(s) it writes for the space
    before a tag (`▁` for SentencePiece vocabularies, `Ġ` for byte-level ones); ([], []) without tags."""
    added = tokenizer.get_added_vocab()
    tags = [tag for tag in SPECIAL_TOKENS if tag in added]
    if not tags:
        return [], []
    return [added[tag] for tag in tags], tokenizer(" " + tags[0], add_special_tokens=False)["input_ids"][:-1]


def summarize(
    model,
    tokenizer,
    cfg: ModelConfig,
    dialogues: Sequence[str],
    batch_size: int = 16,
    overrides: dict[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Summaries in input order. Batches are built from length-sorted inputs to minimise padding; causal
    models are left-padded so generation continues right after each prompt."""
    import torch

    kwargs = generation_kwargs(cfg.generation, overrides)
    penalty = kwargs.pop("repetition_penalty")
    ngram_size = kwargs.pop("no_repeat_ngram_size")
    tag_ids, space_ids = tag_and_space_ids(tokenizer)
    stops = stop_token_ids(model, tokenizer, cfg)
    # Rows beyond the tokenizer (embeddings padded to a multiple of 64, a vocabulary padded by its authors) are
    # not tokens: never generate them.
    padding_rows = list(range(len(tokenizer), getattr(model.config, "vocab_size", 0) or 0))
    if padding_rows:
        kwargs["suppress_tokens"] = padding_rows
    encoded = [prompt_ids(cfg, tokenizer, d) for d in dialogues]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    left = cfg.task == "causal"
    beam_cache = cfg.task == "seq2seq" and kwargs["num_beams"] > 1 and model.generation_config.use_cache
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = torch.tensor(encoded[i])
                span = slice(width - len(ids), width) if left else slice(0, len(ids))
                input_ids[row, span] = ids
                attention[row, span] = 1
            cache = {CACHE_KWARG: BeamSharedCrossAttentionCache()} if beam_cache else {}
            # Causal: the prompt is the left-padded input; seq2seq: the decoder starts from one start token.
            prompt_length = width if left else 1
            processors = LogitsProcessorList(
                ([GeneratedRepetitionPenalty(penalty, prompt_length)] if penalty != 1.0 else [])
                + ([TagAwareNoRepeatNGram(ngram_size, tag_ids, space_ids, prompt_length)] if ngram_size > 0 else [])
            )
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                pad_token_id=pad,
                eos_token_id=stops,
                logits_processor=processors,
                no_repeat_ngram_size=0,  # transformers' own rule stays off, whatever the model's generation config says
                **kwargs,
                **cache,
            )
            if left:
                generated = generated[:, width:]
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(generated[row], skip_special_tokens=True).strip()
            if on_batch:
                on_batch(len(idx))
    return outputs


class BeamSharedCrossAttentionCache(EncoderDecoderCache):
    """An encoder-decoder cache for beam search that leaves the cross-attention keys and values in place when
    beams are reordered.

    Beam search reorders beams only within their own dialogue, and every beam of a dialogue attends to the same
    encoder output, so the cross-attention rows it would gather are copies of the rows already there.
    transformers' `EncoderDecoderCache` gathers them anyway: for each new token, the keys and values of the
    whole source (every layer, every beam) are copied once more, which was 28% of KoBART-sized fp32 generation
    with 4 beams on CPU. Self-attention keys and values, which differ per beam, are reordered as usual."""

    def __init__(self) -> None:
        super().__init__(DynamicCache(), DynamicCache())

    def reorder_cache(self, beam_idx) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)
