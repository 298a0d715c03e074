"""A user who installs the wheel, outside any checkout: the configs ship inside the package, and the quick start runs
from an empty folder and leaves what the README promises — train, validation and test roles, scores with intervals,
a guarded registration under the quick start's own name, and a submission for the sample's unlabelled rows.

The wheel is built from this checkout and installed into a fresh virtual environment that sees this machine's
installed dependencies (`--system-site-packages`: no network, and torch is gigabytes), with `--no-deps`; the test
checks that `dialogsum` itself is imported from the virtual environment, never from the checkout.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin/` folder of a fresh virtual environment with the dialogsum wheel installed."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
                   check=True, timeout=300)  # fmt: skip
    [wheel] = dist.glob("dialogsum-*.whl")
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)  # fmt: skip
    return venv / "bin"


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """An empty folder away from the checkout, and an environment pointing MLflow at a store in it."""
    folder = tmp_path_factory.mktemp("user-folder")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DIALOGSUM_CONFIGS", "PYTHONPATH"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", UPSTAGE_API_KEY="", SOLAR_API_KEY="")
    return folder, env


def run(bin_dir: Path, place: tuple[Path, dict[str, str]], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    folder, env = place
    return subprocess.run([str(bin_dir / "dialogsum"), *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_is_what_runs_and_its_configs_are_packaged(installed, outside):
    folder, env = outside
    where = subprocess.run([str(installed / "python"), "-c", "import dialogsum; print(dialogsum.__file__)"], cwd=folder,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert where.startswith(str(installed.parent)) and not where.startswith(str(REPO)), where
    models = run(installed, outside, "models")
    assert models.returncode == 0, models.stderr
    assert models.stdout.startswith(f"# models from packaged with dialogsum ({installed.parent}")
    assert "kobart-tiny\t" in models.stdout and "qwen3-4b\t" in models.stdout
    preflight = run(installed, outside, "preflight", "--models", "kobart-tiny")
    assert preflight.returncode == 0, preflight.stdout + preflight.stderr
    assert preflight.stdout.splitlines()[2].startswith("kobart-tiny\tok\t")

    (folder / "configs" / "models").mkdir(parents=True)
    (folder / "configs" / "models" / "mine.yaml").write_text(
        (REPO / "src/dialogsum/configs/models/kobart-tiny.yaml").read_text(encoding="utf-8")
        .replace("name: kobart-tiny", "name: mine").replace("aliases: [bart-tiny]", "aliases: []"), encoding="utf-8")  # fmt: skip
    local = run(installed, outside, "models", "--format", "json")
    assert '"title": "models from ./configs' in local.stdout and '"name": "mine"' in local.stdout
    (folder / "configs" / "models" / "mine.yaml").unlink()
    (folder / "configs" / "models").rmdir()
    (folder / "configs").rmdir()


@pytest.mark.timeout(QUICKSTART_TIMEOUT_S + 60)
def test_quickstart_from_the_wheel_in_an_empty_folder(installed, outside):
    folder, env = outside
    done = run(installed, outside, "pipeline", "--config", "quickstart", timeout=QUICKSTART_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "?workflowType=machine_learning" in done.stderr

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    [parent] = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`dialogsum.kind` = 'pipeline'", output_format="list")
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    children = mlflow.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  output_format="list")  # fmt: skip
    status = {(r.data.tags["dialogsum.kind"], r.data.tags["dialogsum.model"]): r.data.tags["dialogsum.status"] for r in children}
    assert status == {("train", "kobart-tiny"): "succeeded", ("train", "qwen3-tiny-qlora"): "succeeded",
                      ("train", "llama-tiny"): "succeeded", ("solar", "solar-api"): "skipped",
                      ("ensemble", "ensemble"): "succeeded", ("optimize", "kobart-tiny"): "succeeded",
                      ("register", "register"): "succeeded", ("predict", "predict"): "succeeded"}, status  # fmt: skip

    trains = [r for r in children if r.data.tags["dialogsum.kind"] == "train"]
    for run_ in trains:
        m = run_.data.metrics
        assert m["test_final_ci95_low"] <= m["test_final"] <= m["test_final_ci95_high"], run_.data.tags["dialogsum.model"]
        assert m["best_val_final_ci95_low"] <= m["best_val_final"] <= m["best_val_final_ci95_high"]
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(m)
        assert [lm.name for lm in mlflow.search_logged_models([parent.info.experiment_id], output_format="list",
                                                              filter_string=f"source_run_id = '{run_.info.run_id}'")] == [run_.data.tags["dialogsum.model"]]  # fmt: skip
    assert len({r.data.tags["dialogsum.val_rows_digest"] for r in trains}) == 1, "every model is validated on the same rows"
    assert parent.data.metrics["best_val_final"] == max(r.data.metrics["best_val_final"] for r in trains)
    assert (parent.data.metrics["children_succeeded"], parent.data.metrics["children_skipped"]) == (7, 1)

    matrix = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="matrix.csv"))
    assert {"val_final", "test_final"} <= set(matrix.columns)
    validated = matrix[matrix.stage == "validate"]
    assert validated.val_final.notna().all() and validated.test_final.notna().all() and len(validated) == 3

    [predict] = [r for r in children if r.data.tags["dialogsum.kind"] == "predict"]
    submission = Path(mlflow.artifacts.download_artifacts(run_id=predict.info.run_id, artifact_path="submission/submission.csv"))
    with open(submission, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["fname", "summary"] and len(rows) == 21 and all(r[1].strip() for r in rows[1:])
    assert predict.data.tags["dialogsum.predict.source_reason"]

    [version] = client.search_model_versions("name = 'dialogsum-ko-quickstart'")
    assert client.get_registered_model("dialogsum-ko-quickstart").aliases == {"champion": version.version}
    assert version.description and "val_final" in version.description and "test_final" in version.description
    assert not client.search_registered_models("name = 'dialogsum-ko'"), "a demo never touches the real registered name"

    html = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report.html")).read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in html and 'src="data:image/png;base64,' in html and "<img alt" in html
    assert '<img alt="timeline" src="timeline.png"' not in html, "images are embedded, not relative"
    logs = [a.path for a in client.list_artifacts(trains[0].info.run_id, "logs")]
    log_text = Path(mlflow.artifacts.download_artifacts(run_id=trains[0].info.run_id, artifact_path=logs[0])).read_text(encoding="utf-8")
    assert "\x1b[" not in log_text, "stage logs hold no ANSI escapes"
