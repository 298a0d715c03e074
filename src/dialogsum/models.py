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
MODEL_CONFIG_FILE = "dialogsum_model.json"


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
    """The config's tokenizer with the dialogue tags added as single (non-special, so never stripped) tokens."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer.path or cfg.hub_id
    if source:
        tokenizer = AutoTokenizer.from_pretrained(source)
    elif train_texts:
        tokenizer = train_tokenizer(train_texts, cfg)
    else:
        raise ValueError(f"model '{cfg.name}' has no tokenizer path and no training texts to train one from")
    add_dialogue_tokens(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_dialogue_tokens(tokenizer) -> int:
    """Add `#Person1#`… and the masked-entity tags as whole tokens; returns how many were new."""
    from tokenizers import AddedToken

    return tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in SPECIAL_TOKENS])


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
    base_source: str
    tag_token_ids: list[int]


def build_model(cfg: ModelConfig, tokenizer, policy: PrecisionPolicy, for_training: bool = True) -> BuiltModel:
    """Load weights (full fine-tuning in fp32 master weights; LoRA bases in the compute dtype; QLoRA in nf4),
    resize embeddings for the added tokens, and wrap with LoRA when configured."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    source = weights_source(cfg, tokenizer)
    auto = AutoModelForSeq2SeqLM if cfg.task == "seq2seq" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": policy.torch_dtype() if cfg.lora else torch.float32}
    quant = quantization_config(cfg, policy)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": local_device(policy.device)}
    model = auto.from_pretrained(source, **kwargs)
    new_rows = resize_embeddings(model, tokenizer)
    tag_ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    if for_training:
        init_tags_from_pieces(model, tokenizer, [i for i in tag_ids if i in new_rows])
    _align_special_ids(model, tokenizer)
    if cfg.lora is not None and for_training:
        model = _wrap_lora(model, cfg, tag_ids)
    elif cfg.training.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable()
    return BuiltModel(model, tokenizer, source, tag_ids)


def resize_embeddings(model, tokenizer) -> set[int]:
    """Make room for every token of the tokenizer without ever shrinking: max(current rows, tokenizer length),
    rounded up to a multiple of 64 when it grows. (Polyglot-Ko's 30,080 rows are padding beyond its 30,003-token
    vocabulary; shrinking to the tokenizer would cut rows, and the tags would land on never-trained padding.)
    Returns the ids of the tokens whose rows were never trained: those beyond the tokenizer's base vocabulary."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        multiple = EMBEDDING_ROWS_MULTIPLE
        model.resize_token_embeddings(-(-len(tokenizer) // multiple) * multiple)
    return set(range(tokenizer.vocab_size, len(tokenizer)))


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


def _align_special_ids(model, tokenizer) -> None:
    """The pad id follows the tokenizer; the generation config's EOS ids stay the model's own terminators
    (`generate.stop_token_ids` adds the tokenizer's EOS to them)."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _wrap_lora(model, cfg: ModelConfig, tag_token_ids: list[int]):
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    assert cfg.lora is not None
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
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


def save_for_inference(built: BuiltModel, cfg: ModelConfig, folder: Path, unwrapped_model) -> Path:
    """Write everything needed to rebuild the model: weights (or LoRA adapter plus, for a random-init base,
    the base itself), tokenizer, and the resolved model config."""
    folder.mkdir(parents=True, exist_ok=True)
    built.tokenizer.save_pretrained(folder / "tokenizer")
    info = {"config": cfg.model_dump(), "adapter": cfg.lora is not None, "base": None}
    if cfg.lora is not None:
        unwrapped_model.save_pretrained(folder / "adapter")
        if cfg.source == "config":
            shutil.copytree(built.base_source, folder / "base", dirs_exist_ok=True)
            info["base"] = "base"
        else:
            info["base"] = built.base_source
    else:
        unwrapped_model.save_pretrained(folder / "weights")
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    return folder


def saved_quantization(folder: str | Path) -> str | None:
    """The `quantization` a `save_for_inference` folder records (written by `dialogsum optimize`); None for a model
    saved as trained."""
    return json.loads((Path(folder) / MODEL_CONFIG_FILE).read_text(encoding="utf-8")).get("quantization")


def load_for_inference(folder: str | Path, device: str | None = None, dtype=None):
    """Rebuild (model, tokenizer, ModelConfig) from `save_for_inference` output, ready to generate.

    Weights load straight into `dtype` (default: fp32 on CPU, the compute dtype on CUDA) on `device`; LoRA
    adapters are merged into their base. A folder whose json names a `quantization` (written by
    `dialogsum optimize`) is rebuilt by `dialogsum.quantize`, on the device that variant runs on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = Path(folder)
    info = json.loads((folder / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
    cfg = ModelConfig.model_validate(info["config"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float32 if device == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16))
    placed = {"device_map": {"": device}} if device != "cpu" else {}  # on the GPU as they load, never via the CPU
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    auto = AutoModelForSeq2SeqLM if cfg.task == "seq2seq" else AutoModelForCausalLM
    quantization = info.get("quantization")
    if quantization:
        from dialogsum.quantize import load_quantized

        model = load_quantized(folder / "weights", quantization, auto, device)
    elif info["adapter"]:
        from peft import PeftModel

        base_path = folder / info["base"] if info["base"] == "base" else info["base"]
        base = auto.from_pretrained(base_path, dtype=dtype, **placed)
        resize_embeddings(base, tokenizer)
        model = PeftModel.from_pretrained(base, folder / "adapter").merge_and_unload()
    else:
        model = auto.from_pretrained(folder / "weights", dtype=dtype, **placed)
    _align_special_ids(model, tokenizer)
    if not quantization:
        model.to(device)
    model.eval()
    return model, tokenizer, cfg
