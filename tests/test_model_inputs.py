"""Every seed model's input as its model card feeds it, on the first real row of the competition's labelled rows:
the first and last prompt tokens (printed, run with `-s` to see them) against the card's format, and the
tokenizer's BOS exactly once where the tokenizer defines one (none for Qwen3's, which has none).

Each model's config is loaded by dialogsum's own loader with its tokenizer pointed at a real tokenizer
(`--set tokenizer.path=...`). Two stand-ins, because the real files are not on this machine:
- SOLAR: `solar-tokenizer` is Mistral-7B's tokenizer (SOLAR-10.7B's exact 32,000-piece vocabulary) without a chat
  template; SOLAR-10.7B-Instruct-v1.0's own template is pinned in its model config (`prompt.chat_template`).
- Polyglot-Ko and KULLM: no tokenizer of theirs exists here. Their prompt is checked as rendered TEXT, and at token
  level with the Llama-3 tokenizer standing in (a byte-level BPE with a BOS, as GPT-NeoX's is byte-level).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dialogsum.config import load_model_config
from dialogsum.data import read_dialogues
from dialogsum.features import prompt_ids
from dialogsum.models import load_tokenizer

# nlpai-lab/KULLM templates/kullm.json "prompt_input" (commit 33ef2a461da1c6ffb191b5ff162c456b7ae35d28), which its
# utils/prompter.py fills with str.format.
KULLM_PROMPT_INPUT = ("아래는 작업을 설명하는 명령어와 추가 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. 요청을 적절히 "
                      "완료하는 응답을 작성하세요.\n\n### 명령어:\n{instruction}\n\n### 입력:\n{input}\n\n### 응답:\n")  # fmt: skip
EDGE = 6  # tokens printed at each end


@pytest.fixture(scope="module")
def dialogue(real_asset: Callable[[str], Path]) -> str:
    return read_dialogues(real_asset("labeled")).rows[0].dialogue


def seed_model(name: str, tokenizer_path: Path, **overrides):
    cfg = load_model_config(name, {"tokenizer.path": str(tokenizer_path), **overrides})
    return cfg, load_tokenizer(cfg)


def chat_messages(cfg, dialogue: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": cfg.prompt.system},
            {"role": "user", "content": cfg.prompt.instruction.format(dialogue=dialogue)}]  # fmt: skip


def edges(name: str, tokenizer, ids: list[int]) -> tuple[list[str], list[str]]:
    """The first and last prompt tokens as token strings, printed with the text they decode to."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    print(f"\n{name}: {len(ids)} tokens\n  first {tokens[:EDGE]} = {tokenizer.decode(ids[:EDGE])!r}"
          f"\n  last  {tokens[-EDGE:]} = {tokenizer.decode(ids[-EDGE:])!r}")  # fmt: skip
    return tokens[:EDGE], tokens[-EDGE:]


@pytest.mark.real_assets("labeled", "kobart-tokenizer")
def test_kobart_reads_bos_dialogue_eos(real_asset, dialogue):
    """digit82/kobart-summarization's card: `[bos_token_id] + tokenizer.encode(text) + [eos_token_id]`."""
    cfg, tokenizer = seed_model("kobart", real_asset("kobart-tokenizer"))
    ids = prompt_ids(cfg, tokenizer, dialogue)
    first, last = edges(cfg.name, tokenizer, ids)
    assert ids == [tokenizer.bos_token_id] + tokenizer.encode(dialogue) + [tokenizer.eos_token_id]
    assert first[:3] == ["<s>", "#Person1#", ":"] and last[-1] == "</s>"
    assert ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.real_assets("labeled", "llama3-tokenizer")
def test_llama3_prompt_is_its_chat_template_with_begin_of_text_once(real_asset, dialogue):
    """Bllossom-3B's card tokenizes with `apply_chat_template(messages, add_generation_prompt=True)`; the template
    writes `<|begin_of_text|>` itself, so none is added on top."""
    cfg, tokenizer = seed_model("llama-3.2-korean-3b", real_asset("llama3-tokenizer"))
    ids = prompt_ids(cfg, tokenizer, dialogue)
    first, last = edges(cfg.name, tokenizer, ids)
    assert ids == tokenizer.apply_chat_template(chat_messages(cfg, dialogue), add_generation_prompt=True)["input_ids"]
    assert first[:4] == ["<|begin_of_text|>", "<|start_header_id|>", "system", "<|end_header_id|>"]
    assert last[-5:] == ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"]
    assert ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.real_assets("labeled", "qwen3-tokenizer")
