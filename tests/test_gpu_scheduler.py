"""The GPU scheduler of the local executor (`dialogsum.pipeline.gpu_scheduler`), on CPU.

No GPU exists here: every test gives the scheduler a FAKE device list in place of the NVML probe (`probe_gpus`),
GPUs with made-up indices and memory. Everything else is real: the seed-full models' configs through dialogsum's
config loader and preflight's `estimate_memory`, real stage processes (tiny `python -c` commands standing in for
trainings, which write the environment they got to a file) and a real SQLite MLflow store for their runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest

from dialogsum.config import ConfigError, PipelineConfig, load_model_config, load_pipeline_config, parse_config
from dialogsum.pipeline.executors import DIALOGSUM, Interrupted, LocalExecutor, Stage, StageResources, launcher_for
from dialogsum.pipeline.gpu_scheduler import (
    GpuDevice,
    GpuRequest,
    Unschedulable,
    format_plan,
    gpus_needed,
    plan_placement,
    probe_gpus,
    usable_gpus,
    visible_indices,
)
from dialogsum.precision import DeviceInfo, resolve_precision
from dialogsum.preflight import estimate_memory

GIB = 1024**3


def fake_gpus(count: int, total_gib: float = 80, free_gib: float | None = None) -> list[GpuDevice]:
    """`count` fake GPUs of `total_gib`, `free_gib` of it free (all of it by default)."""
    total, free = int(total_gib * GIB), int((total_gib if free_gib is None else free_gib) * GIB)
    return [GpuDevice(index=i, total_bytes=total, free_bytes=free) for i in range(count)]


def one_gpu(name: str) -> GpuRequest:
    return GpuRequest(name=name, gpus=1, estimate_bytes=None)


def test_seed_full_starts_at_once_on_an_8x80gb_node():
    """The six seed-full trainings, sized by preflight's estimates (bf16, as on an 80 GB GPU), all start at once
    on GPUs of their own, each GPU holding its share."""
    node = fake_gpus(8)
    gpu = DeviceInfo("cuda", "fake 80 GB GPU", True, node[0].total_bytes, node[0].free_bytes)
    requests = []
    for model in load_pipeline_config("seed-full").models:
        cfg = load_model_config(model.name, model.overrides)
        estimate = estimate_memory(cfg, resolve_precision(cfg.precision, gpu).compute_dtype).total
        requests.append(GpuRequest(name=cfg.name, gpus=None if cfg.resources.gpus is None else math.ceil(cfg.resources.gpus),
                                   estimate_bytes=estimate))  # fmt: skip
    needed = {r.name: gpus_needed(r, node) for r in requests}
    assert sum(needed.values()) <= len(node), f"the six seed models need {needed} GPUs: more than the node's 8"
    plan = plan_placement(requests, node)
    print(format_plan(plan))
    held = [g for p in plan for g in p.gpus]
    assert len(held) == len(set(held)), f"two trainings share a GPU: {plan}"
    for request, placement in zip(requests, plan):
        assert placement.start == 0.0, f"{request.name} waits although the node holds all six: {plan}"
        assert len(placement.gpus) == needed[request.name]
        assert request.estimate_bytes / len(placement.gpus) <= 0.9 * 80 * GIB


def test_a_third_stage_waits_for_the_gpu_that_frees_first():
    """2 GPUs, 3 one-GPU stages: the third starts when the first one ends, on the GPU it gave back."""
    plan = plan_placement([one_gpu("a"), one_gpu("b"), one_gpu("c")], fake_gpus(2), durations={"a": 1.0, "b": 3.0, "c": 2.0})
    a, b, c = plan
    assert (a.start, b.start) == (0.0, 0.0) and {a.gpus, b.gpus} == {(0,), (1,)}
    assert (c.start, c.end, c.gpus) == (1.0, 3.0, a.gpus)
    assert "3 stage(s) on 2 GPU(s) (0,1); 2 start at once; all done at 3" in format_plan(plan)


def test_a_two_gpu_request():
    """A training asking for 2 GPUs holds two; one whose estimate (100 GiB) exceeds one GPU gets two with room for
    half of it each, skipping a GPU that has not; a one-GPU stage queued behind it takes what is left."""
    ddp = GpuRequest(name="ddp", gpus=2, estimate_bytes=None)
    assert [p.gpus for p in plan_placement([ddp, one_gpu("one")], fake_gpus(3))] == [(0, 1), (2,)]
    devices = [GpuDevice(0, 80 * GIB, 80 * GIB), GpuDevice(1, 80 * GIB, 30 * GIB), GpuDevice(2, 80 * GIB, 79 * GIB)]
    big = GpuRequest(name="big", gpus=None, estimate_bytes=100 * GIB)
    assert gpus_needed(big, devices) == 2
    big_plan, one_plan = plan_placement([big, one_gpu("one")], devices)
    assert big_plan.gpus == (0, 2) and (one_plan.gpus, one_plan.start) == ((1,), 0.0)


def test_a_gpus_list_restricts_the_pipeline_to_those_gpus():
    """`gpus: [2, 3]` on an 8-GPU node: four stages run two at a time on GPUs 2 and 3 only; an index the machine
    lacks is refused, naming its GPUs."""
    allowed = usable_gpus(fake_gpus(8), [2, 3])
    plan = plan_placement([one_gpu(n) for n in "abcd"], allowed)
    assert {g for p in plan for g in p.gpus} == {2, 3}
    assert [p.start for p in plan] == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match=r"gpus: \[2, 9\] names GPU\(s\) \[9\] .*its GPUs: 0, 1, 2, 3, 4, 5, 6, 7"):
        usable_gpus(fake_gpus(8), [2, 9])


def test_max_concurrency_one_runs_them_in_turn():
    plan = plan_placement([one_gpu(n) for n in "abc"], fake_gpus(8), max_concurrency=1)
    assert [(p.start, p.end) for p in plan] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]


def test_a_request_no_gpus_can_hold_is_refused():
    """200 GiB on 2 × 80 GiB, or 3 GPUs of 2: `Unschedulable`, naming the request and the GPUs."""
    with pytest.raises(Unschedulable, match=r"huge needs ~200\.0 GiB .*GPU 0: 80\.0 of 80\.0 GiB free; GPU 1: 80\.0 of 80\.0 GiB free"):
        plan_placement([one_gpu("fine"), GpuRequest(name="huge", gpus=None, estimate_bytes=200 * GIB)], fake_gpus(2))
    with pytest.raises(Unschedulable, match=r"wide asks for 3 GPU\(s\), but no set of these GPUs can hold it"):
        gpus_needed(GpuRequest(name="wide", gpus=3, estimate_bytes=None), fake_gpus(2))


def test_cuda_visible_devices_narrows_the_probe():
    """The probe's reading of CUDA_VISIBLE_DEVICES for 4 GPUs (made-up UUIDs): indices, UUID prefixes, `-1` ends
    the list as CUDA reads it, empty means none; anything else is refused. The real probe finds as many GPUs as
    torch does (none here: no NVIDIA driver)."""
    uuids = [f"GPU-{i}aaa-{i}" for i in range(4)]
    assert visible_indices("2,3", uuids) == [2, 3]
    assert visible_indices("GPU-1aaa,0", uuids) == [1, 0]
    assert visible_indices("3,-1,0", uuids) == [3] and visible_indices("", uuids) == []
    with pytest.raises(ConfigError, match=r"'MIG-x' is not one GPU of this machine .*list the GPUs in the pipeline's `gpus:`"):
        visible_indices("MIG-x", uuids)
    with pytest.raises(ConfigError, match="'7' is not one GPU"):
        visible_indices("7", uuids)
    import torch

    assert len(probe_gpus()) == torch.cuda.device_count()


def test_max_concurrency_is_top_level_and_gpus_lists_this_machines_gpus():
    """One `max_concurrency` for both executors; `ray.max_concurrency` is refused with where it went (an unset one,
    as older pipelines logged their config, is dropped); `gpus:` is for executor local, each index once."""
    base = {"name": "p", "models": [{"name": "kobart-tiny"}]}
    cfg = parse_config(PipelineConfig, {**base, "max_concurrency": 2, "gpus": [2, 3]}, Path("p.yaml"))
    assert (cfg.max_concurrency, cfg.gpus) == (2, [2, 3])
    assert parse_config(PipelineConfig, {**base, "ray": {"max_concurrency": None}}, Path("old.yaml")).max_concurrency is None
    refusals = {"max_concurrency is a top-level key now": {"ray": {"max_concurrency": 4}},
                "gpus: lists this machine's GPUs for executor local": {"executor": "ray", "gpus": [0]},
                r"gpus: \[1, 1\]: GPU indices are 0 or more, each listed once": {"gpus": [1, 1]}}  # fmt: skip
    for message, extra in refusals.items():
        with pytest.raises(ConfigError, match=message):
            parse_config(PipelineConfig, {**base, **extra}, Path("p.yaml"))


# --- the local executor with stage processes ---------------------------------------------------------------------

RECORD = ("import json, os, sys, time; start = time.time(); time.sleep(float(sys.argv[2])); "
          "json.dump({'start': start, 'end': time.time(), 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), "
          "'order': os.environ.get('CUDA_DEVICE_ORDER')}, open(sys.argv[1], 'w'))")  # fmt: skip


def _record_stages(folder: Path, sleeps: dict[str, float]) -> list[Stage]:
    """A one-GPU training per name, each a `python -c` that sleeps `sleeps[name]` s and writes its env and times to
    `folder/<name>.json`."""
    return [Stage("train", name, ["-c", RECORD, str(folder / f"{name}.json"), str(sleep)], 60, StageResources(gpus=1.0), "train")
            for name, sleep in sleeps.items()]  # fmt: skip


def _run(executor: LocalExecutor, stages: list[Stage], after_start=None) -> tuple[list[str], list[str]]:
    """Run `stages`, each in a real run of the store (`after_start(names started so far)` after each start);
    returns the order they started and ended in."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("gpu-scheduler") or client.get_experiment(client.create_experiment("gpu-scheduler"))
    starts, ends = [], []

    def started(stage: Stage) -> None:
        stage.run_id = client.create_run(experiment.experiment_id, run_name=stage.name).info.run_id
        starts.append(stage.name)
        if after_start is not None:
            after_start(starts)

    def finished(stage: Stage, done) -> None:
        assert done.returncode == 0 and done.error is None, done.log_tail
        client.set_terminated(stage.run_id)
        ends.append(stage.name)

    executor.run_all(stages, started, finished)
    return starts, ends


