"""The UI-format workflows in a real browser: ComfyUI's own frontend (comfyui-frontend-package) in headless Chromium,
driven by Selenium, against the headless CPU server of tests/comfyui_host.py.

For every workflows/*.json (not *_api.json): load it as a dropped file is loaded (``app.loadGraphData``), read each
node's widgets back from the graph and compare them by name with the API twin (the file's intent), then set the tiny
test settings in the widgets as a user would, queue it from the page (``app.queuePrompt``) and check that the images
arrive and that the EMS node reports progress while it runs.  Screenshots go to $DPM_TEST_ARTIFACTS (else the
test's temporary folder).

DPM_TIME_SHIPPED_EMS=1 also times the shipped EMS workflow as shipped (only the checkpoint and a 32x32 size changed):
about a minute on a CPU, so it is opt-in; see its docstring for what it asserts.

Needs COMFYUI_DIR (see comfyui_host.py), Debian's chromium + chromium-driver and the selenium package; skips without.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import pytest

from browser_support import BROWSER_MARKS, artifacts_folder, chromium
from comfyui_host import CHECKPOINT, COMFYUI_DIR, SKIP_REASON, WORKFLOWS, comfyui_server

pytestmark = [pytest.mark.skipif(not COMFYUI_DIR, reason=SKIP_REASON), *BROWSER_MARKS]

UI_WORKFLOWS = sorted(p.name for p in WORKFLOWS.glob("*.json") if not p.name.endswith("_api.json"))
CONTROL = "control_after_generate"  # the frontend's combo after a seed widget; never sent to the server
EMS_NODE = "DPMSolverNodes_ComputeEMS"
# What a user would change to run a shipped workflow on the tiny test checkpoint on a CPU, by node type and widget.
TINY = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "EmptyLatentImage": {"width": 16, "height": 16},
    "KSampler": {"steps": 6},
    "BasicScheduler": {"steps": 6},
    "DPMSolverNodes_RecommendedSigmas": {"steps": 6},
    EMS_NODE: {"width": 16, "height": 16, "grid_size": 50, "sample_count": 4, "x0_steps": 2, "batch_size": 2,
               "filename_prefix": "browser"},
    "DPMSolverNodes_SaveEMS": {"filename": "browser"},
}
SETTINGS = {  # a returning user: no template gallery; text drawn at every zoom level; no minimap over the graph
    "Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 1, "Comfy.Minimap.Visible": False}

LISTEN = """
window.__events = [];
for (const type of ['progress', 'executing', 'executed', 'execution_start', 'execution_success', 'execution_error',
                    'execution_interrupted']) {
  app.api.addEventListener(type, e => window.__events.push([type, JSON.parse(JSON.stringify(e.detail ?? null)),
                                                             performance.now() / 1000]));
}
"""
LOAD = """
const done = arguments[arguments.length - 1];
app.loadGraphData(arguments[0]).then(() => done(null), error => done(String(error)));
"""
WIDGETS = "return app.graph._nodes.map(n => [n.id, n.type, (n.widgets ?? []).map(w => [w.name, w.value])]);"
SET_WIDGETS = """
const changes = arguments[0];
for (const node of app.graph._nodes) for (const widget of node.widgets ?? []) {
  const value = changes[node.type]?.[widget.name];
  if (value !== undefined) { widget.value = value; widget.callback?.(value); }
}
app.graph.setDirtyCanvas(true, true);
"""
# The tiny checkpoint has SD1.5's 4 latent channels: a user trying the SD3 workflow on it swaps SD3's 16-channel empty
# latent for an EmptyLatentImage wired to the same inputs (the integration test does the same in API format).
SWAP_SD3_LATENT = """
for (const old of app.graph._nodes.filter(n => n.type === 'EmptySD3LatentImage')) {
  const node = LiteGraph.createNode('EmptyLatentImage');
  node.pos = [...old.pos];
  app.graph.add(node);
  for (const id of [...(old.outputs[0].links ?? [])]) {
    const link = app.graph.links[id] ?? app.graph.links.get?.(id);
    node.connect(0, app.graph.getNodeById(link.target_id), link.target_slot);
  }
  app.graph.remove(old);
}
app.graph.setDirtyCanvas(true, true);
"""
ZOOM_ON = """
const node = app.graph.getNodeById(arguments[0]);
app.canvas.ds.scale = arguments[1];
app.canvas.centerOnNode(node);
app.graph.setDirtyCanvas(true, true);
"""
QUEUE = """
const done = arguments[arguments.length - 1];
app.queuePrompt(0, 1).then(() => done(null), error => done(String(error)));
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with comfyui_server(tmp_path_factory) as instance:
        yield instance


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return artifacts_folder(tmp_path_factory, "browser_comfyui")


