"""Builders: tokenizer, model (hub weights or a random-init model of the real architecture), LoRA/QLoRA.

A config-source model is materialised once as a random-init checkpoint in the cache folder and then loaded
through the same `from_pretrained` path as hub weights, so quantization and LoRA are exercised exactly as for
real models. Every tokenizer gets the dialogue tags (`#Person1#`, `#PhoneNumber#`, ...) as single tokens and
the model's embeddings are resized to match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dialogsum.config import ModelConfig
from dialogsum.data import SPECIAL_TOKENS
from dialogsum.precision import PrecisionPolicy

EMBEDDING_ROWS_MULTIPLE = 64


def cache_dir() -> Path:
    path = Path(os.environ.get("DIALOGSUM_CACHE_DIR") or Path.home() / ".cache" / "dialogsum")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_tokenizer(texts: list[str], cfg: ModelConfig):
    """A SentencePiece-style BPE tokenizer trained on the training texts, cached under a key made of what decides
    it: the texts actually used (not the file they came from), the vocabulary size and the task."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts_digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    folder = cache_dir() / "tokenizers" / f"{cfg.family}-{_digest(texts_digest, cfg.tokenizer.vocab_size, cfg.task)}"
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if cfg.task == "seq2seq":
        specials["mask_token"] = "<mask>"
    raw = SentencePieceBPETokenizer(unk_token="<unk>")
    raw.train_from_iterator(texts, vocab_size=cfg.tokenizer.vocab_size, special_tokens=list(specials.values()), show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, **specials)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    _publish(tmp, folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def load_tokenizer(cfg: ModelConfig, train_texts: list[str] | None = None):
    """The config's tokenizer with the dialogue tags added as single (non-special, so never stripped) tokens, and
    the text after a tag kept attached to it (`prepend_space_at_start_only`)."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer.path or cfg.hub_id
    if source:
        tokenizer = AutoTokenizer.from_pretrained(source, **_revision(cfg.tokenizer_revision))
    elif train_texts:
        tokenizer = train_tokenizer(train_texts, cfg)
    else:
        raise ValueError(f"model '{cfg.name}' has no tokenizer path and no training texts to train one from")
    add_dialogue_tokens(tokenizer)
    prepend_space_at_start_only(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _revision(revision: str | None) -> dict[str, str]:
    return {"revision": revision} if revision else {}


def hub_commit(repo_id: str, revision: str | None = None, filename: str = "config.json") -> str | None:
    """The commit of the HF cache snapshot that `repo_id` at `revision` (default: main) resolves to, which is what
    `from_pretrained` just loaded; None for a local folder or a file that is not cached."""
    from huggingface_hub import try_to_load_from_cache

    if not repo_id or Path(repo_id).exists():
        return None
    try:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None


def add_dialogue_tokens(tokenizer) -> int:
    """Add `#Person1#`… and the masked-entity tags as whole tokens; returns how many were new."""
    from tokenizers import AddedToken

    return tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in SPECIAL_TOKENS])


def prepend_space_at_start_only(tokenizer) -> None:
    """Set a Metaspace pre-tokenizer and decoder (KoBART's, and the SentencePiece BPE tokenizers trained here) to
    `prepend_scheme: first`: `▁` is prepended to the start of the text only, not again after every added token.
    With `always`, `#Person2#는` is split `#Person2#`, `▁는` and decodes as `#Person2# 는`; with `first` the text
    after a tag stays attached as written, as the tokenizer split it before the tag was one token. The setting is
    part of the backend's serialized state, so `save_pretrained` and every load of the saved tokenizer keep it.
    Other pre-tokenizers (byte-level BPE: Llama-3, Qwen3) are left as they are."""
    from tokenizers import decoders, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    pre_tokenizer = backend.pre_tokenizer  # a handle on the backend's own objects: they are set in place
    steps = list(pre_tokenizer) if isinstance(pre_tokenizer, pre_tokenizers.Sequence) else [pre_tokenizer]
    for step in steps + [backend.decoder]:
        if isinstance(step, (pre_tokenizers.Metaspace, decoders.Metaspace)):
            step.prepend_scheme = "first"


def materialize_random_init(cfg: ModelConfig, tokenizer) -> Path:
    """Save a random-init checkpoint of the config's architecture sized to the tokenizer, or to its own larger
    `vocab_size` (cached)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    arch = dict(cfg.architecture or {})
    model_type = arch.pop("model_type")
    ids = {
        "vocab_size": max(len(tokenizer), arch.pop("vocab_size", 0)),  # a vocabulary may be padded beyond the tokenizer
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if cfg.task == "seq2seq":
        ids["decoder_start_token_id"] = tokenizer.eos_token_id
        ids["forced_eos_token_id"] = tokenizer.eos_token_id
    folder = cache_dir() / "random-init" / f"{cfg.name}-{_digest(model_type, arch, ids, cfg.training.seed)}"
    if (folder / "config.json").exists():
        return folder
    config = AutoConfig.for_model(model_type, **arch, **ids)
    torch.manual_seed(cfg.training.seed)
    auto = AutoModelForSeq2SeqLM if cfg.task == "seq2seq" else AutoModelForCausalLM
    model = auto.from_config(config)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    _publish(tmp, folder)
    return folder


def _publish(tmp: Path, folder: Path) -> None:
    """Move a finished cache entry into place atomically; a concurrent writer's identical entry wins."""
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def weights_source(cfg: ModelConfig, tokenizer) -> str:
    return str(materialize_random_init(cfg, tokenizer)) if cfg.source == "config" else str(cfg.hub_id)


def quantization_config(cfg: ModelConfig, policy: PrecisionPolicy):
    """bitsandbytes settings: nf4 with double quantization for 4-bit (QLoRA), LLM.int8 for 8-bit."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=policy.torch_dtype(),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def local_device(device: str) -> int | str:
    """Where this process's quantized model goes: under DDP each process's own GPU (its local rank), not GPU 0."""
    if device != "cuda":
        return "cpu"
    from accelerate import PartialState

    return PartialState().local_process_index


@dataclass
class BuiltModel:
    model: Any
    tokenizer: Any
    base_source: str  # the hub id, or the folder of a random-init base
    tag_token_ids: list[int]
    weights_commit: str | None  # the HF cache snapshot the hub weights came from
    tokenizer_commit: str | None
    dtype: str  # what the weights were loaded in ("float32", "bfloat16", ...)
    quantization: dict[str, Any] | None  # the BitsAndBytesConfig of a quantized (QLoRA) base, as a dict
    autocast: str | None  # the mixed-precision autocast dtype it trains and validates under (None: none)


def auto_model_class(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if cfg.task == "seq2seq" else AutoModelForCausalLM


def load_weights(cfg: ModelConfig, source: str | Path, dtype, quantization, device: str, revision: str | None = None,
                 placed: bool = False):  # fmt: skip
    """`from_pretrained` of the config's model class in `dtype`; a quantized model, or any with `placed`, is placed
    on `device` as it loads (never through a copy on the CPU)."""
    kwargs: dict[str, Any] = {"dtype": dtype, **_revision(revision)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if quantization is not None or placed:
        kwargs["device_map"] = {"": local_device(device)}
    return auto_model_class(cfg).from_pretrained(source, **kwargs)


def build_model(cfg: ModelConfig, tokenizer, policy: PrecisionPolicy, for_training: bool = True) -> BuiltModel:
    """Load weights (full fine-tuning in fp32 master weights; LoRA bases in the compute dtype; QLoRA in nf4) at the
    config's `revision`, resize embeddings for the added tokens, and wrap with LoRA when configured."""
    import torch

    source = weights_source(cfg, tokenizer)
    revision = cfg.revision if cfg.source == "hub" else None
    dtype = policy.torch_dtype() if cfg.lora else torch.float32
    quant = quantization_config(cfg, policy)
    model = load_weights(cfg, source, dtype, quant, policy.device, revision)
    new_rows = resize_embeddings(model, tokenizer)
    tag_ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    if for_training:
        init_tags_from_pieces(model, tokenizer, [i for i in tag_ids if i in new_rows])
    align_special_ids(model, tokenizer)
    if cfg.lora is not None and for_training:
        model = _wrap_lora(model, cfg, tag_ids)
    elif cfg.training.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable()
    hub = cfg.source == "hub"
    tokenizer_source = cfg.tokenizer.path or cfg.hub_id or ""
    return BuiltModel(model, tokenizer, source, tag_ids,
                      weights_commit=hub_commit(source, revision) if hub else None,
                      tokenizer_commit=hub_commit(tokenizer_source, cfg.tokenizer_revision, "tokenizer_config.json"),
                      dtype=str(dtype).removeprefix("torch."),
                      quantization=json.loads(quant.to_json_string()) if quant is not None else None,
                      autocast=policy.autocast_dtype)  # fmt: skip


def resize_embeddings(model, tokenizer) -> set[int]:
    """Make room for every token of the tokenizer without ever shrinking: max(current rows, tokenizer length),
    rounded up to a multiple of 64 when it grows. (Polyglot-Ko's 30,080 rows are padding beyond its 30,003-token
    vocabulary; shrinking to the tokenizer would cut rows, and the tags would land on never-trained padding.)
    Returns the ids of the tokens whose rows were never trained: those beyond the tokenizer's base vocabulary."""
    rows = model.get_input_embeddings().weight.shape[0]
    if embedding_rows(rows, tokenizer) != rows:
        model.resize_token_embeddings(embedding_rows(rows, tokenizer))
    return set(range(tokenizer.vocab_size, len(tokenizer)))


def embedding_rows(rows: int, tokenizer) -> int:
    """The embedding rows `resize_embeddings` leaves a model of `rows` rows with for `tokenizer`."""
    return rows if len(tokenizer) <= rows else -(-len(tokenizer) // EMBEDDING_ROWS_MULTIPLE) * EMBEDDING_ROWS_MULTIPLE


def tag_pieces(tokenizer, tag: str) -> list[int]:
    """The ids of the pieces the tokenizer's own model splits `tag` into, as if the tag had never been added."""
    return [t.id for t in tokenizer.backend_tokenizer.model.tokenize(tag)]


def init_tags_from_pieces(model, tokenizer, tag_ids: list[int]) -> None:
    """Start each new tag's row, in the input embedding and in an untied output layer, at the mean of the rows of
    the pieces it used to be split into (transformers starts every new row at the same matrix mean, so the 15
    tags would score alike and `#Person1#`/`#Person2#` be confused)."""
    import torch

    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    with torch.no_grad():
        for tag_id in tag_ids:
            pieces = [i for i in tag_pieces(tokenizer, tokenizer.convert_ids_to_tokens(tag_id)) if i < tokenizer.vocab_size]
            if pieces:
                for weight in matrices:
                    weight[tag_id] = weight[pieces].float().mean(0).to(weight.dtype)


def module_name(model, module) -> str:
    """The attribute name of one of the model's modules (`embed_tokens`, `embed_in`, `lm_head`, ...), as peft's
    per-module options take it: read from the model, so a renamed module (GPT-NeoX's `embed_out`, `lm_head` in
    transformers 5) needs no table."""
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def output_is_tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is None or output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def align_special_ids(model, tokenizer) -> None:
    """The pad id follows the tokenizer; the generation config's EOS ids stay the model's own terminators
    (`generate.stop_token_ids` adds the tokenizer's EOS to them)."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _wrap_lora(model, cfg: ModelConfig, tag_token_ids: list[int]):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    assert cfg.lora is not None
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)  # upcasts what is not quantized to fp32
    elif cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.targets,
        task_type=TaskType.SEQ_2_SEQ_LM if cfg.task == "seq2seq" else TaskType.CAUSAL_LM,
        # The dialogue tags' rows are new (or never trained as tags): train just those rows, in the input embedding
        # and, when the output layer is not tied to it (SOLAR, Polyglot-Ko, KULLM), in the output layer too.
        trainable_token_indices={module_name(model, model.get_input_embeddings()): tag_token_ids,
                                 **({} if output_is_tied(model) else {module_name(model, model.get_output_embeddings()): tag_token_ids})},  # fmt: skip
    )
    return get_peft_model(model, lora)


def quantized_linear_layers(model) -> int:
    """How many of the model's linear layers hold bitsandbytes 4-bit or 8-bit weights. Counted by class, not by
    class name: peft wraps each quantized layer of a LoRA target in a `peft.tuners.lora.bnb.Linear4bit` of the same
    name, which would count every target twice."""
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:  # bitsandbytes cannot load on this machine: nothing can be quantized
        return 0
    return sum(1 for m in model.modules() if isinstance(m, (Linear4bit, Linear8bitLt)))
