"""The saved-model folder: the one on-disk format of a servable dialogsum model. Training writes it for the best
epoch, `optimize` for each variant, `export` for a copy or a merged model; the pyfunc, `predict`, the test scores of
a training and `optimize` load it with `load`, and `describe` says in words what it holds.

    dialogsum_model.json   what the folder holds: `SavedModel` below, written once
    tokenizer/             the tokenizer with the dialogue tags
    weights/               full weights (`save_pretrained`), or an `optimize` variant's (`dialogsum.quantize`)
    adapter/               a LoRA adapter (peft), when the weights are an adapter
    base/                  the adapter's base when it exists nowhere else (a random-init, config-source base)
    members/<i>/           a logit-averaging ensemble: one saved-model folder per member (`write_ensemble`)

Every load runs the model in the numerics its validation ran in (`Numerics`, recorded at training): full KoBART
in fp32 master weights under the training's bf16 autocast, never cast to pure bf16, so validation, the test scores,
`predict`, serving and `optimize`'s baseline compute alike. An adapter is served the way it was scored: on its base
loaded exactly as training loaded it (a QLoRA base in the same 4-bit nf4 form, from the hub commit the training
resolved, or from `base/`), not merged. `export --merge` writes merged 16-bit weights on request; that folder says it
is not the model that was scored.
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
FORMAT_VERSION = 3
BUNDLED_BASE = "base"


class SavedModelError(ValueError):
    """A folder that is not a saved dialogsum model, or one this version cannot load."""


class BaseReference(BaseModel):
    """Where an adapter's base comes from and how training loaded it."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["bundled", "hub"]
    path: str  # `base` inside the folder, or the hub id
    revision: str | None  # the hub commit the training loaded (None: bundled, or a hub file not in the HF cache)
    quantization: dict[str, Any] | None  # the BitsAndBytesConfig of a QLoRA base (nf4, its compute dtype), as a dict


class Numerics(BaseModel):
    """How the model computes, the same in validation, the test scores, `predict`, serving and `optimize`'s
    baseline: its weights (a LoRA model's base) loaded in `dtype` ("float32" for full fine-tuning, which keeps fp32
    master weights; the compute dtype for a LoRA base; for QLoRA the dtype around the nf4 layers of
    `BaseReference.quantization`), every forward and `generate` call under `autocast` (the training's mixed
    precision, "bfloat16" or "float16"; None: none)."""

    model_config = ConfigDict(extra="forbid")

    dtype: str
    autocast: str | None


class SavedModel(BaseModel):
    """`dialogsum_model.json`."""

    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT_VERSION
    config: ModelConfig
    weights: Literal["full", "adapter", "ensemble"]
    variant: str | None = None  # an `optimize` variant (int8, fp16, bnb-nf4, ...); None: as trained
    base: BaseReference | None = None
    numerics: Numerics | None  # None only for an ensemble, whose members record their own
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
    numerics = Numerics(dtype=built.dtype, autocast=built.autocast)
    if cfg.lora is None:
        model.save_pretrained(folder / "weights")
        return _write_info(folder, SavedModel(config=pinned, weights="full", numerics=numerics, revisions=revisions))
    model.save_pretrained(folder / "adapter")
    if cfg.source == "config":
        shutil.copytree(built.base_source, folder / BUNDLED_BASE, dirs_exist_ok=True)
        base = BaseReference(source="bundled", path=BUNDLED_BASE, revision=None, quantization=built.quantization)
    else:
        base = BaseReference(source="hub", path=built.base_source, revision=built.weights_commit, quantization=built.quantization)
    return _write_info(folder, SavedModel(config=pinned, weights="adapter", base=base, numerics=numerics, revisions=revisions))


def write_variant(folder: Path, model, tokenizer, source: SavedModel, name: str) -> Path:
    """An `optimize` variant of the model saved in `source`: its own weights (adapters merged) in the dtype they were
    measured in, without autocast, the source's config and revisions, and the variant's name so `load` rebuilds the
    same variant."""
    from dialogsum.quantize import save_int8

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    if name == "int8":
        save_int8(model, folder / "weights")
    else:
        model.save_pretrained(folder / "weights")
    merged = source.config.model_copy(update={"lora": None, "quantization": "none"})
    numerics = Numerics(dtype=str(model.dtype).removeprefix("torch."), autocast=None)
    return _write_info(folder, SavedModel(config=merged, weights="full", variant=name, numerics=numerics, revisions=source.revisions))


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
    assert base is not None and source.numerics is not None
    note = (f"LoRA merged into a {dtype_name} copy of its base ({_base_words(base)}); the scored model was the adapter over "
            f"the base {'in 4-bit nf4' if base.quantization else 'in ' + source.numerics.dtype}, so this model's outputs may differ")  # fmt: skip
    info = SavedModel(config=merged, weights="full", numerics=Numerics(dtype=dtype_name, autocast=None), revisions=source.revisions,
                      scored=False, note=note)  # fmt: skip
    _write_info(folder, info)
    return info


