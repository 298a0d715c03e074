"""The saved-model format, the served model being the scored one, and pinned hub revisions.

A QLoRA model is trained on a base that comes "from the hub": a tiny Llama of the real architecture (random init,
untied output layer) placed in a Hugging Face cache laid out exactly as the hub client writes one (`refs/main`
naming a commit, `snapshots/<commit>/`), read with `HF_HUB_OFFLINE=1`. Only the hub's network side is missing;
the cache, its resolution of `main` to a commit, and `from_pretrained` are the real ones. Training, serving and
the later loads run in subprocesses so each sees that cache through its environment, as a user's processes do.

After training, `main` moves to a second commit with other weights (the authors pushed an update). The run's
model must still be the one it scored: `mlflow models serve`, offline, answers with the summaries the training
run's validation table holds for the same rows (greedy), from the same 4-bit base at the commit it trained on.

One numerics: a kobart-tiny trained with `precision: bf16` records fp32 weights under bf16 autocast, and its
validation, the test-score path and the served pyfunc compute alike and write the same summaries.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import requests
from tracking_server import _stop as stop_process_group
from tracking_server import _wait_healthy as wait_healthy
from tracking_server import free_port
from typer.testing import CliRunner

from dialogsum.cli import app
from dialogsum.config import configs_dir
from dialogsum.serving import saved_model
from dialogsum.tracking import MODEL_TAG
from dialogsum.training.recipe import TOKENIZER_COMMIT_TAG, WEIGHTS_COMMIT_TAG, resumed_config

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "dialogsum"
HUB_ID = "dialogsum-test/tiny-llama"
NAME = "hub-tiny-qlora"
COMMITS = ("a" * 40, "b" * 40)  # the commit trained on, and the one `main` moves to afterwards
ARCHITECTURE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": False}  # fmt: skip
MODEL_YAML = f"""\
name: {NAME}
description: A tiny Llama from a (local) hub cache, trained with QLoRA.
family: llama
task: causal
hub_id: {HUB_ID}
params_billions: 0.0004
dimensions: {{hidden_size: 64, num_layers: 2, intermediate_size: 128, vocab_size: 3000}}
quantization: 4bit
lora: {{r: 8, alpha: 16, dropout: 0.0, targets: [q_proj, k_proj, v_proj, o_proj, up_proj, down_proj]}}
prompt: {{format: instruction}}
generation: {{num_beams: 1, max_new_tokens: 8, min_new_tokens: 2, repetition_penalty: 1.2}}
training: {{epochs: 1, batch_size: 4, eval_batch_size: 8, learning_rate: 5.0e-3, warmup_steps: 1, max_source_length: 192,
           max_target_length: 32, max_train_samples: 8, max_validation_samples: 3, max_test_samples: 2}}