@pytest.fixture(scope="module")
def browser(server):
    for name, value in SETTINGS.items():
        assert server.post(f"/settings/{name}", value)[0] == 200
    with chromium("2200,1100", "--disable-gpu") as driver:
        driver.set_script_timeout(60)
        driver.get(server.url)
        deadline = time.time() + 120
        while not driver.execute_script("return !!(window.app && app.graph && app.canvas && app.api)"):
            assert time.time() < deadline, "the ComfyUI frontend did not start in 120 s"
            time.sleep(0.25)
        driver.execute_script(LISTEN)
        yield driver


def _load(browser, name):
    workflow = json.loads((WORKFLOWS / name).read_text())
    error = browser.execute_async_script(LOAD, workflow)
    assert error is None, f"{name}: loadGraphData failed: {error}"
    time.sleep(0.5)  # one frame to draw
    return workflow


def _intent(name):
    """UI node id -> (type, widget inputs of the API twin); build_workflows.py numbers UI nodes in API-key order."""
    api = json.loads((WORKFLOWS / name.replace(".json", "_api.json")).read_text())
    return {index + 1: (node["class_type"], {k: v for k, v in node["inputs"].items() if not isinstance(v, list)})
            for index, node in enumerate(api.values())}


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_dropped_workflow_has_the_intended_widget_values(server, browser, artifacts, name):
    """Every widget the frontend built holds the API twin's value of that name (a widgets_values list one slot short
    or long shifts every later widget); each seed's control widget is "fixed"; no API input is missing."""
    _load(browser, name)
    intent = _intent(name)
    nodes = browser.execute_script(WIDGETS)
    assert sorted(node_id for node_id, _, _ in nodes) == sorted(intent)
    wrong = []
    for node_id, node_type, widgets in nodes:
        expected_type, expected = intent[node_id]
        assert node_type == expected_type, f"{name}: node {node_id}"
        seen = set()
        for widget, value in widgets:
            if widget == CONTROL:
                if value != "fixed":
                    wrong.append(f"node {node_id} {node_type}: {CONTROL} = {value!r}, expected 'fixed'")
                continue
            seen.add(widget)
            if widget in expected and value != expected[widget]:
                wrong.append(f"node {node_id} {node_type}: {widget} = {value!r}, expected {expected[widget]!r}")
        missing = sorted(set(expected) - seen)
        if missing:
            wrong.append(f"node {node_id} {node_type}: no widget for {missing}")
    browser.save_screenshot(str(artifacts / name.replace(".json", "_loaded.png")))
    assert not wrong, f"{name} as loaded by the frontend:\n" + "\n".join(wrong)


def test_new_ems_node_starts_with_a_fixed_seed(server, browser):
    """web/dpm_solver_nodes.js: a freshly added EMS compute node's seed control is "fixed" (the EMS cache key holds
    the seed); a built-in KSampler added the same way keeps the frontend's "randomize"."""
    deadline = time.time() + 30
    while not browser.execute_script("return app.extensions.some(e => e.name === 'dpm_solver_nodes.emsSeedFixed')"):
        assert time.time() < deadline, "web/dpm_solver_nodes.js was not loaded by the frontend"
        time.sleep(0.25)
    controls = browser.execute_script("""
        const found = {};
        for (const type of [arguments[0], 'KSampler']) {
          const node = LiteGraph.createNode(type);
          found[type] = node.widgets.find(w => w.name === arguments[1])?.value ?? null;
        }
        return found;""", EMS_NODE, CONTROL)
    assert controls == {EMS_NODE: "fixed", "KSampler": "randomize"}


PROGRESS_TEXT = "$$node-text-preview"  # the frontend's widget for a node's progress text (server.send_progress_text)
OUTCOME = "ems_outcome"  # web/dpm_solver_nodes.js: the EMS node's outcome box
NODE_TEXTS = """
const node = app.graph.getNodeById(arguments[0]);
const value = name => node?.widgets?.find(w => w.name === name)?.value ?? null;
return [node?.progress ?? null, value(arguments[1]), value(arguments[2])];
"""


