"""Integration tests against a real ComfyUI (docs/hosts.md 2): a headless CPU server with this checkout loaded as a
custom node pack, driven over its HTTP API with the API-format workflows in workflows/.

Set COMFYUI_DIR to a ComfyUI checkout (tested: v0.3.64, a125cd84) and COMFYUI_PYTHON to a Python that has its
requirements (default: this interpreter); without COMFYUI_DIR every test here is skipped.  The server and its tiny
checkpoint (random weights in the SD1.5 layout: a 25.8 M UNet with channel_mult [1], a full CLIP-L, a TAESD VAE;
~300 MB, written to COMFYUI_TEST_CACHE or a temporary folder, never committed) come from tests/comfyui_host.py; the
tests also use a flow variant of it through ModelSamplingSD3.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from comfyui_host import CHECKPOINT, COMFYUI_DIR, SKIP_REASON, WORKFLOWS, comfyui_server

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason=SKIP_REASON)

CFG = 5.0
STEPS = 8
LATENT = (2, 4, 4, 4)  # EmptyLatentImage 32x32, batch 2 (the UNet has no downsampling; CPU time ~ pixels)
SIZE = 32



# ---- server ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with comfyui_server(tmp_path_factory) as instance:
        yield instance


# ---- graphs ---------------------------------------------------------------------------------------------------

def _workflow(name):
    return json.loads((WORKFLOWS / f"{name}_api.json").read_text())


def _tiny(graph):
    """A shipped workflow on the tiny checkpoint: 32x32 batch 2, cfg 5, 8 steps, latents saved instead of images."""
    graph = json.loads(json.dumps(graph))
    for key, node in list(graph.items()):
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT
        elif node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            node["class_type"] = "EmptyLatentImage"  # the tiny checkpoint has 4 latent channels (SD3: 16)
            inputs.update(width=SIZE, height=SIZE, batch_size=LATENT[0])
        elif node["class_type"] in ("KSampler", "SamplerCustom"):
            inputs["cfg"] = CFG
        elif node["class_type"] in ("BasicScheduler", "DPMSolverNodes_RecommendedSigmas"):
            inputs["steps"] = STEPS
        if node["class_type"] == "KSampler":
            inputs["steps"] = STEPS
    for key, node in list(graph.items()):
        if node["class_type"] == "VAEDecode":
            save = next(k for k, n in graph.items() if n["inputs"].get("images") == [key, 0])
            del graph[save]
            graph[key] = {"class_type": "SaveLatent",
                          "inputs": {"samples": node["inputs"]["samples"], "filename_prefix": f"tests/n{key}"}}
    return graph


def _ksampler(graph, key, model, sampler, steps, scheduler, seed=0):
    graph[key] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": CFG, "sampler_name": sampler, "scheduler": scheduler,
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    graph[key + "s"] = {"class_type": "SaveLatent", "inputs": {"samples": [key, 0], "filename_prefix": f"tests/{key}"}}


def _relative_error(x, reference):
    return float((x - reference).norm() / reference.norm())


RESULTS = {}  # latents shared between tests (module order): degenerate-EMS v3 result for the EMS test


# ---- tests ----------------------------------------------------------------------------------------------------

def test_object_info_lists_nodes_and_dropdown_entries(server):
    from dpm_solver_nodes.nodes.options import DROPDOWN_SAMPLERS, SAMPLER_NODES

    info = server.get("/object_info")
    ours = [spec.node_id for spec in SAMPLER_NODES] + [
        "DPMSolverNodes_ComputeEMS", "DPMSolverNodes_LoadEMS", "DPMSolverNodes_SaveEMS"]
    for node_id in ours:
        assert node_id in info, f"{node_id} missing from /object_info"
        assert "dpm_solver_nodes" in info[node_id]["python_module"]
    for spec in SAMPLER_NODES:
        assert info[spec.node_id]["output"] == ["SAMPLER"]
        assert info[spec.node_id]["category"] == "sampling/custom_sampling/samplers"
    for node in ("KSampler", "KSamplerSelect"):
        names = info[node]["input"]["required"]["sampler_name"][0]
        for entry in DROPDOWN_SAMPLERS:
            assert names.count(entry) == 1, f"{entry} appears {names.count(entry)} times in {node}"
        assert "euler" in names and "uni_pc_bh2" in names  # built-ins untouched
    for node in ("KSampler", "BasicScheduler"):  # the scheduler entry, once, after the built-ins
        names = info[node]["input"]["required"]["scheduler"][0]
        assert names.count("dpm_solver_recommended") == 1 and names[0] == "simple", names
    assert info["DPMSolverNodes_RecommendedSigmas"]["output"] == ["SIGMAS"]
    log = server.log()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if "dpm_solver_nodes" in l)
    assert "Cannot import" not in "\n".join(l for l in log.splitlines() if "dpm_solver_nodes" in l)


def test_ui_workflows_match_the_live_node_definitions(server):
    """The UI-format twins store widget values by position: check every node's count against /object_info, and that
    every link's type is the one its source node outputs."""
    info = server.get("/object_info")
    for path in sorted(WORKFLOWS.glob("*.json")):
        if path.name.endswith("_api.json"):
            continue
        workflow = json.loads(path.read_text())
        nodes = {node["id"]: node for node in workflow["nodes"]}
        for node in workflow["nodes"]:
            definition = info[node["type"]]
            declared = {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}
            widgets = 0
            for name in definition["input_order"].get("required", []) + definition["input_order"].get("optional",
                                                                                                       []):
                spec = declared[name]
                if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                    widgets += 1 + bool(len(spec) > 1 and spec[1].get("control_after_generate"))
            assert len(node["widgets_values"]) == widgets, f"{path.name}: node {node['id']} ({node['type']})"
        for link_id, source, slot, target, _target_slot, kind in workflow["links"]:
            assert info[nodes[source]["type"]]["output"][slot] == kind, f"{path.name}: link {link_id}"
            assert target in nodes
        api = json.loads((WORKFLOWS / path.name.replace(".json", "_api.json")).read_text())
        assert sorted(n["type"] for n in workflow["nodes"]) == sorted(n["class_type"] for n in api.values())


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_dropdown_entries_run_on_eps_and_flow_without_ems(server, kind):
    """Every dropdown entry, 8 steps, cfg 5, from the same seed: finite, right shape; on EPS the higher-order ODE
    entries land closer to a 12-step Heun reference (23 calls) than 8-step Euler does, and dpmsolver_pp_2m
    reproduces the built-in dpmpp_2m; on flow they stay within the reference's own error.  All errors are printed
    (pytest -s)."""
    from dpm_solver_nodes.nodes.options import DROPDOWN_SAMPLERS

    graph = _tiny(_workflow("txt2img_dpm_solver_v3"))
    for key in [k for k, n in graph.items() if n["class_type"] in ("KSampler", "SaveLatent")]:
        del graph[key]
    model = ["1", 0]
    scheduler = "karras"
    if kind == "flow":
        graph["20"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
        model, scheduler = ["20", 0], "simple"
    _ksampler(graph, "30", model, "heun", 12, scheduler)
    _ksampler(graph, "31", model, "euler", STEPS, scheduler)
    _ksampler(graph, "32", model, "dpmpp_2m", STEPS, scheduler)
    entries = sorted(DROPDOWN_SAMPLERS)
    for index, name in enumerate(entries):
        _ksampler(graph, str(40 + index), model, name, STEPS, scheduler)
    started = time.perf_counter()
    latents = server.latents(server.run(graph))
    seconds = time.perf_counter() - started
    reference, euler, builtin_2m = latents["30s"], latents["31s"], latents["32s"]
    errors = {}
    for index, name in enumerate(entries):
        result = latents[f"{40 + index}s"]
        assert result.shape == LATENT and torch.isfinite(result).all(), name
        errors[name] = _relative_error(result, reference)
    euler_error, builtin_error = _relative_error(euler, reference), _relative_error(builtin_2m, reference)
    print(f"\n[comfyui {kind}] {seconds:.1f} s; relative error vs heun-12: euler-8 {euler_error:.3g}, built-in "
          f"dpmpp_2m-8 {builtin_error:.3g}; " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    for name in ("dpmsolver_v3", "dpmsolver_pp_2m", "dpmsolver_pp_2s", "dpmsolver_3s", "dpmsolver_adaptive"):
        if kind == "eps":
            assert errors[name] < euler_error, f"{name}: {errors[name]:.3g} vs euler {euler_error:.3g}"
        else:  # measured: every 8-step sampler, Euler included, is 0.044-0.052 from Heun-12, the reference's own
            # error on this model; a sampler that missed the CONST parameterization would solve another ODE
            assert errors[name] < 2 * euler_error, f"{name}: {errors[name]:.3g} vs euler {euler_error:.3g}"
    if kind == "eps":
        ours = latents[f"{40 + entries.index('dpmsolver_pp_2m')}s"]
        assert torch.allclose(ours, builtin_2m, rtol=1e-4, atol=1e-4 * float(builtin_2m.abs().max()))
    for name in ("dpmsolver_pp_2m_sde", "dpmsolver_pp_3m_sde"):  # noise was injected
        assert errors[name] > 10 * errors["dpmsolver_pp_2m"]
    assert "no EMS stored for this model" in server.log()  # the v3 fallback was logged
    # ... saying what ran (a WARNING: tests/test_comfyui_adapter.py; ComfyUI's console prints messages only)
    assert "DPM-Solver-v3 without EMS: l = 1, s = b = 0" in server.log()


def test_sampler_nodes_in_sampler_custom_match_the_dropdown(server):
    """The SamplerCustom workflow with every sampler node; the 2M and v3 nodes with default widgets give the same
    latents as their KSampler dropdown entries (same seed, same karras sigmas from BasicScheduler)."""
    from dpm_solver_nodes.nodes.options import SAMPLER_NODES

    graph = _tiny(_workflow("samplercustom_all_samplers"))
    _ksampler(graph, "200", ["1", 0], "dpmsolver_pp_2m", STEPS, "karras")  # ids above the workflow's
    _ksampler(graph, "201", ["1", 0], "dpmsolver_v3", STEPS, "karras")
    started = time.perf_counter()
    latents = server.latents(server.run(graph))
    seconds = time.perf_counter() - started
    by_node = {}
    for key, node in graph.items():
        if node["class_type"] == "SamplerCustom":
            sampler = graph[node["inputs"]["sampler"][0]]["class_type"]
            save = next(k for k, n in graph.items() if n["inputs"].get("samples") == [key, 0])
            by_node[sampler] = latents[save]
    assert sorted(by_node) == sorted(spec.node_id for spec in SAMPLER_NODES)
    for node_id, result in by_node.items():
        assert result.shape == LATENT and torch.isfinite(result).all(), node_id
    print(f"\n[comfyui SamplerCustom] {len(by_node)} sampler nodes in {seconds:.1f} s")
    assert torch.allclose(by_node["DPMSolverNodes_DPMSolverPP2M"], latents["200s"], rtol=1e-5, atol=1e-5)
    assert torch.allclose(by_node["DPMSolverNodes_DPMSolverV3"], latents["201s"], rtol=1e-5, atol=1e-5)
    RESULTS["v3_without_ems"] = by_node["DPMSolverNodes_DPMSolverV3"]


def _ems_outputs(entry):
    return [item for output in entry["outputs"].values() for item in output.get("ems", []) if "source" in item]


def test_ems_computed_in_graph_is_cached_reused_and_recomputed_for_another_model(server):
    graph = _tiny(_workflow("ems_compute_save_use"))
    compute = next(k for k, n in graph.items() if n["class_type"] == "DPMSolverNodes_ComputeEMS")
    graph[compute]["inputs"].update(cfg=CFG, width=SIZE, height=SIZE, grid_size=50, sample_count=4, x0_steps=2,
                                    batch_size=2, filename_prefix="run1")  # the least N checked at K 4
    sampled = next(k for k, n in graph.items() if n["class_type"] == "SaveLatent")

    started = time.perf_counter()
    first = server.run(graph)
    first_seconds = time.perf_counter() - started
    (info,) = _ems_outputs(first)
    assert info["source"] == "computed"
    # the cost up front in the log, the outcome as the node's text and "summary" output
    assert "model calls of up to 2 samples" in next(line for line in server.log().splitlines()
                                                     if "computing EMS (N=50, K=4" in line)
    (summary,) = first["outputs"][compute]["text"]
    assert summary.startswith("DPM-Solver-v3 with these EMS: ") and "every step" not in summary and "\nEMS computed in " in summary
    stored = sorted(p.name for p in server.ems_dir.glob("*.safetensors"))
    assert info["file"] in stored and "sd15_cfg7.5.safetensors" in stored  # compute node cache + SaveEMS
    from dpm_solver_nodes.stats import load_ems

    ems = load_ems(server.ems_dir / info["file"])
    assert ems.metadata["fingerprint"] == info["fingerprint"] and ems.metadata["model_kind"] == "eps"
    assert float(ems.metadata["cfg"]) == CFG and ems.stat_shape == (4, 1, 1)
    with_ems = server.latents(first)[sampled]
    assert with_ems.shape == LATENT and torch.isfinite(with_ems).all()
    if "v3_without_ems" in RESULTS:  # the EMS change the result
        assert not torch.allclose(with_ems, RESULTS["v3_without_ems"], rtol=1e-3, atol=1e-3)

    # 2: a changed file-name prefix makes ComfyUI run the node again; the EMS come from the file (same cache key)
    graph[compute]["inputs"]["filename_prefix"] = "run2"
    _ksampler(graph, "200", ["1", 0], "dpmsolver_v3", STEPS, "karras")  # finds the EMS by fingerprint
    started = time.perf_counter()
    second = server.run(graph)
    second_seconds = time.perf_counter() - started
    (info2,) = _ems_outputs(second)
    assert info2["source"] == "cached" and info2["file"] == info["file"]
    assert f"\nEMS loaded from {info['file']}" in second["outputs"][compute]["text"][0]
    latents = server.latents(second)
    scale = float(with_ems.abs().max())
    # the file stores l, s, b in float32, run 1 sampled with the float64 estimate: equal to ~1e-6
    assert torch.allclose(latents[sampled], with_ems, rtol=1e-5, atol=1e-5 * scale)
    assert torch.allclose(latents["200s"], latents[sampled], rtol=1e-6, atol=1e-6 * scale)  # dropdown == node

    # 3: another model (zero-terminal-SNR sigmas) -> another fingerprint -> computed anew
    graph["210"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "eps",
                                                                      "zsnr": True}}
    graph[compute]["inputs"]["model"] = ["210", 0]
    started = time.perf_counter()
    third = server.run(graph)
    third_seconds = time.perf_counter() - started
    (info3,) = _ems_outputs(third)
    assert info3["source"] == "computed" and info3["fingerprint"] != info["fingerprint"]
    assert info3["file"] != info["file"] and (server.ems_dir / info3["file"]).exists()
    print(f"\n[comfyui EMS] computed+sampled {first_seconds:.1f} s (EMS {info['seconds']:.1f} s), cached "
          f"{second_seconds:.1f} s (EMS {info2['seconds']:.2f} s), other model {third_seconds:.1f} s")


def test_load_ems_node_lists_and_loads_stored_files(server):
    info = server.get("/object_info/DPMSolverNodes_LoadEMS")
    names = info["DPMSolverNodes_LoadEMS"]["input"]["required"]["ems_name"][0]
    stored = sorted(p.name for p in server.ems_dir.glob("*.safetensors"))
    assert stored and sorted(names) == stored
    graph = _tiny(_workflow("ems_compute_save_use"))
    compute = next(k for k, n in graph.items() if n["class_type"] == "DPMSolverNodes_ComputeEMS")
    del graph[compute]
    for key in [k for k, n in graph.items() if n["class_type"] == "DPMSolverNodes_SaveEMS"]:
        del graph[key]
    graph[compute] = {"class_type": "DPMSolverNodes_LoadEMS", "inputs": {"ems_name": "sd15_cfg7.5.safetensors"}}
    latents = server.latents(server.run(graph))
    (result,) = latents.values()
    assert result.shape == LATENT and torch.isfinite(result).all()


def test_interrupt_stops_an_ems_computation_without_writing_a_file(server):
    """ComfyUI's Interrupt (POST /interrupt) stops the EMS node within a model call or two; nothing is stored."""
    graph = _tiny(_workflow("ems_compute_save_use"))
    compute = next(k for k, n in graph.items() if n["class_type"] == "DPMSolverNodes_ComputeEMS")
    graph[compute]["inputs"].update(cfg=CFG, width=SIZE, height=SIZE, grid_size=400, sample_count=64, x0_steps=50,
                                    batch_size=2, filename_prefix="interrupted", recompute=True)
    before = sorted(p.name for p in server.ems_dir.iterdir()) if server.ems_dir.exists() else []
    status, body = server.post("/prompt", {"prompt": graph, "client_id": "dpm_solver_nodes_tests"})
    assert status == 200, body
    prompt_id = body["prompt_id"]
    deadline = time.time() + 300
    while "computing EMS (N=400" not in server.log():
        assert time.time() < deadline, "the EMS node never started"
        time.sleep(0.25)
    time.sleep(1.0)
    interrupted = time.perf_counter()
    assert server.post("/interrupt", {})[0] == 200
    while True:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and (entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
            break
        assert time.perf_counter() - interrupted < 120, "Interrupt did not stop the EMS computation"
        time.sleep(0.25)
    stopped = time.perf_counter() - interrupted
    assert not entry["status"].get("completed")
    assert any(message[0] == "execution_interrupted" for message in entry["status"]["messages"])
    after = sorted(p.name for p in server.ems_dir.iterdir()) if server.ems_dir.exists() else []
    assert after == before  # no file, no temp file left
    print(f"\n[comfyui interrupt] stopped {stopped:.1f} s after POST /interrupt")


def test_flow_workflow_on_the_recommended_schedule(server):
    """workflows/txt2img_flow_recommended on the tiny checkpoint made a flow model by ModelSamplingSD3: the KSampler
    scheduler entry and the SIGMAS node give the same sigmas (same latents as the KSampler entry with the same
    sampler), and the schedule differs from the host's "simple" one."""
    graph = _tiny(_workflow("txt2img_flow_recommended"))
    _ksampler(graph, "200", ["5", 0], "dpmsolver_pp_3m", STEPS, "dpm_solver_recommended")
    _ksampler(graph, "201", ["5", 0], "dpmsolver_pp_2m", STEPS, "simple")
    latents = server.latents(server.run(graph))
    ksampler, node = latents["7"], latents["13"]
    for result in (ksampler, node):
        assert result.shape == LATENT and torch.isfinite(result).all()
    assert torch.allclose(node, latents["200s"], rtol=1e-5, atol=1e-5)       # SIGMAS node == scheduler entry
    assert not torch.allclose(ksampler, latents["201s"], rtol=1e-3, atol=1e-3)  # another schedule than "simple"
