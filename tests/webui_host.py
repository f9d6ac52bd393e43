"""A real AUTOMATIC1111 WebUI server for the browser test (test_browser_webui.py): started headless on the CPU with
``launch.py``, this checkout linked into a temporary data dir's extensions/, and a tiny SD1-layout checkpoint that
the test builds itself with the WebUI's own model classes (nothing is downloaded).

WEBUI_DIR names the checkout (tested: A1111 v1.10.1, 82a973c0, with repositories/ filled as docs/hosts.md section 4
says), WEBUI_PYTHON a Python with its requirements (default: WEBUI_DIR/venv/bin/python, else this interpreter),
WEBUI_TEST_CACHE where the checkpoint is kept between runs (default: a temporary folder), WEBUI_TEST_PORT the port
(default 7911).  Without WEBUI_DIR the tests that use this module skip.

The checkpoint: ``tiny_sd1.safetensors`` with a ``tiny_sd1.yaml`` beside it, which the WebUI reads as the model's
config (``sd_models_config.find_checkpoint_config_near_filename``).  The config is SD1's LatentDiffusion (eps, the
SD1 noise schedule) with a small UNet (32 channels), a small KL autoencoder (32 channels, still 8x downsampling)
and a 2-layer CLIP text encoder of width 64 behind the real CLIP tokenizer, whose files are written from the BPE
merges that the clip-anytorch package ships.  Weights are fan-in scaled normals (seed 0): the images are noise,
but every step of the WebUI's own loading, conditioning, sampling and decoding runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from browser_support import stop_process_group

ROOT = pathlib.Path(__file__).resolve().parents[1]
WEBUI_DIR = os.environ.get("WEBUI_DIR")
SKIP_REASON = "WEBUI_DIR is not set: no AUTOMATIC1111 WebUI checkout to run against (docs/hosts.md section 4)"
IS_FORGE_FAMILY = bool(WEBUI_DIR) and os.path.isdir(os.path.join(WEBUI_DIR, "modules_forge"))
FORGE_SKIP_REASON = ("WEBUI_DIR is a Forge / reForge checkout: the browser test's checkpoint is built from "
                     "A1111's ldm config (repositories/stable-diffusion-stability-ai), which these load differently")
CHECKPOINT = "tiny_sd1.safetensors"
PORT = int(os.environ.get("WEBUI_TEST_PORT", "7911"))


def webui_python():
    explicit = os.environ.get("WEBUI_PYTHON")
    if explicit:
        return explicit
    venv = os.path.join(WEBUI_DIR or "", "venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


TINY_CONFIG = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: jpg
    cond_stage_key: txt
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: false
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_heads: 2
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 64
        use_checkpoint: false
        legacy: false
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {text_encoder}
"""

WRITE_TOKENIZER = r'''
import gzip, json, os


def write_clip_text_files(folder, config):
    # The files of a Hugging Face CLIP text encoder folder without weights: the tokenizer (vocab.json, merges.txt,
    # from the BPE merges that clip-anytorch ships, in the order of its SimpleTokenizer: bytes, bytes + </w>, the
    # merges, the two special tokens) and ``config`` as config.json.
    import clip
    from clip.simple_tokenizer import bytes_to_unicode

    os.makedirs(folder, exist_ok=True)
    bpe = os.path.join(os.path.dirname(clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    files = {"vocab.json": json.dumps({token: i for i, token in enumerate(vocab)}),
             "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
             "tokenizer_config.json": json.dumps(dict(special, model_max_length=77, do_lower_case=True,
                                                      tokenizer_class="CLIPTokenizer")),
             "special_tokens_map.json": json.dumps(special), "config.json": json.dumps(config)}
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(text)
'''

BUILD_CHECKPOINT = WRITE_TOKENIZER + r'''
import sys
webui_dir, folder, config_text = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path[:0] = [os.path.join(webui_dir, "repositories", "stable-diffusion-stability-ai"), webui_dir]
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

text_encoder = os.path.join(folder, "tiny_clip_text")
write_clip_text_files(text_encoder, {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 64, "bos_token_id": 49406,
    "eos_token_id": 49407, "pad_token_id": 49407})
config_path = os.path.join(folder, "tiny_sd1.yaml")
with open(config_path, "w") as handle:
    handle.write(config_text.replace("{text_encoder}", json.dumps(text_encoder)))

import ldm.modules.encoders.modules as encoders
from ldm.util import instantiate_from_config


class TextModel:  # FrozenCLIPEmbedder's CLIPTextModel.from_pretrained(version): the config alone, no weights file
    from_pretrained = staticmethod(lambda path, **kwargs: CLIPTextModel(CLIPTextConfig.from_pretrained(path)))


encoders.CLIPTextModel = TextModel
model = instantiate_from_config(OmegaConf.load(config_path).model)
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.ndim >= 2:  # fan-in scaled normal (zero-initialised output layers would make the UNet output 0)
            p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
        elif name.endswith("weight"):  # normalisation scales
            p.fill_(1.0)
        else:
            p.zero_()
out_path = os.path.join(folder, "tiny_sd1.safetensors")
save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, out_path + ".tmp")
os.replace(out_path + ".tmp", out_path)
'''

