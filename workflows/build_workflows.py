"""Write the example workflows: API-format graphs (``*_api.json``, used by tests/test_comfyui_integration.py) and
their UI-format twins (``*.json``, to drag into ComfyUI).

The UI format stores widget values by position, so it is generated from a live server's ``/object_info``; every
seed's "control after generate" widget is stored as "fixed" (the EMS seed is part of the EMS cache key):

    python workflows/build_workflows.py object_info.json      # curl http://127.0.0.1:8188/object_info > ...

Sampler-node widget values come from nodes/options.py (their defaults), so the workflows follow the nodes.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
FLOW_CHECKPOINT = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"


def _options_module():
    spec = importlib.util.spec_from_file_location("_dpm_solver_nodes_options", HERE.parent / "nodes" / "options.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _common():
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode",
              "inputs": {"text": "a watercolor painting of a lighthouse at dawn", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    }


def _decode_and_save(graph, samples, first_id, prefix):
    graph[str(first_id)] = {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": ["1", 2]}}
    graph[str(first_id + 1)] = {"class_type": "SaveImage",
                                "inputs": {"images": [str(first_id), 0], "filename_prefix": prefix}}


def api_workflows():
    options = _options_module()
    workflows = {}

    graph = _common()
    graph["5"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 0, "steps": 10, "cfg": 7.5, "sampler_name": "dpmsolver_v3", "scheduler": "karras",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    _decode_and_save(graph, ["5", 0], 6, "dpm_solver_v3")
    workflows["txt2img_dpm_solver_v3"] = graph

    graph = _common()
    graph["5"] = {"class_type": "BasicScheduler",
                  "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 10, "denoise": 1.0}}
    node = 10
    for spec in options.SAMPLER_NODES:
        graph[str(node)] = {"class_type": spec.node_id, "inputs": options.widget_defaults(spec),
                            "_meta": {"title": spec.display_name}}
        graph[str(node + 1)] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 0, "cfg": 7.5, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": [str(node), 0], "sigmas": ["5", 0], "latent_image": ["4", 0]}}
        _decode_and_save(graph, [str(node + 1), 0], node + 2, "samplercustom_" + spec.node_id.split("_", 1)[1])
        node += 10
    workflows["samplercustom_all_samplers"] = graph

    graph = _common()
    graph["5"] = {"class_type": "DPMSolverNodes_ComputeEMS", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 7.5, "width": 512, "height": 512,
        "grid_size": 180, "sample_count": 4, "reduction": "per_channel", "seed": 0, "x0_steps": 20,
        "batch_size": 0, "guidance": "guided", "jvp": "auto", "filename_prefix": "sd15_cfg7.5", "recompute": False}}
    graph["6"] = {"class_type": "DPMSolverNodes_SaveEMS", "inputs": {"ems": ["5", 0], "filename": "sd15_cfg7.5"}}
    v3 = next(spec for spec in options.SAMPLER_NODES if spec.node_id == "DPMSolverNodes_DPMSolverV3")
    graph["7"] = {"class_type": v3.node_id, "inputs": {**options.widget_defaults(v3), "ems": ["5", 0]}}
    graph["8"] = {"class_type": "BasicScheduler",
                  "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 8, "denoise": 1.0}}
    graph["9"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": 0, "cfg": 7.5, "positive": ["2", 0],
        "negative": ["3", 0], "sampler": ["7", 0], "sigmas": ["8", 0], "latent_image": ["4", 0]}}
    _decode_and_save(graph, ["9", 0], 10, "dpm_solver_v3_ems")
    workflows["ems_compute_save_use"] = graph

    # A flow model (SD3.5) on the recommended schedule: the KSampler scheduler entry and the SIGMAS node.
    graph = _common()
    graph["1"]["inputs"]["ckpt_name"] = FLOW_CHECKPOINT
    graph["4"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}}
    graph["5"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    graph["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["5", 0], "seed": 0, "steps": 20, "cfg": 4.5, "sampler_name": "dpmsolver_pp_2m",
        "scheduler": "dpm_solver_recommended", "positive": ["2", 0], "negative": ["3", 0],
        "latent_image": ["4", 0], "denoise": 1.0}}
    _decode_and_save(graph, ["6", 0], 7, "flow_recommended_ksampler")
    graph["10"] = {"class_type": "DPMSolverNodes_RecommendedSigmas", "inputs": {
        "model": ["5", 0], "steps": 20, "denoise": 1.0, "sigma_min": 0.0, "sigma_max": 0.0}}
    graph["11"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmsolver_pp_3m"}}
    graph["12"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["5", 0], "add_noise": True, "noise_seed": 0, "cfg": 4.5, "positive": ["2", 0],
        "negative": ["3", 0], "sampler": ["11", 0], "sigmas": ["10", 0], "latent_image": ["4", 0]}}
    _decode_and_save(graph, ["12", 0], 13, "flow_recommended_sigmas_node")
    workflows["txt2img_flow_recommended"] = graph
    return workflows


def _has_control_widget(name, spec):
    """Whether the frontend adds a "control after generate" combo after this widget, which then takes the next
    widgets_values slot: an explicit ``control_after_generate`` flag, else (when the flag is absent) every INT input
    named seed or noise_seed (comfyui-frontend-package 1.27.10, useIntWidget)."""
    flag = spec[1].get("control_after_generate") if len(spec) > 1 else None
    if flag is None:
        return spec[0] == "INT" and name in ("seed", "noise_seed")
    return bool(flag)


def _is_widget(spec):
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ui_workflow(graph, object_info):
    """LiteGraph (UI) format of an API graph: link inputs become links, widget inputs widgets_values."""
    ids = {key: index + 1 for index, key in enumerate(graph)}
    depth = {}

    def node_depth(key):
        if key not in depth:
            sources = [value[0] for value in graph[key]["inputs"].values() if isinstance(value, list)]
            depth[key] = 1 + max((node_depth(s) for s in sources), default=-1)
        return depth[key]

    links, nodes, outputs = [], [], {}
    rows = {}
    for order, key in enumerate(sorted(graph, key=node_depth)):
        entry = graph[key]
        info = object_info[entry["class_type"]]
        inputs, widgets = [], []
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order_names = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        for name in order_names:
            spec = declared[name]
            value = entry["inputs"].get(name)
            if _is_widget(spec):
                if name not in entry["inputs"]:
                    value = spec[1].get("default") if len(spec) > 1 else None
                widgets.append(value)
                if _has_control_widget(name, spec):
                    widgets.append("fixed")
                continue
            link_id = None
            if isinstance(value, list):
                source = graph[value[0]]
                source_type = object_info[source["class_type"]]["output"][value[1]]
                link_id = len(links) + 1
                links.append([link_id, ids[value[0]], value[1], ids[key], len(inputs), source_type])
                outputs.setdefault((value[0], value[1]), []).append(link_id)
            inputs.append({"name": name, "type": spec[0], "link": link_id})
        column = node_depth(key)
        row = rows.get(column, 0)
        rows[column] = row + 1
        node = {"id": ids[key], "type": entry["class_type"], "pos": [60 + 380 * column, 60 + 300 * row],
                "size": [340, 260], "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": [],
                "properties": {"Node name for S&R": entry["class_type"]}, "widgets_values": widgets}
        if "_meta" in entry:
            node["title"] = entry["_meta"]["title"]
        nodes.append(node)
    for node, key in zip(nodes, sorted(graph, key=node_depth)):
        info = object_info[graph[key]["class_type"]]
        for slot, (kind, name) in enumerate(zip(info["output"], info["output_name"])):
            node["outputs"].append({"name": name, "type": kind, "links": outputs.get((key, slot), []),
                                    "slot_index": slot})
    nodes.sort(key=lambda n: n["id"])
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def write(path, data):
    path.write_text(json.dumps(data, indent=1) + "\n")


def main(argv):
    workflows = api_workflows()
    object_info = json.loads(pathlib.Path(argv[1]).read_text()) if len(argv) > 1 else None
    for name, graph in workflows.items():
        write(HERE / f"{name}_api.json", graph)
        if object_info is not None:
            write(HERE / f"{name}.json", ui_workflow(graph, object_info))
    print("wrote", ", ".join(workflows), "(API" + (" + UI)" if object_info is not None else " only)"))


if __name__ == "__main__":
    main(sys.argv)
