"""From dialogues to token ids: prompts, targets ending in EOS, cached tokenization, transformers' collator and
length-grouped sampler.

Seq2seq: the encoder reads BOS + dialogue + EOS (KoBART's model card); labels are the summary + EOS. Causal: the
prompt (chat template or instruction template) followed by summary + EOS, with the prompt positions masked out of
the loss (-100). A prompt starts with the tokenizer's BOS exactly once when the tokenizer defines one: added where
the rendered prompt has none (SOLAR's template; its model card's `tokenizer(prompt)` adds it), kept where the chat
template writes it (Llama-3's `<|begin_of_text|>`), none for a tokenizer without one (Qwen3). Dialogues that do
not fit `max_source_length` are cut at the dialogue, never at the instruction.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

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
        template = cfg.prompt.chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError(f"model '{cfg.name}': prompt.format 'chat' but neither prompt.chat_template nor the "
                             "tokenizer has a chat template")  # fmt: skip
        messages = [
            {"role": "system", "content": cfg.prompt.system},
            {"role": "user", "content": cfg.prompt.instruction.format(dialogue=dialogue)},
        ]
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    else:
        text = cfg.prompt.template.format(dialogue=dialogue)
    return _led_by_one_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def _led_by_one_bos(tokenizer, ids: list[int]) -> list[int]:
    """`ids` starting with exactly one BOS when the tokenizer defines one (a BOS the template already wrote is not
    repeated); unchanged for a tokenizer without BOS."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    return [bos] + list(itertools.dropwhile(lambda token: token == bos, ids))


def target_ids(cfg: ModelConfig, tokenizer, summary: str) -> list[int]:
    """Summary tokens, always ending with EOS (so generation learns to stop)."""
    ids = tokenizer(summary, add_special_tokens=False)["input_ids"][: cfg.training.max_target_length - 1]
    return ids + [tokenizer.eos_token_id]


def encode_example(cfg: ModelConfig, tokenizer, dialogue: str, summary: str) -> dict[str, list[int]]:
    """{"input_ids", "labels"} of one training example; causal models see the prompt masked out of the loss."""
    source = prompt_ids(cfg, tokenizer, dialogue)
    target = target_ids(cfg, tokenizer, summary)
    if cfg.task == "seq2seq":
        return {"input_ids": source, "labels": target}
    return {"input_ids": source + target, "labels": [IGNORE_INDEX] * len(source) + target}


def tokenizer_fingerprint(tokenizer) -> str:
    """Digest of everything that decides how the tokenizer splits text (its full serialized state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(state.encode("utf-8")).hexdigest()[:16]


def tokenize_rows(cfg: ModelConfig, tokenizer, dialogues: list[str], summaries: list[str], cache_folder: Path | None = None):
    """The rows encoded as a `datasets.Dataset` of {"input_ids", "labels"}, cached on disk under `cache_folder`
    by what decides the encoding (rows, tokenizer, prompt and lengths), so a rerun, a resumed run or another
    trial of a sweep reads 12k encoded rows back instead of tokenizing them again."""
    from datasets import Dataset

    key = hashlib.sha256(json.dumps([dialogues, summaries, tokenizer_fingerprint(tokenizer), cfg.task,
                                     cfg.prompt.model_dump(), cfg.training.max_source_length,
                                     cfg.training.max_target_length], ensure_ascii=False).encode("utf-8")).hexdigest()[:20]  # fmt: skip
    rows = Dataset.from_dict({"dialogue": dialogues, "summary": summaries})
    cache_file = str(cache_folder / f"{key}.arrow") if cache_folder is not None else None
    if cache_folder is not None:
        cache_folder.mkdir(parents=True, exist_ok=True)
    return rows.map(
        lambda row: encode_example(cfg, tokenizer, row["dialogue"], row["summary"]),
        remove_columns=["dialogue", "summary"],
        cache_file_name=cache_file,
        load_from_cache_file=cache_file is not None,
        new_fingerprint=key,
        desc="tokenize",
    )


class _FixedLabelLength:
    """Pads `labels` to a fixed length before transformers' collator pads the rest (the padded-to-max baseline)."""

    def __init__(self, collator, label_length: int):
        self.collator = collator
        self.label_length = label_length

    def __call__(self, features):
        for f in features:
            f["labels"] = list(f["labels"]) + [IGNORE_INDEX] * (self.label_length - len(f["labels"]))
        return self.collator(features)


def build_collator(cfg: ModelConfig, tokenizer):
    """transformers' `DataCollatorForSeq2Seq` (labels padded with -100): to each batch's longest example, or with
    `training.pad_to_max_length` to the configured lengths."""
    from transformers import DataCollatorForSeq2Seq

    t = cfg.training
    if not t.pad_to_max_length:
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    source = t.max_source_length if cfg.task == "seq2seq" else t.max_source_length + t.max_target_length
    fixed = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=source, label_pad_token_id=IGNORE_INDEX)
    return _FixedLabelLength(fixed, t.max_target_length) if cfg.task == "seq2seq" else fixed


class EpochSeededSampler:
    """transformers' `LengthGroupedSampler` (batches of similar lengths, the longest first so an out-of-memory
    error shows on step 1), or a plain shuffle; reseeded with seed + epoch by `set_epoch`, identically on every
    process of a distributed launch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        import torch
        from torch.utils.data import RandomSampler
        from transformers.trainer_pt_utils import LengthGroupedSampler

        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = (LengthGroupedSampler(batch_size, lengths=lengths, generator=self.generator) if group_by_length
                        else RandomSampler(range(len(lengths)), generator=self.generator))  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def full_prompt_ids(cfg: ModelConfig, tokenizer, dialogue: str) -> list[int]:
    """The model input `prompt_ids` builds for one dialogue, with the dialogue never cut to `max_source_length`:
    the length preflight's truncation report (`dialogsum.truncation`) compares with that limit."""
    if cfg.prompt.format != "seq2seq":
        return _render_prompt(cfg, tokenizer, dialogue)
    import sys

    unlimited = cfg.training.model_copy(update={"max_source_length": sys.maxsize})
    return prompt_ids(cfg.model_copy(update={"training": unlimited}), tokenizer, dialogue)
