"""Which GPUs each stage of a pipeline round holds on one machine, and when (`executor: local` on a GPU machine).

- **Size.** A request asks for `gpus` GPUs (a model's `resources.gpus`) or, unset, for as many as its memory
  estimate (preflight's) needs: the fewest n for which n GPUs each have its n-th share within `GPU_HEADROOM` of
  their free memory, starting from the Ray executor's count, ceil(estimate / (0.9 × per-GPU memory)), with the
  roomiest GPU's free memory (`gpus_for_estimate`). Without an estimate it asks for one GPU; `gpus=0`, for none.
- **Hold.** A running stage holds its GPUs alone; when it ends they go back to the pool.
- **Queue.** Requests wait in order; each starts as soon as enough idle GPUs have room for its share (a smaller
  request may start before a bigger one that still waits) and, with `max_concurrency`, while fewer than that many
  counted requests run. Among the idle GPUs with room, it takes those with the least free memory, so the roomier
  ones stay for bigger requests.
- **Never.** A request that no set of the GPUs could hold even when all are idle raises `Unschedulable`, naming it
  and the GPUs, as the Ray executor refuses what no node has.

`GpuQueue` is that queue: the local executor runs it with processes, `plan_placement` on a simulated clock, so a
plan printed for a node is the placement the executor makes there. `probe_gpus` is the one place that asks the
hardware; `usable_gpus` applies a pipeline's `gpus:` list. GPU indices are NVML's, as nvidia-smi numbers them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable
from dataclasses import dataclass

from dialogsum.config import ConfigError

GPU_HEADROOM = 0.9  # a stage's share of its memory estimate must fit in this share of each of its GPUs' memory
GIB = 1024**3


@dataclass(frozen=True)
class GpuDevice:
    """One GPU: its index (as nvidia-smi numbers it), its memory and how much of it was free when it was probed."""

    index: int
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class GpuRequest:
    """What a stage asks for: `gpus` GPUs, or (None) as many as `estimate_bytes` of memory needs (one GPU when
    that is unknown too). `gpus=0`: no GPU at all."""

    name: str
    gpus: int | None
    estimate_bytes: float | None

    def __post_init__(self) -> None:
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"{self.name}: gpus must be 0 or more, not {self.gpus}")
        if self.estimate_bytes is not None and self.estimate_bytes < 0:
            raise ValueError(f"{self.name}: estimate_bytes must be 0 or more, not {self.estimate_bytes}")


@dataclass(frozen=True)
class Placement:
    """Where a request ran in a plan: the GPUs it held, from `start` to `end` on the plan's clock."""

    name: str
    gpus: tuple[int, ...]
    start: float
    end: float


class Unschedulable(ValueError):
    """No set of the GPUs can ever hold a request."""


def gpus_for_estimate(estimate_bytes: float, per_gpu_bytes: float) -> int:
    """GPUs a stage of `estimate_bytes` needs at `GPU_HEADROOM` of `per_gpu_bytes` each (at least one)."""
    return max(1, math.ceil(estimate_bytes / (GPU_HEADROOM * per_gpu_bytes)))


def has_room(device: GpuDevice, request: GpuRequest, gpus: int) -> bool:
    """Whether `device` holds its share of `request` spread over `gpus` GPUs."""
    return request.estimate_bytes is None or request.estimate_bytes / gpus <= GPU_HEADROOM * device.free_bytes


def gpus_needed(request: GpuRequest, devices: list[GpuDevice]) -> int:
    """How many GPUs `request` holds on `devices`: its `gpus`, else the fewest n for which n of the devices have
    room for its n-th share (one without an estimate). Raises `Unschedulable` when no set of them can hold it."""
    if request.gpus is not None:
        counts: range | list[int] = [request.gpus]
    elif request.estimate_bytes is None:
        counts = [1]
    else:
        roomiest = max((d.free_bytes for d in devices), default=0)
        counts = range(gpus_for_estimate(request.estimate_bytes, roomiest), len(devices) + 1) if roomiest > 0 else []
    for count in counts:
        if count == 0 or sum(has_room(d, request, count) for d in devices) >= count:
            return count
    raise Unschedulable(f"{request.name} {_asks(request)}, but no set of these GPUs can hold it ({describe_devices(devices)})")


