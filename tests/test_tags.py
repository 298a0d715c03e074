"""The dialogue tags on LoRA models with an untied output layer (SOLAR, Polyglot-Ko and KULLM have one): tiny Llama and
GPT-NeoX models of those architectures, random init, tokenizers trained from the bundled sample.

Each new tag's rows start at the mean of the pieces it used to be split into, in the input embedding and in the
output layer; peft trains those rows in both; an embedding matrix padded beyond the tokenizer (Polyglot-Ko: 30,080
rows for 30,003 tokens) is never shrunk, and padding rows are never generated."""

from __future__ import annotations

import pytest
import torch

from dialogsum.config import load_model_config
from dialogsum.data import SPECIAL_TOKENS, read_dialogues, sample_data_path
from dialogsum.features import build_collator, tokenize_rows
from dialogsum.generate import summarize
from dialogsum.models import build_model, load_tokenizer, tag_pieces
from dialogsum.precision import detect_device, resolve_precision

NEOX_ARCHITECTURE = {"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}  # fmt: skip
CASES = {
    "llama": ("llama-tiny", {}),
    "gpt_neox": ("llama-tiny", {"family": "gpt_neox", "architecture": NEOX_ARCHITECTURE,
                                "lora.targets": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}),
}  # fmt: skip


def _build(case: str, extra_rows: int = 0):
    name, overrides = CASES[case]
    cfg = load_model_config(name, {**overrides, "training.learning_rate": 5e-2})
    rows = read_dialogues(sample_data_path("train"))
    tokenizer = load_tokenizer(cfg, rows.dialogues + rows.summaries)
    if extra_rows:  # a vocabulary padded by its authors beyond the tokenizer, as Polyglot-Ko's
        cfg = cfg.model_copy(update={"architecture": {**cfg.architecture, "vocab_size": len(tokenizer) + extra_rows}})
    built = build_model(cfg, tokenizer, resolve_precision("fp32", detect_device()))
    return cfg, tokenizer, built, rows


def _matrices(model) -> dict[str, torch.Tensor]:
    base = model.get_base_model()
    return {"input": base.get_input_embeddings().weight, "output": base.get_output_embeddings().weight}


def _merged_rows(model, tag_ids: list[int]) -> dict[str, torch.Tensor]:
    """The tag rows as the model uses them (peft keeps trained rows beside the frozen matrix until merged)."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return {"input": merged.get_input_embeddings().weight[tag_ids].detach().clone(),
            "output": merged.get_output_embeddings().weight[tag_ids].detach().clone()}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_tag_rows_start_at_their_piece_means_and_train_in_both_matrices(case: str):
    cfg, tokenizer, built, rows = _build(case)
    model = built.model
    tag_ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    base = model.get_base_model()
    assert not torch.equal(base.get_input_embeddings().weight, base.get_output_embeddings().weight), "untied"
    for name, weight in _matrices(model).items():
        for tag, tag_id in zip(SPECIAL_TOKENS, tag_ids):
            pieces = tag_pieces(tokenizer, tag)
            assert pieces and tag_id not in pieces
            assert torch.allclose(weight[tag_id], weight[pieces].mean(0), atol=1e-6), (name, tag)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    for module in ("embed_in", "lm_head") if case == "gpt_neox" else ("embed_tokens", "lm_head"):
        assert any(f".{module}." in n for n in trained), (module, trained)

    initial = {k: v.detach().clone() for k, v in _matrices(model).items()}
    data = tokenize_rows(cfg, tokenizer, rows.dialogues[:16], rows.summaries[:16])
    batch = build_collator(cfg, tokenizer)([data[i] for i in range(len(data))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _merged_rows(model, tag_ids)
    for name in ("input", "output"):
        moved = (after[name] - initial[name][tag_ids]).abs().sum(dim=1)
        used = [i for i, t in enumerate(tag_ids) if (batch["input_ids"] == t).any()]
        assert used and all(moved[i] > 0 for i in used), f"{name} rows of the tags in the batch did not train"


def test_a_padded_vocabulary_is_never_shrunk_and_its_padding_is_never_generated():
    cfg, tokenizer, built, rows = _build("gpt_neox", extra_rows=40)
    base = built.model.get_base_model()
    assert base.get_input_embeddings().weight.shape[0] == len(tokenizer) + 40
    model = built.model.merge_and_unload()
    with torch.no_grad():  # make the padding rows the most likely tokens: they must still never come out
        model.get_output_embeddings().weight[len(tokenizer):] = model.get_output_embeddings().weight.abs().max() * 50
    held_out = read_dialogues(sample_data_path("dev")).dialogues[:2]  # rows the tokenizer was not trained on
    summaries = summarize(model, tokenizer, cfg, held_out, 2, {"max_new_tokens": 6, "min_new_tokens": 6})
    assert all(isinstance(s, str) for s in summaries)
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in summaries]
    assert all(i < len(tokenizer) for row in ids for i in row)


@pytest.mark.parametrize("case", list(CASES))
def test_after_training_generation_emits_person1_and_person2_as_distinct_tokens(case: str):
    """Trained briefly on the sample's summaries (most name both speakers), greedy generation for held-out dev rows
    writes both tags, each as its own single token: the two rows are told apart, in input and output layer."""
    torch.manual_seed(0)  # LoRA's initial weights come from the global RNG: independent of which tests ran before
    cfg, tokenizer, built, rows = _build(case)
    model = built.model
    person1, person2 = tokenizer.convert_tokens_to_ids(["#Person1#", "#Person2#"])
    data = tokenize_rows(cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_source_length": 160})}),
                         tokenizer, rows.dialogues, rows.summaries)  # fmt: skip
    collate = build_collator(cfg, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(TRAIN_EPOCHS):
        order = torch.randperm(len(data)).tolist()
        for start in range(0, len(order), 16):
            model(**collate([data[i] for i in order[start : start + 16]])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    held_out = read_dialogues(sample_data_path("dev")).dialogues[:6]
    summaries = summarize(model, tokenizer, cfg, held_out, 6, {"max_new_tokens": 12, "min_new_tokens": 4, "repetition_penalty": 1.0})
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in summaries]
    emitted = {i for row in ids for i in row}
    assert person1 != person2 and {person1, person2} <= emitted, summaries
    assert any("#Person1#" in s for s in summaries) and any("#Person2#" in s for s in summaries), summaries


TRAIN_EPOCHS = 12
