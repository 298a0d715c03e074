"""Summarise dialogues with a loaded model: batched, length-sorted, generation settings from the config."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dialogsum.config import GenerationSettings, ModelConfig
from dialogsum.features import prompt_ids


def generation_kwargs(settings: GenerationSettings, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    merged = settings.model_copy(update={k: v for k, v in (overrides or {}).items() if v is not None})
    GenerationSettings.model_validate(merged.model_dump())  # reject unknown or ill-typed overrides
    kwargs = merged.model_dump()
    if kwargs["no_repeat_ngram_size"] == 0:
        kwargs.pop("no_repeat_ngram_size")
    return kwargs


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
    encoded = [prompt_ids(cfg, tokenizer, d) for d in dialogues]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    left = cfg.task == "causal"
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
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
            if left:
                generated = generated[:, width:]
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(generated[row], skip_special_tokens=True).strip()
            if on_batch:
                on_batch(len(idx))
    return outputs