def _asks(request: GpuRequest) -> str:
    if request.estimate_bytes is None:
        return f"asks for {request.gpus if request.gpus is not None else 1} GPU(s)"
    if request.gpus is not None:
        return f"asks for {request.gpus} GPU(s) with ~{request.estimate_bytes / max(request.gpus, 1) / GIB:.1f} GiB on each"
    return f"needs ~{request.estimate_bytes / GIB:.1f} GiB (preflight's estimate) within {GPU_HEADROOM:.0%} of its GPUs' free memory"


def describe_devices(devices: list[GpuDevice]) -> str:
    """`GPU 0: 79.2 of 80.0 GiB free; GPU 1: ...`, or `no GPU`."""
    return "; ".join(f"GPU {d.index}: {d.free_bytes / GIB:.1f} of {d.total_bytes / GIB:.1f} GiB free" for d in devices) or "no GPU"


@dataclass
class _Waiting:
    key: Hashable
    request: GpuRequest
    gpus: int
    counted: bool


class GpuQueue:
    """Requests waiting for GPUs, in the order they were added, and the GPUs that running ones hold. `key`
    identifies a request's stage; `counted` requests (the trainings) are the ones `max_concurrency` caps."""

    def __init__(self, devices: list[GpuDevice], max_concurrency: int | None = None):
        indices = [d.index for d in devices]
        if len(set(indices)) != len(indices):
            raise ValueError(f"GPU indices listed twice: {sorted(i for i in set(indices) if indices.count(i) > 1)}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be 1 or more, not {max_concurrency}")
        self.devices = sorted(devices, key=lambda d: d.index)
        self.max_concurrency = max_concurrency
        self.idle = {d.index: d for d in self.devices}
        self.waiting: list[_Waiting] = []
        self.held: dict[Hashable, tuple[tuple[int, ...], bool]] = {}  # key -> (its GPUs, counted)

    def add(self, key: Hashable, request: GpuRequest, counted: bool = True) -> None:
        """Queue `request`; `Unschedulable` when no set of the GPUs can ever hold it."""
        self.waiting.append(_Waiting(key, request, gpus_needed(request, self.devices), counted))

    def start_ready(self) -> list[tuple[Hashable, tuple[int, ...]]]:
        """Start, in order, every waiting request that fits now: (key, the GPUs it holds) for each."""
        started = []
        for entry in list(self.waiting):
            if entry.counted and self._at_cap():
                continue
            gpus = self._take(entry)
            if gpus is None:
                continue
            self.waiting.remove(entry)
            self.held[entry.key] = (gpus, entry.counted)
            started.append((entry.key, gpus))
        return started

    def finish(self, key: Hashable) -> None:
        """The request `key` ended: its GPUs are idle again."""
        gpus, _ = self.held.pop(key)
        self.idle.update({d.index: d for d in self.devices if d.index in gpus})

    def _at_cap(self) -> bool:
        return self.max_concurrency is not None and sum(counted for _, counted in self.held.values()) >= self.max_concurrency

    def _take(self, entry: _Waiting) -> tuple[int, ...] | None:
        """The idle GPUs `entry` gets now (the least free memory first among those with room), or None."""
        if entry.gpus == 0:
            return ()
        roomy = sorted((d for d in self.idle.values() if has_room(d, entry.request, entry.gpus)),
                       key=lambda d: (d.free_bytes, d.index))  # fmt: skip
        if len(roomy) < entry.gpus:
            return None
        chosen = tuple(sorted(d.index for d in roomy[: entry.gpus]))
        for index in chosen:
            del self.idle[index]
        return chosen