def _recorded(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


def test_local_executor_runs_stages_at_once_pinned_to_their_gpus(module_store, tmp_path):
    """Fake 2 GPUs, 3 one-GPU trainings: a and b run at the same time, each with CUDA_VISIBLE_DEVICES of its own
    GPU (PCI order); c starts when a (the shorter) has ended, on the GPU a gave back, while b still runs. Each
    stage's log is on its run."""
    executor = LocalExecutor(grace_s=5, probe=lambda: fake_gpus(2))
    executor.use_folder("unused", tmp_path)
    stages = _record_stages(tmp_path, {"a": 1.0, "b": 3.0, "c": 0.1})
    starts, ends = _run(executor, stages)
    a, b, c = (_recorded(tmp_path, n) for n in "abc")
    assert starts == ["a", "b", "c"] and ends == ["a", "c", "b"]
    assert a["start"] < b["end"] and b["start"] < a["end"], f"a and b did not overlap: {a}, {b}"
    assert {a["cuda"], b["cuda"]} == {"0", "1"} and a["order"] == b["order"] == "PCI_BUS_ID"
    assert a["end"] <= c["start"] < b["end"], f"c did not start between a's end and b's: {a}, {b}, {c}"
    assert c["cuda"] == a["cuda"]
    assert [s.gpus for s in stages] == [(int(a["cuda"]),), (int(b["cuda"]),), (int(c["cuda"]),)]
    logs = mlflow.MlflowClient().list_artifacts(stages[0].run_id, "logs")
    assert [Path(f.path).name for f in logs] == [f"train-{stages[0].run_id}.log"]


def test_local_executor_without_gpus_runs_stages_in_turn(module_store, tmp_path):
    """An empty device list (a CPU-only machine): the same stages run one after another, in order, with no
    CUDA_VISIBLE_DEVICES set for them and none recorded."""
    executor = LocalExecutor(grace_s=5, probe=list)
    executor.use_folder("unused", tmp_path)
    stages = _record_stages(tmp_path, {"a": 0.5, "b": 0.5})
    starts, ends = _run(executor, stages)
    a, b = (_recorded(tmp_path, n) for n in "ab")
    assert starts == ends == ["a", "b"]
    assert a["end"] <= b["start"], f"b started before a ended: {a}, {b}"
    assert all(s.gpus is None for s in stages)


def test_a_training_on_several_gpus_is_an_accelerate_launch():
    """A training holding 2 GPUs runs as `python -m accelerate.commands.launch --multi_gpu --num_processes 2 ...
    -m dialogsum train ...`; one GPU, or a step that is not a training, runs as it is."""
    train = Stage("train", "qwen3-4b", [*DIALOGSUM, "train", "--model", "qwen3-4b"], None)
    launcher = launcher_for(train, (2, 3))
    assert launcher[:6] == ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines")
    assert int(launcher[launcher.index("--main_process_port") + 1]) > 0
    assert launcher_for(train, (2,)) == () and launcher_for(Stage("kfold", "k", [*DIALOGSUM, "kfold"], None), (2, 3)) == ()


def test_ctrl_c_stops_every_running_stage(module_store, tmp_path):
    """SIGINT while two stages run on fake GPUs 0 and 1: both process groups are stopped at once (SIGTERM) and
    `Interrupted` carries both log tails, well within one grace period; neither ran to its end."""
    executor = LocalExecutor(grace_s=5, probe=lambda: fake_gpus(2))
    executor.use_folder("unused", tmp_path)
    stages = _record_stages(tmp_path, {"a": 60.0, "b": 60.0})
    sent: list[float] = []

    def interrupt() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    timer = threading.Timer(1.0, interrupt)  # started once both stages run
    try:
        with pytest.raises(Interrupted, match="while 2 stage") as stopped:
            _run(executor, stages, after_start=lambda starts: timer.start() if len(starts) == 2 else None)
        stopped_after = time.monotonic() - sent[0]
    finally:
        timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # the executor ignores both signals once interrupted
    assert stopped_after < 5, f"stopping took {stopped_after:.1f} s: not both at once within one grace period"
    assert set(stopped.value.log_tails) == {s.run_id for s in stages}
    assert not any((tmp_path / f"{n}.json").exists() for n in "ab"), "a stage ran to its end"


def test_the_report_shows_the_gpus_each_stage_held(module_store):
    """Children tagged `dialogsum.gpus` (as the local executor's pipeline tags them): the report says the stages
    ran on this machine's GPUs, its timeline table has a GPUs column, the timeline figure's labels name them."""
    from dialogsum.pipeline.report import write_report
    from dialogsum.pipeline.report_figures import timeline_label
    from dialogsum.tracking import GPUS_TAG, MODEL_TAG, close_run, create_child_run

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("gpu-report") or client.get_experiment(client.create_experiment("gpu-report"))
    parent_id = client.create_run(experiment.experiment_id, run_name="on-gpus", tags={"dialogsum.kind": "pipeline"}).info.run_id
    client.log_param(parent_id, "executor", "local")
    held = {"kobart": "0", "qwen3-4b": "1,2", "solar-api": ""}
    for name, gpus in held.items():
        kind = "solar" if name == "solar-api" else "train"
        run_id = create_child_run(parent_id, name, kind, {MODEL_TAG: name, GPUS_TAG: gpus})
        close_run(run_id, "succeeded", kind)
    client.set_terminated(parent_id)
    text = write_report(parent_id)
    assert "stages ran on: this machine's GPUs, at once where they had room" in text
    assert "| # | step | model | start (+s) | duration (s) | status | GPUs |" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \| ", line)]  # the timeline table's
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    assert {c[2]: c[-1] for c in cells} == {"kobart": "GPU 0", "qwen3-4b": "GPUs 1,2", "solar-api": "no GPU"}
    children = [client.get_run(r.info.run_id) for r in client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")]
    assert sorted(timeline_label(r) for r in children) == ["solar: solar-api [no GPU]", "train: kobart [GPU 0]", "train: qwen3-4b [GPUs 1,2]"]
