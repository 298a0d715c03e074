"""Device detection and the precision policy that preflight checks and training applies.

Rules (one place, used by both):
- `auto`: CUDA with bf16 support → bf16 autocast, no gradient scaling; CUDA without bf16 → fp16 autocast with
  gradient scaling; CPU → fp32.
- `bf16` needs a CUDA device that supports it; `fp16` needs CUDA; `fp32` runs anywhere.
- Gradient scaling goes with fp16 only. bf16 compute with fp16 AMP scaling (the original crash) is rejected.
- 4-bit (QLoRA) compute dtype is the policy's compute dtype.
- Inference runs as validation ran: under the policy's autocast (`autocast_dtype`), applied to a loaded model by
  `run_under_autocast` the way accelerate applies it to the prepared model (saved models record it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

MixedPrecision = Literal["no", "bf16", "fp16"]


class PrecisionError(ValueError):
    """A precision or quantization request that this device cannot honour."""


@dataclass(frozen=True)
class DeviceInfo:
    kind: Literal["cuda", "cpu"]
    name: str
    bf16_supported: bool
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class PrecisionPolicy:
    device: Literal["cuda", "cpu"]
    compute_dtype: Literal["float32", "bfloat16", "float16"]
    mixed_precision: MixedPrecision
    grad_scaling: bool

    def __post_init__(self) -> None:
        validate_policy(self)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.compute_dtype)

    @property
    def autocast_dtype(self) -> str | None:
        """The dtype of the autocast that accelerate runs the model's forward passes under (bf16/fp16 mixed
        precision), in training, validation and so in every later inference; None without mixed precision."""
        return None if self.mixed_precision == "no" else self.compute_dtype

    @property
    def label(self) -> str:
        scaling = "+grad-scaling" if self.grad_scaling else ""
        return f"{self.device}:{self.compute_dtype}{scaling}"


def validate_policy(policy: PrecisionPolicy) -> None:
    if policy.grad_scaling and policy.mixed_precision != "fp16":
        raise PrecisionError(
            f"gradient scaling is only for fp16 autocast; {policy.compute_dtype} compute with fp16 AMP scaling "
            "is the combination that crashed every LLM on step 1 of the original pipeline"
        )
    if policy.mixed_precision == "fp16" and not policy.grad_scaling:
        raise PrecisionError("fp16 autocast needs gradient scaling (fp16 gradients underflow without it)")
    if policy.device == "cpu" and policy.mixed_precision != "no":
        raise PrecisionError("mixed precision on CPU is not supported by the policy; CPU trains in fp32")
    expected = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[policy.mixed_precision]
    if policy.compute_dtype != expected:
        raise PrecisionError(f"compute dtype {policy.compute_dtype} does not match {policy.mixed_precision} autocast")


def run_under_autocast(model, dtype_name: str | None):
    """Make `model` compute as accelerate's prepared model computed validation: `forward` under `torch.autocast` in
    `dtype_name` ("bfloat16", "float16") on the model's device, as accelerate opens it, with its outputs converted to
    fp32 (accelerate's `convert_outputs_to_fp32`, as `Accelerator.prepare_model` wraps it), and `generate` under the
    same autocast (validation generates inside `accelerator.autocast()`; a seq2seq model's encoder runs there, outside
    `forward`). Nothing changes for None. Returns the model."""
    if dtype_name is None:
        return model
    import torch
    from accelerate.utils import convert_outputs_to_fp32

    device_type, dtype = next(model.parameters()).device.type, getattr(torch, dtype_name)
    model.forward = convert_outputs_to_fp32(torch.autocast(device_type, dtype=dtype)(model.forward))
    model.generate = torch.autocast(device_type, dtype=dtype)(model.generate)
    return model


def _no_nvidia_driver() -> bool:
    """True on a Linux machine without the NVIDIA driver, where CUDA cannot work; lets CPU machines skip importing
    torch (seconds). WSL exposes GPUs through /dev/dxg instead, so it is never ruled out here."""
    if sys.platform != "linux" or Path("/dev/dxg").exists():
        return False
    return not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version"))


def detect_device() -> DeviceInfo:
    if not _no_nvidia_driver():
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return DeviceInfo("cuda", torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(), total, free)
    import psutil

    mem = psutil.virtual_memory()
    return DeviceInfo("cpu", "cpu", False, mem.total, mem.available)


def resolve_precision(requested: str, device: DeviceInfo) -> PrecisionPolicy:
    """The policy for a config's `precision` on this device, or PrecisionError saying why not."""
    if requested == "auto":
        if device.kind == "cpu":
            return PrecisionPolicy("cpu", "float32", "no", False)
        if device.bf16_supported:
            return PrecisionPolicy("cuda", "bfloat16", "bf16", False)
        return PrecisionPolicy("cuda", "float16", "fp16", True)
    if requested == "fp32":
        return PrecisionPolicy(device.kind, "float32", "no", False)
    if device.kind != "cuda":
        raise PrecisionError(f"precision '{requested}' needs a CUDA device; this is {device.name} (use auto or fp32)")
    if requested == "bf16":
        if not device.bf16_supported:
            raise PrecisionError(f"{device.name} does not support bf16; use fp16 (with gradient scaling) or auto")
        return PrecisionPolicy("cuda", "bfloat16", "bf16", False)
    if requested == "fp16":
        return PrecisionPolicy("cuda", "float16", "fp16", True)
    raise PrecisionError(f"unknown precision '{requested}'")


def bitsandbytes_version() -> tuple[int, ...] | None:
    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def check_quantization(quantization: str, device: DeviceInfo) -> None:
    """Raise PrecisionError when the installed bitsandbytes cannot quantize on this device."""
    if quantization == "none":
        return
    version = bitsandbytes_version()
    if version is None:
        raise PrecisionError(f"{quantization} quantization needs bitsandbytes, which is not installed")
    minimum = (0, 43, 0) if device.kind == "cuda" else (0, 48, 0)
    if version < minimum:
        shown = ".".join(map(str, version))
        raise PrecisionError(
            f"bitsandbytes {shown} has no {quantization} support on {device.kind}; need >= {'.'.join(map(str, minimum))}"
        )