def _wait_for_run(browser, timeout, watch=None, screenshot=None, cpu=None):
    """Events of the prompt the page queued, until it succeeds or fails; ``watch`` (a node id) also samples that
    node's progress bar value in the graph (``node.progress``) and its progress text while it runs, and saves
    ``screenshot`` mid-way; ``cpu()`` (the server's CPU seconds) is read when the watched node starts and ends."""
    deadline = time.time() + timeout
    bars, texts, cpu_marks = [], [], {}
    while time.time() < deadline:
        events = browser.execute_script("return window.__events")
        if watch is not None:
            bar, text, _ = browser.execute_script(NODE_TEXTS, watch, PROGRESS_TEXT, OUTCOME)
            if bar is not None and (not bars or bars[-1] != bar):
                bars.append(bar)
                if screenshot is not None and 0 < bar < 1:
                    browser.save_screenshot(str(screenshot))
            if text and (not texts or texts[-1] != text):
                texts.append(text)
            if cpu is not None:
                if "start" not in cpu_marks and any(k == "executing" and d == str(watch) for k, d, *_ in events):
                    cpu_marks["start"] = cpu()
                if "end" not in cpu_marks and any(k == "executed" and d["node"] == str(watch) for k, d, *_ in events):
                    cpu_marks["end"] = cpu()
        if any(kind in ("execution_success", "execution_error", "execution_interrupted") for kind, *_ in events):
            return events, bars, texts, cpu_marks
        time.sleep(0.2)
    pytest.fail(f"the queued workflow did not finish in {timeout} s")


def _cpu_seconds(pid):
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ems_phases(events, node_id):
    """Seconds of the EMS node from its events (page clock): until its first progress event, and in all.  The bar
    counts model rows of the whole job (generation, estimation, tuning or check), so phases are not told apart."""
    start = next(t for kind, detail, t in events if kind == "executing" and detail == node_id)
    end = next(t for kind, detail, t in events if kind == "executed" and detail["node"] == node_id)
    first = next(t for kind, d, t in events if kind == "progress" and d["node"] == node_id)
    return {"total": end - start, "first progress": first - start}


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_workflow_queued_from_the_page_delivers_images_and_shows_progress(server, browser, artifacts, name):
    workflow = _load(browser, name)
    browser.execute_script(SWAP_SD3_LATENT)
    browser.execute_script(SET_WIDGETS, TINY)
    browser.execute_script("window.__events.length = 0")
    ems_nodes = [node["id"] for node in workflow["nodes"] if node["type"] == EMS_NODE]
    started = time.perf_counter()
    assert browser.execute_async_script(QUEUE) is None
    events, bars, texts, _ = _wait_for_run(browser, 900, watch=ems_nodes[0] if ems_nodes else None,
                                           screenshot=artifacts / name.replace(".json", "_running.png"))
    seconds = time.perf_counter() - started
    browser.save_screenshot(str(artifacts / name.replace(".json", "_done.png")))
    errors = [detail for kind, detail, *_ in events if kind == "execution_error"]
    assert not errors, f"{name}: {errors[0].get('exception_message')}\n{''.join(errors[0].get('traceback', []))}"
    (prompt_id,) = {detail["prompt_id"] for kind, detail, *_ in events if kind == "execution_success"}
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    assert entry["status"]["completed"]
    saves = [str(node["id"]) for node in workflow["nodes"] if node["type"] == "SaveImage"]
    for node_id in saves:  # each SaveImage node's image is on disk and was sent to the page
        (image,) = entry["outputs"][node_id]["images"]
        assert (server.output / image["subfolder"] / image["filename"]).stat().st_size > 0
        assert any(kind == "executed" and detail["node"] == node_id for kind, detail, *_ in events), node_id
    shown = browser.execute_script("return Object.keys(app.nodeOutputs ?? {})")
    assert set(saves) <= set(shown), f"images not shown on the nodes: {set(saves) - set(shown)}"
    seeds = {(node_type, widget): value for _, node_type, widgets in browser.execute_script(WIDGETS)
             for widget, value in widgets if widget in ("seed", "noise_seed")}
    assert set(seeds.values()) == {0}, f"a seed changed after queueing (control widget not 'fixed'): {seeds}"
    for node_id in map(str, ems_nodes):  # progress events for the EMS node, rising to their maximum
        values = [(d["value"], d["max"]) for kind, d, *_ in events if kind == "progress" and d["node"] == node_id]
        assert len(values) >= 3, f"EMS node {node_id}: {len(values)} progress events"
        assert [v for v, _ in values] == sorted(v for v, _ in values) and values[-1][0] == values[-1][1]
        assert len(bars) >= 2 and all(0 <= b <= 1 for b in bars), f"progress bar on the node: {bars}"
        (info,) = entry["outputs"][node_id]["ems"]
        (summary,) = entry["outputs"][node_id]["text"]  # the node's "summary" output, also its UI text
        assert summary.startswith("DPM-Solver-v3 with these EMS: ") and "\nEMS computed in " in summary, summary
        # the progress text says the phase and the time left while the node runs, the outcome box what came of it
        assert any(text.startswith("DPM-Solver-v3 EMS, ") and ("left" in text or "timing" in text)
                   for text in texts), texts
        shown = browser.execute_script(NODE_TEXTS, int(node_id), PROGRESS_TEXT, OUTCOME)
        assert shown[2] == summary, shown
        assert shown[1].startswith("EMS computed in "), shown
        phases = _ems_phases(events, node_id)
        print(f"\n[browser] EMS node: {len(values)} progress events, bar values {bars[:6]}..., "
              f"EMS {info['source']}; " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
              + f"; progress texts: {texts[:2]}...; outcome: {summary!r}")
    print(f"\n[browser] {name}: queued to done in {seconds:.1f} s")


