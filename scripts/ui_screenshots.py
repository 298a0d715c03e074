"""Screenshots of what a user sees in the MLflow UI after the quick-start pipeline.

Run from the repository root, with dialogsum importable (installed, or PYTHONPATH=src), playwright
installed (`pip install playwright`; no `playwright install`: the system Chromium is used) and
`apt-get install -y chromium fonts-noto-cjk` (the fonts make Korean render):

    python scripts/ui_screenshots.py                      # new temp store: runs the pipeline first (minutes)
    python scripts/ui_screenshots.py --store /tmp/qs      # reuse /tmp/qs/mlflow.db, or create it there
    python scripts/ui_screenshots.py --store /tmp/qs --only runs-table,report-direct   # retake some pages

What it does:

1. If STORE has no mlflow.db, runs `python -m dialogsum pipeline --config quickstart` in STORE with
   MLFLOW_TRACKING_URI=sqlite:///STORE/mlflow.db (and UPSTAGE_API_KEY unset, so the Solar step is skipped).
   The store is kept, so a later run can reuse it with --store.
2. Starts `mlflow server` on a free local port over that store, serving the artifacts where the pipeline
   wrote them (STORE/mlruns), and waits for GET /health. The server is always stopped at the end.
3. Opens each page in a fresh headless-Chromium context (what a new user sees: default settings, pop-ups
   not dismissed), viewport 1600x1000, grown to the height of the page's scrolling panel, and saves a PNG:
   the experiment's default landing page; the runs table (collapsed, parent expanded, wide); the chart
   view (collapsed, expanded); the logged models and one logged model; the parent run's overview; its
   report.html and matrix.html in the artifact viewer and as served by /get-artifact; matrix.png; a
   training child's predictions.json and log artifact; the kobart-tiny child's metrics, system metrics,
   overview and artifacts; the Compare view of the training children; the model registry, the
   registered model and its version.

Output: OUT/NN-name.png (default OUT: ./ui-screenshots), one line per file printed to stdout saying what
it shows, OUT/index.txt with the same lines and each page's URL, and OUT/mlflow-server.log.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlencode, urlparse

VIEWPORT = {"width": 1600, "height": 1000}
KIND_TAG = "dialogsum.kind"
MODEL_TAG = "dialogsum.model"
TRAINED_MODEL = "kobart-tiny"  # the training child whose metrics page is captured

# The runs list is an ag-grid, in the table view and in the chart view alike: each run is a [role=row] with
# row-id=<run id> (in the table view once in the pinned-left and once in the centre container). A parent run's
# name cell holds an icon button (the [+] square) that expands it, rendered by RunNameCellRenderer. Selectors
# tried in order inside the parent's row; the toolbar's "Expand rows" toggle (table view only) is the fallback.
RUN_ROW = "[role='row'][row-id='{run_id}']"
EXPAND_SELECTORS = [
    "button[data-component-id$='runnamecellrenderer.tsx_46']",
    "button[data-component-id*='runnamecellrenderer']",
]
ANY_RUN_ROW = "[role='row'][row-id]"
# Distinct runs listed (a table-view row is rendered twice: pinned-left and centre).
ROW_COUNT_JS = f"new Set([...document.querySelectorAll({ANY_RUN_ROW!r})].map(e => e.getAttribute('row-id'))).size"
# The "MLflow Assistant (Beta)" side panel that MLflow 3 opens on the right of every page.
ASSISTANT_CLOSE = "[data-component-id='mlflow.assistant.chat_panel.close']"


# Pixels hidden below the fold in the most scrolled page-sized panel (the window or a scrolling element at
# least half the window's height; smaller ones, such as tables with a fixed max-height, keep their scrollbar).
HIDDEN_HEIGHT_JS = """() => {
  let hidden = document.documentElement.scrollHeight - window.innerHeight;
  for (const e of document.querySelectorAll('*')) {
    const overflow = getComputedStyle(e).overflowY;
    if ((overflow === 'auto' || overflow === 'scroll') && e.clientHeight > window.innerHeight / 2)
      hidden = Math.max(hidden, e.scrollHeight - e.clientHeight);
  }
  return hidden;
}"""
FRAME_HIDDEN_JS = "() => document.documentElement.scrollHeight - window.innerHeight"
MAX_HEIGHT = 7000


# --------------------------------------------------------------------------------------------- store

def ensure_pipeline(store: Path) -> None:
    """Run the quick-start pipeline into `store` unless it already holds an mlflow.db."""
    if (store / "mlflow.db").exists():
        print(f"Reusing {store / 'mlflow.db'}", flush=True)
        return
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
    env.pop("UPSTAGE_API_KEY", None)
    print(f"Running the quick-start pipeline in {store} (a few minutes)...", flush=True)
    log = store / "pipeline.log"
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run([sys.executable, "-m", "dialogsum", "pipeline", "--config", "quickstart"],
                                cwd=store, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        # A pipeline with failed children can still be worth looking at; carry on if a run exists.
        print(f"pipeline exited with {result.returncode}; see {log}", flush=True)


def local_path(uri: str) -> Path | None:
    """The local folder behind a file:// or plain-path artifact URI, else None."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path)
    return None