def test_qwen3_prompt_is_its_chat_template_without_bos(real_asset, dialogue):
    """Qwen3-4B-Instruct-2507's card: `apply_chat_template(..., tokenize=False, add_generation_prompt=True)`, then
    `tokenizer([text])`; its tokenizer has no BOS and none is added."""
    cfg, tokenizer = seed_model("qwen3-4b", real_asset("qwen3-tokenizer"))
    ids = prompt_ids(cfg, tokenizer, dialogue)
    first, last = edges(cfg.name, tokenizer, ids)
    text = tokenizer.apply_chat_template(chat_messages(cfg, dialogue), tokenize=False, add_generation_prompt=True)
    assert tokenizer.bos_token_id is None
    assert ids == tokenizer([text])["input_ids"][0]
    assert first[:3] == ["<|im_start|>", "system", "Ċ"]
    assert last[-5:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]


@pytest.mark.real_assets("labeled", "solar-tokenizer")
def test_solar_prompt_is_its_template_after_one_bos(real_asset, dialogue):
    """SOLAR-10.7B-Instruct-v1.0's card renders `### System:` / `### User:` / `### Assistant:` with tokenize=False
    and calls `tokenizer(prompt)`, which adds `<s>`; the template itself writes none. A dialogue cut to fit
    `max_source_length` keeps the BOS and the `### Assistant:` generation prompt."""
    cfg, tokenizer = seed_model("solar-10.7b", real_asset("solar-tokenizer"))
    assert not tokenizer.chat_template, "the shared Mistral-7B files have none: the config's template is what renders"
    ids = prompt_ids(cfg, tokenizer, dialogue)
    first, last = edges(cfg.name, tokenizer, ids)
    text = tokenizer.apply_chat_template(chat_messages(cfg, dialogue), chat_template=cfg.prompt.chat_template, tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    assert text.startswith("### System:\n" + cfg.prompt.system + "\n\n### User:\n") and text.endswith("\n\n### Assistant:\n")
    assert ids == tokenizer(text)["input_ids"]
    assert first[:4] == ["<s>", "▁###", "▁System", ":"] and last[-4:] == ["###", "▁Assistant", ":", "<0x0A>"]
    assert ids.count(tokenizer.bos_token_id) == 1
    cut = prompt_ids(cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_source_length": 160})}), tokenizer, dialogue)
    assert len(cut) <= 160 and cut[0] == tokenizer.bos_token_id and cut.count(tokenizer.bos_token_id) == 1
    assert cut[-4:] == ids[-4:]


@pytest.mark.real_assets("labeled", "llama3-tokenizer")
@pytest.mark.parametrize(
    ("name", "expected_text"),
    [
        # Polyglot-Ko is a base model: its card gives no prompt format; the config's own template is checked.
        pytest.param("polyglot-ko-12.8b", "### 대화:\n{dialogue}\n\n### 요약:\n", id="polyglot-ko-12.8b"),
        pytest.param("kullm-v2", KULLM_PROMPT_INPUT.format(instruction="다음 대화를 요약하세요.", input="{dialogue}"), id="kullm-v2"),
    ],
)
def test_instruction_prompt_is_the_template_text_after_one_bos(real_asset, dialogue, name, expected_text):
    """The rendered text is the template's, byte for byte (KULLM's: its repository's own `kullm` template); at token
    level (Llama-3's tokenizer standing in, see the module docstring) one BOS leads the tokenized text, also when
    the template writes the BOS itself."""
    cfg, tokenizer = seed_model(name, real_asset("llama3-tokenizer"))
    text = cfg.prompt.template.format(dialogue=dialogue)
    assert text == expected_text.format(dialogue=dialogue)
    ids = prompt_ids(cfg, tokenizer, dialogue)
    edges(f"{name} (Llama-3 tokenizer standing in)", tokenizer, ids)
    assert ids == [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[-4:]).endswith(expected_text.rsplit("\n\n", 1)[1])  # "### 요약:\n" / "### 응답:\n"
    writes_bos = cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"template": tokenizer.bos_token + cfg.prompt.template})})
    assert prompt_ids(writes_bos, tokenizer, dialogue) == ids