def write_ensemble(folder: Path, member_folders: list[Path]) -> Path:
    """A logit-averaging ensemble: each member's saved-model folder copied under `members/<i>`; the config is the
    first member's (the members share its tokenizer, task and prompt)."""
    for i, member in enumerate(member_folders):
        shutil.copytree(member, folder / "members" / str(i), dirs_exist_ok=True)
    first = read(member_folders[0])
    note = f"logit average of {len(member_folders)} models that share a tokenizer"
    return _write_info(folder, SavedModel(config=first.config, weights="ensemble", numerics=None, revisions=first.revisions,
                                          members=len(member_folders), note=note))  # fmt: skip


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


def load(folder: str | Path, device: str | None = None, dtype=None, merge: bool = False):
    """(model, tokenizer, ModelConfig) from a saved-model folder, in eval mode, ready to generate, placed on `device`
    as it loads (never through a copy on the CPU).

    By default it computes as it was scored, on any device: weights in the recorded `Numerics.dtype`, under the
    recorded autocast (`precision.run_under_autocast`); an `optimize` variant is rebuilt by `dialogsum.quantize`; an
    adapter is attached to its base loaded as training loaded it (see `_adapter_model`). With `dtype`, full weights
    or the base load in that dtype without autocast, and with `merge` the adapter is merged into an unquantized base:
    other forms of the model (what `optimize`'s fp16/bf16 variants and `export --merge` are made from)."""
    import torch
    from transformers import AutoTokenizer

    from dialogsum.models import align_special_ids, auto_model_class, load_weights
    from dialogsum.precision import run_under_autocast
    from dialogsum.quantize import QUANTIZED_VARIANTS, load_quantized

    folder = Path(folder)
    info = read(folder)
    if info.weights == "ensemble":
        raise SavedModelError(f"{folder}: an ensemble of {info.members} models; load its members with `load_members`")
    assert info.numerics is not None
    cfg = info.config
    device = device or default_device()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    load_dtype = dtype or getattr(torch, info.numerics.dtype)
    if info.variant in QUANTIZED_VARIANTS:
        model = load_quantized(folder / "weights", info.variant, auto_model_class(cfg), device)
    elif info.weights == "adapter":
        model = _adapter_model(folder, info, tokenizer, device, load_dtype, merge)
    else:
        model = load_weights(cfg, folder / "weights", load_dtype, None, device, placed=True)
    align_special_ids(model, tokenizer)
    model.eval()
    return run_under_autocast(model, info.numerics.autocast if dtype is None else None), tokenizer, cfg


def _adapter_model(folder: Path, info: SavedModel, tokenizer, device: str, dtype, merge: bool):
    """The adapter over its base: from the bundled copy or the hub at the pinned commit, in `dtype`, resized for the
    dialogue tags like at training; unmerged on the base as training loaded it (the same 4-bit nf4 quantization and
    compute dtype, with what is not quantized upcast to fp32 as `prepare_model_for_kbit_training` did), or merged
    into an unquantized base."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from dialogsum.models import load_weights, resize_embeddings

    base = info.base
    assert base is not None
    path = folder / base.path if base.source == "bundled" else base.path
    quantization = BitsAndBytesConfig.from_dict(dict(base.quantization)) if base.quantization and not merge else None
    model = load_weights(info.config, path, dtype, quantization, device, base.revision, placed=True)
    resize_embeddings(model, tokenizer)
    if quantization is not None:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated.*")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, folder / "adapter")
    return model.merge_and_unload() if merge else model


def merged_config(folder: str | Path):
    """The transformers config of the model as one set of merged weights, read without the weights: the saved
    config of full weights, or an adapter's base config (at the pinned commit) with the embedding rows training
    resized it to for the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from dialogsum.models import embedding_rows

    folder = Path(folder)
    info = read(folder)
    if info.weights == "ensemble":
        raise SavedModelError(f"{folder}: an ensemble of {info.members} models; each member has its own config")
    if info.weights == "full":
        return AutoConfig.from_pretrained(folder / "weights")
    base = info.base
    assert base is not None
    path = folder / base.path if base.source == "bundled" else base.path
    config = AutoConfig.from_pretrained(path, **({"revision": base.revision} if base.revision else {}))
    config.vocab_size = embedding_rows(config.vocab_size, AutoTokenizer.from_pretrained(folder / "tokenizer"))
    return config


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
        form = "4-bit nf4" if base.quantization else info.numerics.dtype
        weights = f"LoRA adapter, served unmerged on its {form} base, {_base_words(base)}"
    else:
        weights = "full weights"
    if info.numerics is not None:
        weights += f", computing in {info.numerics.dtype}" + (f" under {info.numerics.autocast} autocast" if info.numerics.autocast else "")
    return {
        "model": cfg.name,
        "task": cfg.task,
        "weights": weights,
        "numerics": info.numerics.model_dump() if info.numerics else None,
        "revisions": {k: v for k, v in info.revisions.items() if v},
        "scored": info.scored,
        "summary": f"{cfg.name} ({cfg.task}): {weights}; " + ("the model that was scored" if info.scored else info.note),
    }
