"""The saved-model folder: the one on-disk format of a servable dialogsum model. Training writes it for the best
epoch, `optimize` for each variant, `export` for a copy or a merged model; the pyfunc, `predict`, the test scores of
a training and `optimize` load it with `load`, and `describe` says in words what it holds.

    dialogsum_model.json   what the folder holds: `SavedModel` below, written once
    tokenizer/             the tokenizer with the dialogue tags
    weights/               full weights (`save_pretrained`), or an `optimize` variant's (`dialogsum.quantize`)
    adapter/               a LoRA adapter (peft), when the weights are an adapter
    base/                  the adapter's base when it exists nowhere else (a random-init, config-source base)
    members/<i>/           a logit-averaging ensemble: one saved-model folder per member (`write_ensemble`)

An adapter is served the way it was scored: on its base loaded exactly as training loaded it (a QLoRA base in the
same 4-bit nf4 form, from the hub commit the training resolved, or from `base/`), not merged. `export --merge`
writes merged 16-bit weights on request; that folder says it is not the model that was scored.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dialogsum.config import ModelConfig

INFO_FILE = "dialogsum_model.json"
FORMAT_VERSION = 2
BUNDLED_BASE = "base"


class SavedModelError(ValueError):
    """A folder that is not a saved dialogsum model, or one this version cannot load."""


class BaseReference(BaseModel):
    """Where an adapter's base comes from and how training loaded it."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["bundled", "hub"]
    path: str  # `base` inside the folder, or the hub id
    revision: str | None  # the hub commit the training loaded (None: bundled, or a hub file not in the HF cache)
    dtype: str  # the dtype training loaded the base in ("float32", "bfloat16", ...)
    quantization: dict[str, Any] | None  # the BitsAndBytesConfig of a QLoRA base, as a dict


class SavedModel(BaseModel):
    """`dialogsum_model.json`."""

    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT_VERSION
    config: ModelConfig
    weights: Literal["full", "adapter", "ensemble"]
    variant: str | None = None  # an `optimize` variant (int8, fp16, bnb-nf4, ...); None: as trained
    base: BaseReference | None = None
    revisions: dict[str, str | None] = {}  # {"weights": commit, "tokenizer": commit} resolved from the HF cache
    scored: bool = True  # False for a merged export: not the model whose scores were logged
    note: str = ""
    members: int = 0  # an ensemble's member folders, members/0 … members/<n-1>


def read(folder: str | Path) -> SavedModel:
    """The folder's `dialogsum_model.json`; SavedModelError names the file and what is wrong."""
    path = Path(folder) / INFO_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SavedModelError(f"{path}: not a saved dialogsum model ({type(e).__name__}: {e})") from e
    if raw.get("format") != FORMAT_VERSION:
        raise SavedModelError(f"{path}: format {raw.get('format', 1)}, this dialogsum reads format {FORMAT_VERSION}; "
                              "retrain the model or export it again with this version")  # fmt: skip
    try:
        return SavedModel.model_validate(raw)
    except ValidationError as e:
        raise SavedModelError(f"{path}: {e}") from e


def _write_info(folder: Path, info: SavedModel) -> Path:
    (folder / INFO_FILE).write_text(info.model_dump_json(indent=2), encoding="utf-8")
    return folder


def write_trained(folder: Path, built, cfg: ModelConfig, model) -> Path:
    """A trained model (`model`: the unwrapped model, a peft model for LoRA/QLoRA) as `built` loaded it: full weights,
    or the adapter with a reference to its base (bundled when it is a random-init base). The config is recorded with
    `revision` pinned to the commit that was loaded, so every later load of this folder uses that commit."""
    folder.mkdir(parents=True, exist_ok=True)
    built.tokenizer.save_pretrained(folder / "tokenizer")
    revisions = {"weights": built.weights_commit, "tokenizer": built.tokenizer_commit}
    pinned = cfg.model_copy(update={"revision": built.weights_commit or cfg.revision})
    if cfg.lora is None:
        model.save_pretrained(folder / "weights")
        return _write_info(folder, SavedModel(config=pinned, weights="full", revisions=revisions))
    model.save_pretrained(folder / "adapter")
    if cfg.source == "config":
        shutil.copytree(built.base_source, folder / BUNDLED_BASE, dirs_exist_ok=True)
        base = BaseReference(source="bundled", path=BUNDLED_BASE, revision=None, dtype=built.dtype, quantization=built.quantization)
    else:
        base = BaseReference(source="hub", path=built.base_source, revision=built.weights_commit, dtype=built.dtype,
                             quantization=built.quantization)  # fmt: skip
    return _write_info(folder, SavedModel(config=pinned, weights="adapter", base=base, revisions=revisions))


