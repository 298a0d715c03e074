"""Logit averaging: several models that share a tokenizer decode as one, each step choosing from the mean of their
next-token distributions, log(1/n · Σ softmax(logits_i)), so greedy and beam search run over the averaged
distribution (the K-fold ensemble of the competition's 2nd place).

`averaging(models)` makes the first model generate for all of them: its forward returns the averaged
distribution as logits, so transformers' `generate` (beam search, minimum length, no-repeat n-grams, stop tokens) and
dialogsum's logits processors act on the average unchanged. The other models see exactly the same inputs: the
same prompt ids for a causal model; for a seq2seq model, their own encoder run once on the same source (captured
when the first model's encoder runs) and the same decoder prefix. Generation runs without a KV cache inside the
context, so every step re-reads the prefix: correct, and slower than one cached model by about the prefix length
(summaries are short; prompts of causal models are not).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator


class IncompatibleModels(ValueError):
    """Models that cannot be averaged: different tokenizers, vocabularies or tasks."""


def check_compatible(members: list[tuple]) -> None:
    """`members`: (model, tokenizer, cfg) per source; the tokenizers must be the same token for token."""
    _, first_tokenizer, first_cfg = members[0]
    vocab = first_tokenizer.get_vocab()
    rows = members[0][0].get_output_embeddings().weight.shape[0]
    for i, (model, tokenizer, cfg) in enumerate(members[1:], start=1):
        if cfg.task != first_cfg.task or cfg.prompt != first_cfg.prompt:
            raise IncompatibleModels(f"source {i} ({cfg.name}) has another task or prompt than source 0 ({first_cfg.name})")
        if tokenizer.get_vocab() != vocab:
            raise IncompatibleModels(f"source {i} ({cfg.name}) has another tokenizer than source 0 ({first_cfg.name}): "
                                     "logits can be averaged only over the same tokens")  # fmt: skip
        if model.get_output_embeddings().weight.shape[0] != rows:
            raise IncompatibleModels(f"source {i} ({cfg.name}) has {model.get_output_embeddings().weight.shape[0]} output rows, "
                                     f"source 0 has {rows}")  # fmt: skip


def mean_log_probs(logits: list) -> object:
    """log of the mean of the softmaxes, in fp32."""
    import torch

    stacked = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))


@contextmanager
def averaging(models: list) -> Iterator[object]:
    """Within the context, `models[0]` generates from the average of all models' next-token distributions."""
    import torch

    main, others = models[0], models[1:]
    original_forward = main.forward
    encoder = main.get_encoder() if main.config.is_encoder_decoder else None
    original_encoder_forward = encoder.forward if encoder is not None else None
    patched = [m for m in (main, encoder) if m is not None]
    own = {id(m): m.__dict__.get("forward") for m in patched}  # accelerate's hooks live on the instance: kept
    original_use_cache = main.generation_config.use_cache
    sources: dict[str, list] = {}

    def encode(*args, **kwargs):
        out = original_encoder_forward(*args, **kwargs)
        inputs = {"input_ids": kwargs.get("input_ids", args[0] if args else None), "attention_mask": kwargs.get("attention_mask")}
        sources["encoded"] = [(original_encoder_forward if m is main else m.get_encoder())(**inputs) for m in others]
        return out

    def call(model, **inputs):  # the same model twice is allowed (it must not call its own patched forward)
        return (original_forward if model is main else model)(**inputs, use_cache=False)

    def forward(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        if main.config.is_encoder_decoder:
            prefix = kwargs["decoder_input_ids"]
            mask = kwargs.get("attention_mask")
            logits = []
            for model, encoded in zip(others, sources["encoded"]):
                repeat = prefix.shape[0] // encoded.last_hidden_state.shape[0]  # beams share their dialogue's source
                hidden = encoded.last_hidden_state.repeat_interleave(repeat, dim=0)
                logits.append(call(model, encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=prefix).logits[:, -1])
        else:
            logits = [call(model, input_ids=kwargs["input_ids"], attention_mask=kwargs.get("attention_mask"),
                           position_ids=kwargs.get("position_ids")).logits[:, -1] for model in others]  # fmt: skip
        own = out.logits[:, -1].float()
        # As logits: the log of the mean probability plus the first model's normaliser, a per-row shift that no
        # softmax sees; a model averaged with itself gets its own logits back, and logit-space processors (the
        # repetition penalty treats positive and negative logits differently) act as they do on one model.
        averaged = mean_log_probs([own, *logits]) + torch.logsumexp(own, dim=-1, keepdim=True)
        out.logits = averaged[:, None, :].to(out.logits.dtype)
        return out

    main.forward = forward
    if encoder is not None:
        encoder.forward = encode
    main.generation_config.use_cache = False
    try:
        with torch.inference_mode():
            yield main
    finally:
        for module in patched:
            if own[id(module)] is None:
                del module.forward  # the class's forward shows again
            else:
                module.forward = own[id(module)]
        main.generation_config.use_cache = original_use_cache
