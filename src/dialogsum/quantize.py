"""Inference variants of a trained model: what each one is, how to make it, and how its weights are written and
rebuilt (the saved-model folder around them is `dialogsum.serving.saved_model`'s).

- `scored`: the baseline, the model as it was scored, loaded as serving loads it (its recorded numerics: full
  KoBART in fp32 under the training's autocast; a QLoRA model as its nf4 base with the adapter, unmerged).
- `int8` (CPU): dynamic INT8 quantization of every `nn.Linear` (int8 weights with per-output-channel scales,
  activations quantized per batch) with PyTorch's fbgemm/x86 kernels via
  `torch.ao.quantization.quantize_dynamic`. The README section
  "Inference optimisation" explains why this path and not torchao or ONNX Runtime. It is saved as a real
  int8 state dict (`int8_dynamic.pt`) and rebuilt at load time: architecture from `config.json`,
  the same quantization applied, then the int8 state loaded into it.
- `fp16`, `bf16` (CUDA): the weights (adapters merged) loaded straight into half precision on the GPU.
- `bnb-int8`, `bnb-nf4`: bitsandbytes LLM.int8 and 4-bit NF4 weights, saved in bitsandbytes' serialized form; on
  CUDA, and on CPU through bitsandbytes' CPU backend (see `bitsandbytes_settings`).

Module-level imports are standard library only, so GPU scripts without MLflow or pydantic can import it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INT8_STATE_FILE = "int8_dynamic.pt"
BASELINE = "scored"
FP32 = "fp32"  # no variant: the size of fp32 weights is computed (4 bytes a parameter), never written
NO_QUANTIZATION = "none"
AUTO = "auto"
AUTO_VARIANTS = {"cpu": ("int8",), "cuda": ("fp16", "bf16")}  # what `auto` measures on each device
QUANTIZED_VARIANTS = ("int8", "bnb-int8", "bnb-nf4")  # rebuilt by `load_quantized`; fp16/bf16 are plain weights


class VariantError(ValueError):
    """A variant that does not exist or cannot run on this device."""


@dataclass(frozen=True)
class Variant:
    name: str
    device: str | None  # the only device it runs on; None: any
    description: str

    @property
    def metric_prefix(self) -> str:
        return self.name.replace("-", "_")


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(BASELINE, None, "the model as it was scored (its recorded dtype and autocast; a QLoRA model: nf4 base + adapter)"),
        Variant("int8", "cpu", "dynamic INT8 nn.Linear (torch.ao quantize_dynamic, fbgemm/x86 kernels)"),
        Variant("fp16", "cuda", "float16 weights and compute"),
        Variant("bf16", "cuda", "bfloat16 weights and compute"),
        Variant("bnb-int8", None, "bitsandbytes LLM.int8 weights (fp16 elsewhere on CUDA, fp32 on CPU)"),
        Variant("bnb-nf4", None, "bitsandbytes 4-bit NF4 weights (bf16/fp16 compute on CUDA, fp32 on CPU)"),
    )
}


def resolve_variants(quantization: str | list[str] | tuple[str, ...], device: str) -> list[str]:
    """The variants to measure: always the baseline (the model as it was scored) first, then each requested one
    (`none`: baseline only; `auto`: this device's `AUTO_VARIANTS`). Raises VariantError for an unknown name, for
    `fp32` (no variant: the size of fp32 weights is computed), or for one that cannot run on `device`."""
    requested = quantization.split(",") if isinstance(quantization, str) else list(quantization)
    names = [BASELINE]
    for raw in requested:
        name = raw.strip().lower()
        if name in ("", NO_QUANTIZATION, BASELINE):
            continue
        if name == FP32:
            raise VariantError(f"'{FP32}' is not measured: the baseline is the model as it was scored ('{BASELINE}'), and the size of "
                               "fp32 weights is computed from the parameter count")  # fmt: skip
        if name == AUTO:
            names += [n for n in AUTO_VARIANTS[device] if n not in names]
            continue
        if name not in VARIANTS:
            raise VariantError(f"unknown quantization '{raw}' (choose from: {AUTO}, {NO_QUANTIZATION}, {', '.join(VARIANTS)})")
        variant = VARIANTS[name]
        if variant.device is not None and variant.device != device:
            usable = [v.name for v in VARIANTS.values() if v.device in (None, device) and v.name != BASELINE]
            raise VariantError(f"quantization '{name}' runs on {variant.device}, this sweep runs on {device} (usable here: {', '.join(usable)})")
        if name not in names:
            names.append(name)
    return names


def quantize_int8_dynamic(model):
    """Replace every nn.Linear with a dynamically quantized INT8 one (per-output-channel weight scales), in place.

    A model whose input embedding is tied to its output layer (BART, small Llamas) keeps that tie in spirit:
    the input embedding becomes the output layer's int8 rows, dequantized, so the model is stored once, as int8,
    and the measured model is exactly the one that is saved and loaded back."""
    import torch

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:
        raise VariantError("this PyTorch has no torch.ao.quantization.quantize_dynamic; int8 is unavailable") from e
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    # Deprecated in favour of torchao, whose INT8 path is slower than fp32 on CPU without torch.compile
    # (see the README, "Inference optimisation"); the warning is known and would repeat on every load.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*are deprecated.*")
        quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    if tied:
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(_int8_output_rows(model))
    return model


def _int8_output_rows(model):
    return model.get_output_embeddings().weight().dequantize()


def _embedding_keys(model, state: dict) -> list[str]:
    """State keys that hold the input embedding (several when encoder and decoder share it)."""
    pointer = model.get_input_embeddings().weight.data_ptr()
    return [k for k, v in state.items() if hasattr(v, "data_ptr") and v.data_ptr() == pointer]


def bitsandbytes_settings(name: str, device: str):
    """(BitsAndBytesConfig, dtype of everything it leaves unquantized) for variant `name` on `device`.

    CUDA: LLM.int8 kernels take fp16 inputs, so an 8-bit model runs in fp16; NF4 computes in bf16 where the GPU
    has it (else fp16), and the rest of the model is in that dtype too, so no layer casts its input on every
    call. CPU (bitsandbytes' CPU backend): fp32 around the quantized layers and as NF4's compute dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    on_cuda = device == "cuda"
    if name == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True), torch.float16 if on_cuda else torch.float32
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_cuda else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype), dtype