def find_targets(store: Path) -> dict:
    """Experiment, parent run, children and registered model of the (latest) pipeline run in `store`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{KIND_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise SystemExit(f"No run tagged {KIND_TAG}='pipeline' in {store}/mlflow.db")
    parent = parents[0]
    experiment = client.get_experiment(parent.info.experiment_id)
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    train = [r for r in children if r.data.tags.get(KIND_TAG) == "train"]
    tiny = next((r for r in train if r.data.tags.get(MODEL_TAG) == TRAINED_MODEL), train[0] if train else None)
    # A log artifact of a training child (logs/<stage>-<run>.log), to see how console output renders.
    log_artifact = None
    for child in train:
        logs = [f.path for f in client.list_artifacts(child.info.run_id, "logs") if f.path.endswith(".log")]
        if logs:
            log_artifact = (child, logs[0])
            break
    # The registered model the pipeline's register step created: one with a version from a child run.
    child_ids = {r.info.run_id for r in children}
    models = client.search_registered_models()
    models.sort(key=lambda m: not any(v.run_id in child_ids for v in m.latest_versions))
    return {
        "experiment": experiment,
        "parent": parent,
        "children": children,
        "train": train,
        "tiny": tiny,
        "log_artifact": log_artifact,
        "registered": models[0] if models else None,
        "parent_artifacts": [f.path for f in client.list_artifacts(parent.info.run_id)],
    }


# -------------------------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def artifact_root(store: Path, experiment) -> Path:
    """Where the pipeline's artifacts live: the parent of the experiment's local artifact folder.

    A sqlite store written by the client without a server gets `STORE/mlruns/<experiment_id>` as artifact
    location (absolute paths), so the server must serve that folder; an `mlflow-artifacts:` location (a
    store first created by a server) lives under STORE/mlartifacts.
    """
    folder = local_path(experiment.artifact_location)
    if folder is not None:
        return folder.parent
    return store / "mlartifacts"


def start_server(store: Path, root: Path, port: int, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
        # Runs keep their own absolute artifact_uri; these two only matter for runs/experiments created
        # through this server and for mlflow-artifacts: URIs, which then resolve to the same folder.
        "--default-artifact-root", str(root),
        "--artifacts-destination", str(root),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed with the process
    # A new session so the whole process group (uvicorn and its workers) can be stopped together.
    process = subprocess.Popen(command, cwd=store, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process.log_handle = log  # type: ignore[attr-defined]
    return process


def wait_healthy(base: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mlflow server exited with {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"mlflow server not healthy after {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
    # Workers left behind in the group (the parent may exit before them).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.log_handle.close()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------- browser

class Shooter:
    """Opens each page in a fresh browser context (a new user: no local storage, no dismissed pop-ups), lets
    it settle, grows the viewport to the content's height, saves a PNG and records what it shows."""

    def __init__(self, browser, out: Path, only: set[str] | None = None):
        self.browser = browser
        self.out = out
        self.only = only  # names of the pages to take (all when None); numbering stays the same
        self.count = 0
        self.lines: list[str] = []

    @staticmethod
    def settle(page, selector: str | None, extra_s: float) -> None:
        # The MLflow UI keeps polling the server, so "network idle" may never come: wait for it briefly, then
        # for a selector showing the content is there, then a fixed pause for charts and iframes to paint.
        try:
            page.wait_for_load_state("networkidle", timeout=8_000)
        except Exception:  # noqa: BLE001 - a page that keeps polling still gets its screenshot
            pass
        if selector:
            try:
                page.locator(selector).first.wait_for(timeout=30_000)
            except Exception as error:  # noqa: BLE001
                print(f"  (selector {selector!r} not found: {type(error).__name__})", flush=True)
        time.sleep(extra_s)

    @staticmethod
    def fit_height(page, max_height: int = MAX_HEIGHT) -> None:
        """Grow the viewport so the tallest scrolled panel fits: the UI scrolls inside its own panels, so a
        plain full-page screenshot would stop at the first screen."""
        previous = None
        for _ in range(3):  # a taller page may load more (lazy charts): measure again after growing
            hidden = page.evaluate(HIDDEN_HEIGHT_JS)
            for frame in page.frames[1:]:  # the artifact viewer shows HTML in an iframe that scrolls itself
                try:
                    hidden = max(hidden, frame.evaluate(FRAME_HIDDEN_JS))
                except Exception:  # noqa: BLE001 - a frame that went away
                    pass
            # Stop when it fits, or when growing did not help (a panel sized to the window grows with it).
            if hidden < 20 or (previous is not None and hidden >= previous):
                return
            previous = hidden
            size = page.viewport_size
            page.set_viewport_size({"width": size["width"], "height": min(max_height, size["height"] + hidden + 40)})
            time.sleep(2)

    def shot(self, name: str, what: str, url: str, selector: str | None = None, action=None, extra_s: float = 3.0,
             width: int | None = None, tall: bool = True, max_height: int = MAX_HEIGHT, route: str | None = None,
             ) -> Path:  # fmt: skip
        self.count += 1
        path = self.out / f"{self.count:02d}-{name}.png"
        if self.only is not None and name not in self.only:
            return path
        context = self.browser.new_context(viewport={**VIEWPORT, **({"width": width} if width else {})}, locale="ko-KR")
        if route:
            context.route(route, strip_attachment)
        page = context.new_page()
        try:
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            self.settle(page, selector, extra_s)
            if action is not None:
                note = action(page)
                if note:
                    what = f"{what} [{note}]"
                self.settle(page, None, extra_s)
            if tall:
                self.fit_height(page, max_height)
            # Tall chart pages paint slowly. full_page only for grown pages: the app itself never scrolls the
            # document, and a full-page shot of an un-grown page may add an empty band below it.
            page.screenshot(path=str(path), full_page=tall, animations="disabled", timeout=180_000)
        except Exception as error:  # noqa: BLE001 - record the failure and go on with the other pages
            what = f"{what} [FAILED: {type(error).__name__}: {str(error).splitlines()[0]}]"
            try:
                page.screenshot(path=str(path), full_page=True)
            except Exception:  # noqa: BLE001
                pass
        finally:
            context.close()
        print(f"{path}  {what}", flush=True)
        self.lines.append(f"{path.name}  {what}\n    {url}")
        return path