# openai/clip-vit-large-patch14 in the Hugging Face cache, what A1111's SD1 config loads its tokenizer (and, with
# --do-not-download-clip, the text encoder's config) from: for real SD1 checkpoints offline.  The tests do not need it.
WRITE_HF_CACHE = WRITE_TOKENIZER + r'''
import sys
from huggingface_hub.constants import HF_HUB_CACHE

text = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
          "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
          "projection_dim": 768}
repository = os.path.join(HF_HUB_CACHE, "models--openai--clip-vit-large-patch14")
revision = "offline-from-clip-anytorch"
write_clip_text_files(os.path.join(repository, "snapshots", revision),
                      {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
                       "text_config": text, "vision_config": vision})
os.makedirs(os.path.join(repository, "refs"), exist_ok=True)
with open(os.path.join(repository, "refs", "main"), "w") as handle:
    handle.write(revision)
print(os.path.join(repository, "snapshots", revision))
'''

# Options a returning user would have: no live previews (their "Approx NN" decoder is a download on SD1 in a fresh
# data dir); the rest are the WebUI's defaults.
TEST_OPTIONS = {"live_previews_enable": False}


class Server:
    def __init__(self, url, data_dir, log_path):
        self.url, self.data_dir, self.log_path = url, data_dir, log_path
        self.ems_dir = data_dir / "models" / "dpm_solver_v3_ems"

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path, data, timeout=600):
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def log(self):
        return self.log_path.read_text(errors="replace")


def build_checkpoint(cache):
    """The tiny checkpoint and its config in ``cache`` (built once); returns the checkpoint's path."""
    checkpoint = cache / CHECKPOINT
    if not (checkpoint.exists() and (cache / "tiny_sd1.yaml").exists()):
        started = time.perf_counter()
        built = subprocess.run([webui_python(), "-c", BUILD_CHECKPOINT, WEBUI_DIR, str(cache), TINY_CONFIG],
                               capture_output=True, text=True, timeout=600, cwd=WEBUI_DIR)
        assert built.returncode == 0, f"building the tiny checkpoint failed:\n{built.stderr[-3000:]}"
        print(f"\n[webui] tiny checkpoint built in {time.perf_counter() - started:.1f} s")
    return checkpoint


@contextlib.contextmanager
def webui_server(tmp_path_factory):
    """Start the WebUI (module fixtures call this) and stop it afterwards."""
    webui_dir = pathlib.Path(WEBUI_DIR)
    if not (webui_dir / "launch.py").is_file():
        pytest.skip(f"WEBUI_DIR={WEBUI_DIR} has no launch.py")
    work = tmp_path_factory.mktemp("webui")
    cache = pathlib.Path(os.environ.get("WEBUI_TEST_CACHE", work))
    cache.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(cache)
    data_dir = work / "data"
    (data_dir / "extensions").mkdir(parents=True)
    (data_dir / "extensions" / "dpm-solver-nodes").symlink_to(ROOT, target_is_directory=True)
    (data_dir / "config.json").write_text(json.dumps(TEST_OPTIONS))
    log_path = work / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": os.environ.get("DPM_TEST_THREADS", "1")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [webui_python(), "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--no-half",
             "--use-cpu", "all", "--do-not-download-clip", "--api", "--port", str(PORT), "--data-dir", str(data_dir),
             "--ckpt", str(checkpoint)],
            cwd=str(webui_dir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    instance = Server(f"http://127.0.0.1:{PORT}", data_dir, log_path)
    try:
        started = time.perf_counter()
        while True:
            if process.poll() is not None:
                pytest.fail(f"the WebUI exited with {process.returncode}:\n{instance.log()[-4000:]}")
            # no request before the WebUI prints its start-up time: a request while it starts (after gradio's
            # launch, before its API is added) makes starlette refuse the API's middleware and the start fails
            if "Startup time:" in instance.log():
                try:
                    if instance.get("/sdapi/v1/sd-models"):
                        break
                except OSError:
                    pass
            if time.perf_counter() - started > 300:
                pytest.fail(f"the WebUI did not start in 300 s:\n{instance.log()[-4000:]}")
            time.sleep(0.5)
        instance.startup_seconds = time.perf_counter() - started
        print(f"\n[webui] server ready in {instance.startup_seconds:.1f} s")
        yield instance
    finally:
        stop_process_group(process)
        if os.environ.get("WEBUI_TEST_KEEP"):
            print(f"[webui] kept {work}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:] == ["--hf-cache"]:
    # WEBUI_DIR=... WEBUI_PYTHON=... python tests/webui_host.py --hf-cache  (docs/hosts.md section 4)
    sys.exit(subprocess.run([webui_python(), "-c", WRITE_HF_CACHE], cwd=WEBUI_DIR).returncode)
