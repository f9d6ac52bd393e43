"""A real ComfyUI for the host tests (test_comfyui_integration.py, test_browser_comfyui.py): a headless CPU server
with this checkout linked as a custom node pack and a tiny SD1.5-layout checkpoint built from ComfyUI's own classes.

COMFYUI_DIR names the ComfyUI checkout (tested: v0.3.64, a125cd84), COMFYUI_PYTHON a Python with its requirements
(default: this interpreter), COMFYUI_TEST_CACHE where the checkpoint is kept between runs (default: a temporary
folder), COMFYUI_TEST_THREADS the server's torch threads (default: torch's).  Without COMFYUI_DIR the tests that use this module skip (docs/hosts.md section 2).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from browser_support import stop_process_group
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
SKIP_REASON = "COMFYUI_DIR is not set: no ComfyUI checkout to run against (docs/hosts.md section 2)"
CHECKPOINT = "tiny_sd15.safetensors"
# COMFYUI_TEST_THREADS: torch threads of the server.  On a machine shared with other jobs, two threads on two busy
# cores ran far slower than one (bench/results_comfy_ems_cost.md); unset, torch picks one per core as ComfyUI does.
THREADS = os.environ.get("COMFYUI_TEST_THREADS", "")

BUILD_CHECKPOINT = r'''
import sys
comfy_dir, out_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args
args.cpu = True
import torch
import comfy.ops, comfy.sd1_clip, comfy.supported_models, comfy.taesd.taesd
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file

# Detection as SD15 needs context_dim 768, model_channels 320, no linear-in-transformer, no adm; depth is free.
unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                 channel_mult=(1,), num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                 transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
                 use_linear_in_transformer=False, legacy=False, dtype=torch.float32, device="cpu",
                 operations=comfy.ops.disable_weight_init)
clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
vae = comfy.taesd.taesd.TAESD(latent_channels=4)
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for module in (unet, clip, vae):
        for name, p in module.named_parameters():
            if p.ndim >= 2:  # fan-in scaled normal
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # normalisation scales (zero would make the UNet output 0, D = x)
                p.fill_(1.0)
            else:
                p.zero_()
config = comfy.supported_models.SD15({"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False,
                                      "adm_in_channels": None, "use_temporal_attention": False})
state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
state.update(config.process_clip_state_dict_for_saving(clip.state_dict()))
state.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, out_path + ".tmp")
import os
os.replace(out_path + ".tmp", out_path)
'''


# ---- server ---------------------------------------------------------------------------------------------------

class Server:
    def __init__(self, url, base, output, log_path):
        self.url, self.base, self.output, self.log_path = url, base, output, log_path
        self.ems_dir = base / "models" / "dpm_solver_v3_ems"

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path, data):
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def log(self):
        return self.log_path.read_text(errors="replace")

    def run(self, graph, timeout=900):
        """POST /prompt, poll /history; return the history entry (fails the test on a node error)."""
        status, body = self.post("/prompt", {"prompt": graph, "client_id": "dpm_solver_nodes_tests"})
        assert status == 200, f"/prompt rejected the graph: {json.dumps(body)[:3000]}"
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry["status"].get("status_str") == "error":
                errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
                detail = errors[0][1] if errors else entry["status"]
                pytest.fail(f"prompt failed: {detail.get('exception_message', detail) if isinstance(detail, dict) else detail}"
                            f"\n{''.join(detail.get('traceback', [])) if isinstance(detail, dict) else ''}")
            if entry and entry["status"].get("completed"):
                return entry
            time.sleep(0.25)
        pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")

    def latents(self, entry):
        """node id -> latent tensor of every SaveLatent output in a history entry."""
        from safetensors.torch import load_file

        found = {}
        for node, output in entry["outputs"].items():
            for item in output.get("latents", []):
                path = self.output / item["subfolder"] / item["filename"]
                found[node] = load_file(str(path))["latent_tensor"].to(torch.float64)
        return found


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def comfyui_server(tmp_path_factory):
    """Start ComfyUI on a free port (module fixtures call this); stop it and remove its outputs afterwards."""
    comfy_dir = pathlib.Path(COMFYUI_DIR)
    if not (comfy_dir / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py")
    work = tmp_path_factory.mktemp("comfyui")
    cache = pathlib.Path(os.environ.get("COMFYUI_TEST_CACHE", work))
    cache.mkdir(parents=True, exist_ok=True)
    checkpoint = cache / CHECKPOINT
    if not checkpoint.exists():
        started = time.perf_counter()
        built = subprocess.run([COMFYUI_PYTHON, "-c", BUILD_CHECKPOINT, str(comfy_dir), str(checkpoint)],
                               capture_output=True, text=True, timeout=600)
        assert built.returncode == 0, f"building the tiny checkpoint failed:\n{built.stderr[-3000:]}"
        print(f"\n[comfyui] tiny checkpoint built in {time.perf_counter() - started:.1f} s")
    base = work / "base"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    (base / "models" / "checkpoints" / CHECKPOINT).symlink_to(checkpoint)
    (base / "custom_nodes" / "dpm_solver_nodes").symlink_to(ROOT, target_is_directory=True)
    paths = work / "paths.yaml"
    paths.write_text(f"dpm_solver_nodes_tests:\n  base_path: {base}\n  checkpoints: models/checkpoints\n"
                     f"  custom_nodes: custom_nodes\n  dpm_solver_v3_ems: models/dpm_solver_v3_ems\n")
    output, log_path = work / "output", work / "server.log"
    for folder in ("output", "temp", "user"):
        (work / folder).mkdir()
    port = _free_port()
    environment = dict(os.environ)
    if THREADS:  # torch's CPU threads in the server (default: torch's own choice, one per core)
        environment.update(OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--extra-model-paths-config", str(paths), "--output-directory", str(output),
             "--temp-directory", str(work / "temp"), "--user-directory", str(work / "user"),
             "--database-url", "sqlite:///:memory:", "--disable-api-nodes"],
            cwd=str(comfy_dir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment)
    instance = Server(f"http://127.0.0.1:{port}", base, output, log_path)
    instance.pid = process.pid
    try:
        started = time.perf_counter()
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{instance.log()[-4000:]}")
            try:
                instance.get("/system_stats")
                break
            except OSError:
                if time.perf_counter() - started > 180:
                    pytest.fail(f"ComfyUI did not start in 180 s:\n{instance.log()[-4000:]}")
                time.sleep(0.5)
        print(f"\n[comfyui] server ready in {time.perf_counter() - started:.1f} s")
        yield instance
    finally:
        stop_process_group(process)
        if os.environ.get("COMFYUI_TEST_KEEP"):
            print(f"[comfyui] kept {work}")
        else:
            shutil.rmtree(work / "output", ignore_errors=True)
