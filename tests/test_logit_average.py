"""Logit averaging over models that share a tokenizer: tiny KoBART (seq2seq) and Llama (causal) models of the real
architectures, random init, tokenizers trained from the bundled sample, generating for held-out dev rows."""

from __future__ import annotations

import pytest
import torch

from dialogsum.config import load_model_config
from dialogsum.data import read_dialogues, sample_data_path
from dialogsum.features import prompt_ids
from dialogsum.generate import summarize
from dialogsum.logit_average import IncompatibleModels, averaging, check_compatible, mean_log_probs
from dialogsum.models import build_model, load_tokenizer
from dialogsum.precision import detect_device, resolve_precision

GENERATION = {"max_new_tokens": 8, "min_new_tokens": 3}


def _members(name: str, seeds: tuple[int, ...]):
    rows = read_dialogues(sample_data_path("train"))
    members = []
    for seed in seeds:
        cfg = load_model_config(name, {"training.seed": seed})
        tokenizer = load_tokenizer(cfg, rows.dialogues + rows.summaries)
        model = build_model(cfg, tokenizer, resolve_precision("fp32", detect_device()), for_training=False).model.eval()
        members.append((model, tokenizer, cfg))
    return members


@pytest.mark.parametrize("name", ["kobart-tiny", "llama-tiny"])
@pytest.mark.parametrize("beams", [1, 3])
def test_averaging_two_identical_models_gives_the_summaries_of_one(name: str, beams: int):
    (model, tokenizer, cfg), = _members(name, (1,))
    dialogues = read_dialogues(sample_data_path("dev")).dialogues[:3]
    settings = {**GENERATION, "num_beams": beams}
    alone = summarize(model, tokenizer, cfg, dialogues, 3, settings)
    with averaging([model, model]) as main:
        together = summarize(main, tokenizer, cfg, dialogues, 3, settings)
    assert together == alone
    assert summarize(model, tokenizer, cfg, dialogues, 3, settings) == alone, "the model is itself again after the context"


@pytest.mark.parametrize("name", ["kobart-tiny", "llama-tiny"])
def test_the_first_token_is_the_argmax_of_the_mean_distribution(name: str):
    members = _members(name, (1, 2))
    check_compatible(members)
    (first, tokenizer, cfg), (second, _, _) = members
    dialogue = read_dialogues(sample_data_path("dev")).dialogues[0]
    ids = torch.tensor([prompt_ids(cfg, tokenizer, dialogue)])
    with torch.no_grad():
        if cfg.task == "seq2seq":
            start = torch.tensor([[first.config.decoder_start_token_id]])
            logits = [m(input_ids=ids, decoder_input_ids=start).logits[:, -1] for m in (first, second)]
        else:
            logits = [m(input_ids=ids).logits[:, -1] for m in (first, second)]
    expected = mean_log_probs(logits)[0, : len(tokenizer)].argmax().item()
    with averaging([first, second]) as main:
        output = main.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1,
                               num_beams=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    token = output[0, -1].item()
    assert token == expected


def test_models_with_other_tokenizers_are_refused():
    kobart = _members("kobart-tiny", (1,))
    llama = _members("llama-tiny", (1,))
    with pytest.raises(IncompatibleModels, match="another task"):
        check_compatible([kobart[0], llama[0]])
