"""From dialogues to token ids: prompts, targets ending in EOS, dynamic padding and length-grouped batches.

Seq2seq: the encoder reads the dialogue; labels are the summary + EOS. Causal: the prompt (chat template or
instruction template) followed by summary + EOS, with the prompt positions masked out of the loss (-100).
Dialogues that do not fit `max_source_length` are cut at the dialogue, never at the instruction.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dialogsum.config import ModelConfig

IGNORE_INDEX = -100


def _fit_dialogue(tokenizer, dialogue: str, budget: int) -> str:
    ids = tokenizer(dialogue, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return dialogue
    return tokenizer.decode(ids[: max(budget, 1)], skip_special_tokens=False)


def prompt_ids(cfg: ModelConfig, tokenizer, dialogue: str) -> list[int]:
    """Token ids of the model input for one dialogue (the generation prompt for causal models)."""
    max_len = cfg.training.max_source_length
    if cfg.prompt.format == "seq2seq":
        ids = tokenizer(dialogue, add_special_tokens=False)["input_ids"]
        before = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        after = [tokenizer.eos_token_id]
        return before + ids[: max_len - len(before) - len(after)] + after
    overhead = len(_render_prompt(cfg, tokenizer, ""))
    fitted = _fit_dialogue(tokenizer, dialogue, max_len - overhead)
    return _render_prompt(cfg, tokenizer, fitted)


def _render_prompt(cfg: ModelConfig, tokenizer, dialogue: str) -> list[int]:
    if cfg.prompt.format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"model '{cfg.name}': prompt.format 'chat' but the tokenizer has no chat template")
        messages = [
            {"role": "system", "content": cfg.prompt.system},
            {"role": "user", "content": cfg.prompt.instruction.format(dialogue=dialogue)},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = cfg.prompt.template.format(dialogue=dialogue)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def target_ids(cfg: ModelConfig, tokenizer, summary: str) -> list[int]:
    """Summary tokens, always ending with EOS (so generation learns to stop)."""
    ids = tokenizer(summary, add_special_tokens=False)["input_ids"][: cfg.training.max_target_length - 1]
    return ids + [tokenizer.eos_token_id]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_example(cfg: ModelConfig, tokenizer, dialogue: str, summary: str) -> Example:
    source = prompt_ids(cfg, tokenizer, dialogue)
    target = target_ids(cfg, tokenizer, summary)
    if cfg.task == "seq2seq":
        return Example(source, target)
    return Example(source + target, [IGNORE_INDEX] * len(source) + target)


class Collator:
    """Pads a batch to its own longest example (or to fixed lengths when `pad_to` is set)."""

    def __init__(self, pad_token_id: int, seq2seq: bool, pad_to: tuple[int, int] | None = None):
        self.pad_token_id = pad_token_id
        self.seq2seq = seq2seq
        self.pad_to = pad_to

    def __call__(self, batch: Sequence[Example]) -> dict:
        import torch

        source_len = max(len(e.input_ids) for e in batch)
        label_len = max(len(e.labels) for e in batch)
        if self.pad_to is not None:
            source_len, label_len = self.pad_to
            if not self.seq2seq:
                source_len = label_len = max(source_len + label_len, max(len(e.input_ids) for e in batch))
        input_ids = torch.full((len(batch), source_len), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), source_len), dtype=torch.long)
        labels = torch.full((len(batch), label_len), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(batch):
            input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention[i, : len(e.input_ids)] = 1
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort within mega-batches, shuffle batch order.
    The longest batch comes first so an out-of-memory error shows on step 1, not mid-epoch."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * mega
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


class BatchPlan:
    """A batch sampler for DataLoader: length-grouped (reshuffled each epoch) or plain shuffled batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        seed = self.seed + self.epoch
        if self.group_by_length:
            yield from length_grouped_batches(self.lengths, self.batch_size, seed)
            return
        order = list(range(len(self.lengths)))
        random.Random(seed).shuffle(order)
        for i in range(0, len(order), self.batch_size):
            yield order[i : i + self.batch_size]

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size