def _skip_int8_input_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def load_bitsandbytes(auto, folder: Path, name: str, device: str, *, quantize: bool):
    """A bitsandbytes variant from a `save_pretrained` folder on `device`: quantized while loading (`quantize`),
    or already saved quantized (its config.json holds the quantization config)."""
    config, dtype = bitsandbytes_settings(name, device)
    if name == "bnb-int8" and device != "cuda":
        # fp32 inputs are cast to fp16 inside every 8-bit layer on CPU; bitsandbytes logs that on every call.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_skip_int8_input_cast_notice)
    extra = {"quantization_config": config} if quantize else {}
    device_map = {"": 0 if device == "cuda" else "cpu"}
    return auto.from_pretrained(folder, dtype=dtype, device_map=device_map, **extra).eval()


def prepare_variant(model, name: str, device: str, staging: Path):
    """The variant `name` of an fp32 model in memory on the CPU (which it may convert in place), on `device`: the GPU
    benchmark's way, from one random-init model (`optimize` loads each variant from the saved folder instead).

    bitsandbytes variants are re-read from `staging` through `from_pretrained`, their supported entry point."""
    import torch

    if name in ("fp16", "bf16"):
        return model.to(device=device, dtype=torch.float16 if name == "fp16" else torch.bfloat16)
    if name == "int8":
        return quantize_int8_dynamic(model)
    if name.startswith("bnb-"):
        model.save_pretrained(staging)
        return load_bitsandbytes(type(model), staging, name, device, quantize=True)
    raise VariantError(f"unknown variant '{name}'")


def save_int8(model, folder: Path) -> None:
    """Write an `int8` variant's config, generation config and int8 state into `folder` (without the input embedding
    when it is the output layer's int8 rows, see `quantize_int8_dynamic`); `load_quantized` reads it back."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    state = model.state_dict()
    if torch.equal(model.get_input_embeddings().weight, _int8_output_rows(model)):
        for key in _embedding_keys(model, state):
            del state[key]
    torch.save(state, folder / INT8_STATE_FILE)


def load_quantized(weights: Path, name: str, auto, device: str) -> Any:
    """Rebuild a saved quantized variant from its `weights` folder, in eval mode: `int8` on the CPU, bitsandbytes
    variants on `device` (fp16/bf16 variants are plain weights in their dtype, loaded as such)."""
    import torch

    if name == "int8":
        from transformers import AutoConfig, GenerationConfig
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = auto.from_config(AutoConfig.from_pretrained(weights))
        model.tie_weights()  # skipped under no_init_weights; the int8 state stores tied weights once
        model.generation_config = GenerationConfig.from_pretrained(weights)
        quantize_int8_dynamic(model.eval())
        with warnings.catch_warnings():  # torch's own quantized-tensor unpickling uses the deprecated TypedStorage
            warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
            state = torch.load(weights / INT8_STATE_FILE, weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - set(_embedding_keys(model, model.state_dict())):
            raise VariantError(f"{weights / INT8_STATE_FILE} does not fit its config.json (missing {missing}, unexpected {unexpected})")
        if missing:
            with torch.no_grad():
                model.get_input_embeddings().weight.copy_(_int8_output_rows(model))
        return model
    if name.startswith("bnb-"):
        return load_bitsandbytes(auto, weights, name, device, quantize=False)
    raise VariantError(f"{weights.parent}: unknown variant '{name}'")


def folder_bytes(path: Path) -> int:
    """Bytes on disk of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