def write_variant(folder: Path, model, tokenizer, source: SavedModel, name: str) -> Path:
    """An `optimize` variant of the model saved in `source`: its own weights (adapters merged), the source's config
    and revisions, and the variant's name so `load` rebuilds the same variant."""
    from dialogsum.quantize import BASELINE, save_int8

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    if name == "int8":
        save_int8(model, folder / "weights")
    else:
        model.save_pretrained(folder / "weights")
    merged = source.config.model_copy(update={"lora": None, "quantization": "none"})
    return _write_info(folder, SavedModel(config=merged, weights="full", variant=None if name == BASELINE else name,
                                          revisions=source.revisions))  # fmt: skip


def write_merged(source_folder: Path, folder: Path, dtype_name: str = "bfloat16") -> SavedModel:
    """Merged 16-bit weights of an adapter model (`export --merge`): one set of weights that needs no peft and no
    quantization, marked as not the scored model (the scores were computed on the adapter over its base as trained)."""
    import torch

    source = read(source_folder)
    if source.weights != "adapter":
        raise SavedModelError(f"{source_folder}: full weights, nothing to merge (export it without --merge)")
    model, tokenizer, _ = load(source_folder, device="cpu", dtype=getattr(torch, dtype_name), merge=True)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    model.save_pretrained(folder / "weights")
    merged = source.config.model_copy(update={"lora": None, "quantization": "none"})
    base = source.base
    assert base is not None
    note = (f"LoRA merged into a {dtype_name} copy of its base ({_base_words(base)}); the scored model was the adapter over "
            f"the base {'in 4-bit nf4' if base.quantization else 'in ' + base.dtype}, so this model's outputs may differ")  # fmt: skip
    info = SavedModel(config=merged, weights="full", revisions=source.revisions, scored=False, note=note)
    _write_info(folder, info)
    return info


def write_ensemble(folder: Path, member_folders: list[Path]) -> Path:
    """A logit-averaging ensemble: each member's saved-model folder copied under `members/<i>`; the config is the
    first member's (the members share its tokenizer, task and prompt)."""
    for i, member in enumerate(member_folders):
        shutil.copytree(member, folder / "members" / str(i), dirs_exist_ok=True)
    first = read(member_folders[0])
    note = f"logit average of {len(member_folders)} models that share a tokenizer"
    return _write_info(folder, SavedModel(config=first.config, weights="ensemble", revisions=first.revisions, members=len(member_folders), note=note))


def load_members(folder: str | Path, device: str | None = None) -> list[tuple]:
    """(model, tokenizer, ModelConfig) of every member of an ensemble folder, each loaded as `load` loads it."""
    info = read(folder)
    if info.weights != "ensemble":
        raise SavedModelError(f"{folder}: not an ensemble")
    return [load(Path(folder) / "members" / str(i), device) for i in range(info.members)]