"""


def _write_snapshot(cache: Path, commit: str, seed: int, tokenizer) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **ARCHITECTURE)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """The HF cache with commit A on main, a configs folder holding the hub model, and the environment that points
    subprocesses at both (offline)."""
    from dialogsum.config import load_model_config
    from dialogsum.data import read_dialogues, sample_data_path
    from dialogsum.models import train_tokenizer

    root = tmp_path_factory.mktemp("hub")
    rows = read_dialogues(sample_data_path("train"))
    tokenizer = train_tokenizer(rows.dialogues + rows.summaries, load_model_config("llama-tiny"))
    cache = root / "hf-cache"
    _write_snapshot(cache, COMMITS[1], seed=2, tokenizer=tokenizer)  # the later push, written first
    _write_snapshot(cache, COMMITS[0], seed=1, tokenizer=tokenizer)  # main -> A
    configs = root / "configs"
    shutil.copytree(configs_dir(), configs)
    (configs / "models" / f"{NAME}.yaml").write_text(MODEL_YAML, encoding="utf-8")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no other test's run or experiment
    env = {**inherited, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DIALOGSUM_CONFIGS": str(configs)}  # fmt: skip
    return {"cache": cache, "env": env}


def _move_main(hub: dict, commit: str) -> None:
    (hub["cache"] / f"models--{HUB_ID.replace('/', '--')}" / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def trained(hub, module_store) -> str:
    env = {**hub["env"], "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    result = subprocess.run([sys.executable, "-m", "dialogsum", "train", "--model", NAME], env=env, cwd=module_store,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    [run] = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{MODEL_TAG}` = '{NAME}'", output_format="list")
    _move_main(hub, COMMITS[1])  # the hub moved on after the training
    return run.info.run_id


def _folder(run_id: str) -> Path:
    from dialogsum.serving.pyfunc import logged_model_dir

    return logged_model_dir(f"runs:/{run_id}/{NAME}")


def test_the_run_tags_the_commits_it_loaded_and_pins_them_for_resume(trained):
    tags = mlflow.get_run(trained).data.tags
    assert tags[WEIGHTS_COMMIT_TAG] == COMMITS[0] and tags[TOKENIZER_COMMIT_TAG] == COMMITS[0]
    assert resumed_config(trained, None, None).revision == COMMITS[0], "a resumed run loads the commit it started from"


def test_a_qlora_model_is_saved_as_adapter_and_pinned_4bit_base_reference(trained, tmp_path):
    folder = _folder(trained)
    info = saved_model.read(folder)
    assert info.weights == "adapter" and info.scored and info.config.revision == COMMITS[0]
    assert info.base is not None and info.base.source == "hub" and info.base.path == HUB_ID
    assert info.base.revision == COMMITS[0]
    assert info.base.quantization["load_in_4bit"] and info.base.quantization["bnb_4bit_quant_type"] == "nf4"
    assert (folder / "adapter" / "adapter_config.json").is_file() and not (folder / "base").exists()
    assert not list((folder / "adapter").glob("*.bin")) and sum(f.stat().st_size for f in folder.rglob("*")) < 5e6
    logged = mlflow.models.get_model_info(f"runs:/{trained}/{NAME}")
    assert "4-bit nf4" in logged.metadata["dialogsum"]["summary"] and HUB_ID in logged.metadata["dialogsum"]["summary"]
    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{trained}/{NAME}/requirements.txt")).read_text()
    assert "bitsandbytes==" in requirements and "peft==" in requirements


def test_mlflow_models_serve_offline_answers_with_the_validation_table_after_the_hub_moved(trained, hub, module_store):
    mlflow.set_experiment(experiment_id=mlflow.get_run(trained).info.experiment_id)  # load_table reads the active one
    table = mlflow.load_table("predictions.json", run_ids=[trained])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = module_store / "serve-qlora.log"
    env = {**hub["env"], "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{trained}/{NAME}", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(url, process, log, 180)
        records = [{"fname": f, "dialogue": d} for f, d in zip(table["fname"], table["dialogue"])]
        response = requests.post(f"{url}/invocations", json={"inputs": records}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == list(table["prediction"]), "served = scored, row for row"
    finally:
        stop_process_group(process)


LOGITS_SCRIPT = """
import json, sys, torch
from dialogsum.serving import saved_model
from dialogsum.features import tokenize_rows
folder, unpin = sys.argv[1], sys.argv[2] == "unpinned"
if unpin:  # what a loader that ignored the pinned commit would load: the hub's main
    path = f"{folder}/dialogsum_model.json"
    info = json.load(open(path, encoding="utf-8"))
    info["base"]["revision"] = None
    json.dump(info, open(path, "w", encoding="utf-8"))
model, tokenizer, cfg = saved_model.load(folder)
ids = tokenizer("#Person1#: 안녕하세요.\\n#Person2#: 네.", return_tensors="pt")
with torch.no_grad():
    print(json.dumps({"linear4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
                      "logits": model(**ids).logits[0, -1, :50].tolist()}))
"""


def test_the_base_loads_at_the_pinned_commit_in_4bit_and_main_would_be_another_model(trained, hub, tmp_path):
    folder = _folder(trained)
    outputs = {}
    for mode in ("pinned", "unpinned"):
        copy = tmp_path / mode
        shutil.copytree(folder, copy)
        result = subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(copy), mode], env=hub["env"], capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    assert outputs["pinned"]["linear4bit"] > 0, "served in the 4-bit form it was scored in"
    assert outputs["pinned"]["logits"] != outputs["unpinned"]["logits"], "the pin decides which weights load"


def test_export_copies_the_scored_model_or_merges_it_and_says_it_differs(trained, hub, tmp_path):
    import torch

    env = {**hub["env"], "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    uri = f"runs:/{trained}/{NAME}"
    for out, extra in ((tmp_path / "as-scored", []), (tmp_path / "merged", ["--merge", "--dtype", "float16"])):
        result = subprocess.run([sys.executable, "-m", "dialogsum", "export", "--model-uri", uri, "--out", str(out), *extra],
                                env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert saved_model.read(tmp_path / "as-scored").scored
    merged = saved_model.read(tmp_path / "merged")
    assert not merged.scored and merged.weights == "full" and merged.config.lora is None
    assert "may differ" in merged.note and COMMITS[0][:12] in merged.note
    assert "not the model whose scores were logged" in (result.stdout + result.stderr).replace("\n", " ")
    model, _, _ = saved_model.load(tmp_path / "merged", device="cpu")  # no peft, no bitsandbytes, no hub
    assert not any(type(m).__name__.startswith("Linear4bit") or "lora" in type(m).__name__.lower() for m in model.modules())
    assert merged.numerics.model_dump() == {"dtype": "float16", "autocast": None}
    assert model.dtype == torch.float16, "loaded in the dtype it records, on any device"
    assert json.loads((tmp_path / "merged" / "weights" / "config.json").read_text())["dtype"] == "float16"
    again = CliRunner().invoke(app, ["export", "--model-uri", uri, "--out", str(tmp_path / "merged")])
    assert again.exit_code == 1 and "exists" in again.output


def test_a_folder_of_another_format_is_refused_naming_the_file(tmp_path):
    (tmp_path / saved_model.INFO_FILE).write_text(json.dumps({"config": {}, "adapter": False}), encoding="utf-8")
    with pytest.raises(saved_model.SavedModelError, match=r"dialogsum_model\.json: format 1"):
        saved_model.load(tmp_path)


def _imports(module: Path) -> set[str]:
    tree = ast.parse(module.read_text(encoding="utf-8"))
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_one_module_owns_the_folder_and_models_and_quantize_do_not_import_each_other():
    assert "dialogsum.quantize" not in _imports(SRC / "models.py")
    assert "dialogsum.models" not in _imports(SRC / "quantize.py")
    writers = [p for p in SRC.rglob("*.py") if "INFO_FILE" in p.read_text(encoding="utf-8") or "dialogsum_model.json" in p.read_text(encoding="utf-8")]
    assert writers == [SRC / "serving" / "saved_model.py"], writers


NUMERICS_SCRIPT = """
import json, sys, torch
import mlflow
import dialogsum.generate
import dialogsum.training.recipe as recipe
from dialogsum.precision import DeviceInfo
from dialogsum.serving import saved_model
from dialogsum.serving.pyfunc import logged_model_dir