def close_assistant(page) -> str | None:
    """Close the MLflow Assistant side panel if it is open (it takes a third of the width)."""
    button = page.locator(ASSISTANT_CLOSE)
    if button.count():
        button.first.click()
        return "Assistant panel closed"
    return None


def expand_parent(run_id: str, hide_assistant: bool = False):
    """An action clicking the expander in the parent run's name cell of the runs table."""

    def action(page) -> str:
        notes = [close_assistant(page)] if hide_assistant else []
        row = page.locator(RUN_ROW.format(run_id=run_id)).first
        row.wait_for(timeout=30_000)
        before = page.evaluate(ROW_COUNT_JS)
        for selector in EXPAND_SELECTORS:
            button = page.locator(f"{RUN_ROW.format(run_id=run_id)} {selector}")
            if button.count():
                button.first.click()
                notes.append(f"clicked {selector}")
                break
        else:
            page.get_by_text("Expand rows", exact=True).click()
            notes.append("no expander in the parent's name cell; clicked the 'Expand rows' toggle")
        try:  # the children appear as more rows
            page.wait_for_function(f"{ROW_COUNT_JS} > {before}", timeout=15_000)
        except Exception:  # noqa: BLE001
            notes.append("row count did not grow")
        notes.append(f"{page.evaluate(ROW_COUNT_JS)} runs listed")
        return "; ".join(n for n in notes if n)

    return action