def plan_placement(requests: list[GpuRequest], devices: list[GpuDevice], max_concurrency: int | None = None,
                   durations: dict[str, float] | None = None) -> list[Placement]:  # fmt: skip
    """Where and when each request runs: `GpuQueue` on a simulated clock, each request lasting `durations[name]`
    (1.0 when not given), every request queued at 0. One placement per request, in the requests' order. Raises
    `Unschedulable` for a request that no set of the devices can hold."""
    names = [r.name for r in requests]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"request names must be unique; given twice: {twice}")
    durations = durations or {}
    queue = GpuQueue(devices, max_concurrency)
    for request in requests:
        queue.add(request.name, request)
    clock, ends, placed = 0.0, {}, {}
    while queue.waiting or ends:
        for name, gpus in queue.start_ready():
            duration = durations.get(name, 1.0)
            if duration < 0:
                raise ValueError(f"{name}: a duration cannot be negative ({duration})")
            placed[name] = Placement(name, gpus, clock, clock + duration)
            ends[name] = clock + duration
        clock = min(ends.values())
        for name in [n for n, end in ends.items() if end == clock]:
            del ends[name]
            queue.finish(name)
    return [placed[n] for n in names]


def format_plan(placements: list[Placement]) -> str:
    """The plan as a text table (stage, GPUs, start, end), then how many GPUs it used and when it ends."""
    rows = [("stage", "GPUs", "start", "end")]
    rows += [(p.name, ",".join(map(str, p.gpus)) or "none", f"{p.start:g}", f"{p.end:g}") for p in placements]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    used = sorted({g for p in placements for g in p.gpus})
    at_once = sum(p.start == 0 for p in placements)
    end = max((p.end for p in placements), default=0.0)
    lines.append(f"{len(placements)} stage(s) on {len(used)} GPU(s) ({','.join(map(str, used)) or 'none'}); "
                 f"{at_once} start at once; all done at {end:g}")  # fmt: skip
    return "\n".join(lines)


def usable_gpus(devices: list[GpuDevice], allowed: list[int] | None) -> list[GpuDevice]:
    """The devices a pipeline's `gpus:` list lets it use (all when it has none); an index the machine lacks is a
    ConfigError naming what it has."""
    if allowed is None:
        return devices
    present = {d.index for d in devices}
    missing = [i for i in allowed if i not in present]
    if missing:
        have = ", ".join(map(str, sorted(present))) or "none"
        raise ConfigError(f"gpus: {allowed} names GPU(s) {missing} that this machine does not have (its GPUs: {have})")
    return [d for d in devices if d.index in allowed]


def probe_gpus() -> list[GpuDevice]:
    """This machine's GPUs with their total and free memory now, from NVML (no CUDA context is created); none
    without the NVIDIA driver. When CUDA_VISIBLE_DEVICES is set, only the GPUs it names (by index or `GPU-` UUID;
    empty or `-1`: none)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        uuids = [pynvml.nvmlDeviceGetUUID(h) for h in handles]
        chosen = range(len(handles)) if visible is None else visible_indices(visible, uuids)
        memory = {i: pynvml.nvmlDeviceGetMemoryInfo(handles[i]) for i in chosen}
        return [GpuDevice(i, int(memory[i].total), int(memory[i].free)) for i in chosen]
    finally:
        pynvml.nvmlShutdown()


def visible_indices(visible: str, uuids: list[str]) -> list[int]:
    """The NVML indices a CUDA_VISIBLE_DEVICES value names, given each GPU's UUID. As CUDA reads it, the list ends
    at `-1`; an entry that is neither an index nor a (prefix of a) `GPU-` UUID of this machine is a ConfigError."""
    indices: list[int] = []
    for entry in (e.strip() for e in visible.split(",") if e.strip()):
        if entry == "-1":
            break
        if entry.isdigit():
            found = [int(entry)] if int(entry) < len(uuids) else []
        else:
            found = [i for i, uuid in enumerate(uuids) if entry.startswith("GPU-") and uuid.startswith(entry)]
        if len(found) != 1:
            raise ConfigError(f"CUDA_VISIBLE_DEVICES={visible}: {entry!r} is not one GPU of this machine (indices 0-{len(uuids) - 1} "
                              "or GPU-… UUIDs); the local executor pins stages to whole GPUs: unset it and list the "
                              "GPUs in the pipeline's `gpus:` instead")  # fmt: skip
        indices.append(found[0])
    return indices