def copy_to(source_folder: Path, folder: Path) -> SavedModel:
    """The saved model as it was scored, copied (a bundled base with it)."""
    info = read(source_folder)
    shutil.copytree(source_folder, folder, dirs_exist_ok=True)
    return info


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _serving_dtype(device: str, trained: str | None = None):
    """On CUDA the dtype the model was trained in (else bf16/fp16); on the CPU fp32, its only fast dtype."""
    import torch

    if device == "cpu":
        return torch.float32
    if trained:
        return getattr(torch, trained)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load(folder: str | Path, device: str | None = None, dtype=None, merge: bool = False):
    """(model, tokenizer, ModelConfig) from a saved-model folder, in eval mode, ready to generate.

    Full weights load straight into `dtype` (default: fp32 on the CPU, the compute dtype on CUDA) on `device`; an
    `optimize` variant is rebuilt by `dialogsum.quantize` on the device it runs on; an adapter is attached to its
    base loaded as training loaded it (see `_adapter_model`), or with `merge` merged into an unquantized base in
    `dtype` (what `optimize` and `export --merge` start from)."""
    from transformers import AutoTokenizer

    from dialogsum.models import align_special_ids, auto_model_class
    from dialogsum.quantize import load_quantized

    folder = Path(folder)
    info = read(folder)
    if info.weights == "ensemble":
        raise SavedModelError(f"{folder}: an ensemble of {info.members} models; load its members with `load_members`")
    cfg = info.config
    device = device or default_device()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    if info.variant:
        model = load_quantized(folder / "weights", info.variant, auto_model_class(cfg), device)
    elif info.weights == "adapter":
        model = _adapter_model(folder, info, tokenizer, device, dtype, merge)
    else:
        placed = {"device_map": {"": device}} if device != "cpu" else {}  # on the GPU as they load, never via the CPU
        model = auto_model_class(cfg).from_pretrained(folder / "weights", dtype=dtype or _serving_dtype(device), **placed)
    align_special_ids(model, tokenizer)
    model.eval()
    return model, tokenizer, cfg


def _adapter_model(folder: Path, info: SavedModel, tokenizer, device: str, dtype, merge: bool):
    """The adapter over its base: from the bundled copy or the hub at the pinned commit, resized for the dialogue
    tags like at training; unmerged on the base as training loaded it (the same 4-bit nf4 quantization, with what is
    not quantized upcast to fp32 as `prepare_model_for_kbit_training` did), or merged into an unquantized base."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from dialogsum.models import load_weights, resize_embeddings

    base = info.base
    assert base is not None
    path = folder / base.path if base.source == "bundled" else base.path
    quantization = None
    if base.quantization and not merge:
        settings = dict(base.quantization)
        if device == "cpu" and settings.get("bnb_4bit_compute_dtype"):
            settings["bnb_4bit_compute_dtype"] = "float32"
        quantization = BitsAndBytesConfig.from_dict(settings)
    load_dtype = dtype or _serving_dtype(device, base.dtype)
    model = load_weights(info.config, path, load_dtype, quantization, device, base.revision)
    resize_embeddings(model, tokenizer)
    if quantization is not None:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated.*")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif device != "cpu":
        model.to(device)
    model = PeftModel.from_pretrained(model, folder / "adapter")
    return model.merge_and_unload() if merge else model


def _base_words(base: BaseReference) -> str:
    return "bundled in the folder (random init)" if base.source == "bundled" else f"{base.path}@{(base.revision or 'unpinned')[:12]}"


def describe(folder: str | Path) -> dict[str, Any]:
    """What the folder holds, in words and the key facts, for people (`dialogsum export`) and the logged model's
    metadata."""
    info = read(folder)
    cfg = info.config
    if info.weights == "ensemble":
        weights = f"logit average of {info.members} models (members/0 … members/{info.members - 1})"
    elif info.variant:
        weights = f"`{info.variant}` variant of the trained weights (dialogsum optimize)"
    elif info.weights == "adapter":
        base = info.base
        assert base is not None
        form = "4-bit nf4" if base.quantization else base.dtype
        weights = f"LoRA adapter, served unmerged on its {form} base, {_base_words(base)}"
    else:
        weights = "full weights"
    return {
        "model": cfg.name,
        "task": cfg.task,
        "weights": weights,
        "revisions": {k: v for k, v in info.revisions.items() if v},
        "scored": info.scored,
        "summary": f"{cfg.name} ({cfg.task}): {weights}; " + ("the model that was scored" if info.scored else info.note),
    }