def click_run_link(run_id: str):
    """An action following the run's name link in the runs table, as a user would."""

    def action(page) -> str:
        link = page.locator(f"{RUN_ROW.format(run_id=run_id)} a[href*='{run_id}']").first
        link.click()
        page.wait_for_url(f"**/runs/{run_id}*", timeout=30_000)
        return f"followed the run link; landed on {page.url.split('#', 1)[-1]}"

    return action


def strip_attachment(route) -> None:
    """Serve an artifact response without Content-Disposition, so the browser renders it instead of downloading.

    /get-artifact answers with `Content-Disposition: attachment`: a plain navigation only starts a download.
    The same bytes and Content-Type without that header render as the HTML would when opened in a browser,
    relative links resolved against the route's URL."""
    response = route.fetch()
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-disposition"}
    route.fulfill(response=response, headers=headers)


def response_headers(url: str) -> str:
    """The Content-Type and Content-Disposition the server sends for `url`."""
    with urllib.request.urlopen(url, timeout=30) as response:
        return (f"Content-Type: {response.headers.get('Content-Type')}; "
                f"Content-Disposition: {response.headers.get('Content-Disposition')}")  # fmt: skip


# ---------------------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="folder with (or for) mlflow.db; default: a new temp folder")
    parser.add_argument("--out", type=Path, default=Path("ui-screenshots"), help="folder for the PNGs")
    parser.add_argument("--chromium", help="Chromium binary (default: `chromium` on PATH)")
    parser.add_argument("--port", type=int, help="port for mlflow server (default: a free one)")
    parser.add_argument("--only", help="comma-separated page names to take, e.g. runs-table,report-direct")
    args = parser.parse_args()

    store = (args.store or Path(tempfile.mkdtemp(prefix="dialogsum-ui-"))).resolve()
    store.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("No Chromium found: apt-get install -y chromium fonts-noto-cjk, or pass --chromium")

    ensure_pipeline(store)
    targets = find_targets(store)
    root = artifact_root(store, targets["experiment"])
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = out / "mlflow-server.log"
    server = start_server(store, root, port, server_log)
    try:
        wait_healthy(base, server)
        print(f"mlflow server at {base} (store {store}, artifacts {root}, log {server_log})", flush=True)
        only = set(args.only.split(",")) if args.only else None
        take_screenshots(base, chromium, out, targets, only)
    finally:
        stop_server(server)
    print(f"store kept in {store} (reuse it with --store {store})", flush=True)
    return 0


def take_screenshots(base: str, chromium: str, out: Path, targets: dict, only: set[str] | None = None) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses to start as root with its sandbox on.
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            shooter = Shooter(browser, out, only)
            shoot(shooter, base, targets)
        finally:
            browser.close()
            if only is None:
                (out / "index.txt").write_text("\n".join(shooter.lines) + "\n", encoding="utf-8")