@pytest.mark.skipif(not os.environ.get("DPM_TIME_SHIPPED_EMS"),
                    reason="opt-in (DPM_TIME_SHIPPED_EMS=1): the shipped EMS settings take about a minute on a CPU")
def test_shipped_ems_workflow_finishes_in_a_minute(server, browser, artifacts):
    """The shipped EMS workflow (its N, K, x0 steps, batch size, cfg) on the tiny checkpoint at 32x32, queued from the
    page: the issue's target is under 60 s on 2 cores.

    Measured: the EMS node's wall time (its executing -> executed events) and the server's CPU seconds over the same
    span.  With COMFYUI_TEST_THREADS=1 the CPU seconds are the node's time on one free core, whatever else the
    machine runs, and they are asserted (a 2-core machine running only this finishes sooner); otherwise the wall
    time is.  On a shared machine two torch threads on two busy cores ran far slower than one
    (bench/results_comfy_ems_cost.md), so the wall time there says more about the other jobs than about the node."""
    name = "ems_compute_save_use.json"
    workflow = _load(browser, name)
    changes = {"width": 32, "height": 32, "filename_prefix": "shipped"}
    browser.execute_script(SET_WIDGETS, {"CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
                                         "EmptyLatentImage": {"width": 32, "height": 32}, EMS_NODE: changes})
    browser.execute_script("window.__events.length = 0")
    (ems_node,) = [node["id"] for node in workflow["nodes"] if node["type"] == EMS_NODE]
    browser.execute_script(ZOOM_ON, ems_node, 1.4)  # the screenshots show the node's progress text and outcome
    load_before = os.getloadavg()
    assert browser.execute_async_script(QUEUE) is None
    events, _, texts, cpu = _wait_for_run(browser, 3600, watch=ems_node, cpu=lambda: _cpu_seconds(server.pid),
                                          screenshot=artifacts / "shipped_ems_running.png")
    time.sleep(0.5)  # one frame to draw the outcome
    browser.save_screenshot(str(artifacts / "shipped_ems_done.png"))
    errors = [detail for kind, detail, *_ in events if kind == "execution_error"]
    assert not errors, errors[0].get("exception_message")
    phases = _ems_phases(events, str(ems_node))
    cpu_seconds = cpu["end"] - cpu["start"]
    measured = [line for line in server.log().splitlines() if "DPM-Solver-v3 EMS: measured" in line]
    threads = os.environ.get("COMFYUI_TEST_THREADS") or "torch's default"
    print(f"\n[browser] shipped EMS workflow ({changes}), EMS node: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
          + f", server CPU {cpu_seconds:.1f} s (torch threads: {threads}; load average {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after); {measured[-1] if measured else ''}; first texts {texts[:3]}")
    if os.environ.get("COMFYUI_TEST_THREADS") == "1":
        assert cpu_seconds < 60, (cpu_seconds, phases)
    else:
        assert phases["total"] < 60, (phases, cpu_seconds)