recipe.detect_device = lambda: DeviceInfo("cuda", "stand-in bf16 GPU", True, 80 << 30, 80 << 30)
real_summarize = dialogsum.generate.summarize
used = {}

def record_linears(model, record):
    return [m.register_forward_hook(lambda mod, args, out: record.add((str(mod.weight.dtype), str(out.dtype))))
            for m in model.modules() if isinstance(m, torch.nn.Linear)]

def recording_summarize(model, *args, **kwargs):  # what each caller's model computed in: (weight, output) dtypes
    hooks = record_linears(model, used.setdefault(sys._getframe(1).f_code.co_name, set()))
    try:
        return real_summarize(model, *args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()

dialogsum.generate.summarize = recording_summarize
run_id = recipe.train_model("kobart-tiny", overrides={"precision": "bf16", "training.epochs": 1, "training.max_train_samples": 16,
                            "training.max_validation_samples": 6, "training.max_test_samples": 2, "generation.max_new_tokens": 8})
uri = f"runs:/{run_id}/kobart-tiny"
folder = logged_model_dir(uri)
info = saved_model.read(folder)
batch = info.config.training.eval_batch_size
validation = recipe.roles_for(info.config, None, None, None).validation
table = mlflow.load_table("predictions.json", run_ids=[run_id])
tested = recipe.evaluate_saved_model(folder, validation, batch).predictions
pyfunc = mlflow.pyfunc.load_model(uri)
served_used = set()
record_linears(pyfunc.unwrap_python_model().model, served_used)
served = list(pyfunc.predict([{"dialogue": d} for d in validation.dialogues], params={"batch_size": batch}))
model, tokenizer, _ = saved_model.load(folder)
plain, _, _ = saved_model.load(folder, dtype=torch.float32)  # the old CPU path: fp32 without the autocast
ids = tokenizer(validation.dialogues[0], return_tensors="pt")
with torch.no_grad():
    gap = (model(**ids, labels=ids["input_ids"]).logits - plain(**ids, labels=ids["input_ids"]).logits).abs().max().item()
print(json.dumps({"numerics": info.numerics.model_dump(), "describe": saved_model.describe(folder)["weights"],
                  "precision": mlflow.get_run(run_id).data.tags["dialogsum.precision"], "fnames": [list(table["fname"]), validation.fnames],
                  "validation": list(table["prediction"]), "tested": tested, "served": served,
                  "used": {k: sorted(v) for k, v in used.items()}, "served_used": sorted(served_used), "gap": gap}, ensure_ascii=False))
"""


def test_validation_test_and_serving_compute_in_the_recorded_numerics_and_write_the_same_summaries(tmp_path):
    """A bf16 GPU is stood in for (no GPU here): `detect_device` reports one, so `precision: bf16` resolves to bf16
    autocast, which accelerate runs on the CPU as it would on the GPU. Before, the CPU test and serving path loaded
    plain fp32 (and a GPU pure bf16): its logits differ from the recorded numerics'. Runs in a subprocess because
    accelerate's mixed precision is fixed once per process."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no other test's run or experiment
    env = {**inherited, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = subprocess.run([sys.executable, "-c", NUMERICS_SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["precision"] == "cuda:bfloat16"
    assert out["numerics"] == {"dtype": "float32", "autocast": "bfloat16"}, "fp32 master weights under the training's autocast"
    assert "computing in float32 under bfloat16 autocast" in out["describe"]
    assert out["fnames"][0] == out["fnames"][1]
    assert out["validation"] == out["tested"] == out["served"], "validation, test and serving write the same summaries"
    fp32_under_bf16 = [["torch.float32", "torch.bfloat16"]]
    assert out["used"] == {"validate": fp32_under_bf16, "evaluate_saved_model": fp32_under_bf16, "predict": fp32_under_bf16}
    assert out["served_used"] == fp32_under_bf16
    assert out["gap"] > 1e-4, "without the recorded autocast the model computes other logits"