def shoot(s: Shooter, base: str, t: dict) -> None:
    """The pages, in the order a user would meet them."""
    exp_id = t["experiment"].experiment_id
    pid = t["parent"].info.run_id
    experiment = f"{base}/#/experiments/{exp_id}"
    run_page = f"{experiment}/runs/{pid}"

    s.shot("experiment-default", "what a new user lands on: the experiment page in MLflow's default (GenAI) view",
           experiment, extra_s=12, tall=False)  # its panels show loading skeletons for a while
    runs = f"{experiment}/runs?workflowType=machine_learning"
    s.shot("runs-table", "the runs table (Model training view), parent collapsed", runs, ANY_RUN_ROW)
    s.shot("runs-table-expanded", "the runs table with the pipeline parent expanded to show its children",
           runs, ANY_RUN_ROW, action=expand_parent(pid))
    s.shot("runs-table-expanded-wide", "the same at 3000 px wide with the Assistant panel closed: more columns",
           runs, ANY_RUN_ROW, action=expand_parent(pid, hide_assistant=True), width=3000)
    charts = f"{runs}&compareRunsMode=CHART"
    s.shot("runs-charts", "the experiment's chart view as it opens (parent collapsed)", charts, ANY_RUN_ROW, extra_s=5)
    # Capped height: 80+ charts in a 7000 px page take minutes to paint here; the first rows tell the story.
    s.shot("runs-charts-expanded", "the chart view with the parent expanded (first rows of the children's charts)",
           charts, ANY_RUN_ROW, action=expand_parent(pid), extra_s=5, max_height=3000)
    s.shot("logged-models", "the experiment's Models tab (logged models)",
           f"{experiment}/models?workflowType=machine_learning", extra_s=5)
    tiny = t["tiny"]
    if tiny and tiny.outputs and tiny.outputs.model_outputs:
        model_id = tiny.outputs.model_outputs[-1].model_id
        s.shot("logged-model", f"the logged model {model_id} of the {TRAINED_MODEL} child",
               f"{experiment}/models/{model_id}", extra_s=5)
    s.shot("parent-run-overview", "the parent run's Overview, reached by clicking its name in the runs table", runs,
           ANY_RUN_ROW, action=click_run_link(pid), extra_s=4)
    for name in ("report.html", "matrix.html"):
        s.shot(f"{name.split('.')[0]}-artifact-viewer", f"the parent's {name} in the run page's artifact viewer",
               f"{run_page}/artifacts/{name}", extra_s=5)
    for name in ("report.html", "matrix.html"):
        route = f"{base}/get-artifact?{urlencode({'path': name, 'run_uuid': pid})}"
        s.shot(f"{name.split('.')[0]}-direct", f"{name} from the download route /get-artifact, rendered by the browser "
               f"({response_headers(route)})", route, extra_s=2, route=route)  # fmt: skip
    if "matrix.png" in t["parent_artifacts"]:
        s.shot("matrix-png-artifact-viewer", "the parent's matrix.png in the artifact viewer",
               f"{run_page}/artifacts/matrix.png", extra_s=4, tall=False)
    if tiny:
        s.shot("child-predictions-json", f"predictions.json (Korean dialogues and summaries) of the {TRAINED_MODEL} "
               "child in the artifact viewer", f"{experiment}/runs/{tiny.info.run_id}/artifacts/predictions.json",
               extra_s=5)  # fmt: skip
    if t["log_artifact"]:
        child, path = t["log_artifact"]
        s.shot("child-log-artifact", f"log artifact {path} of child {child.info.run_name} in the artifact viewer",
               f"{experiment}/runs/{child.info.run_id}/artifacts/{path}", extra_s=5)
    if tiny:
        page = f"{experiment}/runs/{tiny.info.run_id}"
        s.shot("train-child-metrics", f"the {TRAINED_MODEL} training child's Model metrics tab",
               f"{page}/model-metrics", extra_s=6)
        s.shot("train-child-system-metrics", f"the {TRAINED_MODEL} training child's System metrics tab",
               f"{page}/system-metrics", extra_s=5)
        s.shot("train-child-overview", f"the {TRAINED_MODEL} training child's Overview tab", page, extra_s=4)
        s.shot("train-child-artifacts", f"the {TRAINED_MODEL} training child's Artifacts tab", f"{page}/artifacts",
               extra_s=4, tall=False)
    if len(t["train"]) > 1:
        # The UI's own link: ?runs=<JSON list of run ids>&experiments=<JSON list of experiment ids>.
        runs_json = quote(json.dumps([r.info.run_id for r in t["train"]]))
        s.shot("compare-train-children", "the Compare view of the training children",
               f"{base}/#/compare-runs?runs={runs_json}&experiments={quote(json.dumps([exp_id]))}", extra_s=6)
    s.shot("model-registry", "the Model registry list", f"{base}/#/models", extra_s=4, tall=False)
    if t["registered"]:
        name = t["registered"].name
        s.shot("registered-model", f"the registered model {name}", f"{base}/#/models/{quote(name)}", extra_s=4)
        for version in t["registered"].latest_versions[:1]:
            s.shot("model-version", f"version {version.version} of {name}",
                   f"{base}/#/models/{quote(name)}/versions/{version.version}", extra_s=4)


if __name__ == "__main__":
    sys.exit(main())
