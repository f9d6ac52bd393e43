"""Identity of the model a ComfyUI MODEL (a ``ModelPatcher``) samples: the key EMS are stored and found under.

A MODEL carries no file name or hash (docs/hosts.md 1.6), so the fingerprint is built from what determines the
denoiser's output, each part cheap to read (about a millisecond for SD1.5):

  weights        every value of every *base* weight (``stats.fingerprint.weights_digest``: exact integer sums of
                 the float16-rounded values, so one checkpoint loaded in fp32 on a CPU or fp16 on a GPU finds the
                 same EMS; about 1-2 s for SD1.5 on one CPU thread, then cached while the tensors and their in-place
                 version counters stay the same).  ComfyUI patches LoRAs into the weights in place while a model is
                 loaded and keeps the originals in ``patcher.backup`` (shared by all clones), so backed-up tensors
                 are read from there: the fingerprint is the same before, during and after sampling.
  weight patches every patched key with its strengths, offset, function and the full-data digest of the patch
                 tensors (LoRA, LoCon, diff, ...), so a LoRA or a different LoRA strength gives another fingerprint.
  model_sampling its class hierarchy, a digest of its sigma table (covers ModelSamplingDiscrete zero-SNR,
                 ModelSamplingSD3/Flux shift) and its scalar parameters.
  object patches the names and classes of other object patches.
  architecture   the BaseModel and model-config classes, the latent format and its channel count.

Everything is read by value, never by ``id()``, so the fingerprint is stable across restarts.
"""
from __future__ import annotations

import hashlib

import torch

from ..stats.fingerprint import CachedWeightsDigest, tensor_sums, sigma_digest

_WEIGHTS = CachedWeightsDigest()


def _describe(value, sink, depth=0):
    """Feed a stable description of a patch value (tensors, tuples, adapters, numbers, strings) into ``sink``."""
    if depth > 8:
        sink(b"<deep>")
    elif isinstance(value, torch.Tensor):
        sink(b"T" + tensor_sums(value))
    elif isinstance(value, (list, tuple)):
        sink(f"[{len(value)}".encode())
        for item in value:
            _describe(item, sink, depth + 1)
        sink(b"]")
    elif isinstance(value, dict):
        sink(b"{")
        for key in sorted(value, key=str):
            sink(str(key).encode())
            _describe(value[key], sink, depth + 1)
        sink(b"}")
    elif value is None or isinstance(value, (bool, int, float, str)):
        sink(repr(value).encode())
    elif callable(value) and hasattr(value, "__qualname__"):
        sink(f"fn:{getattr(value, '__module__', '')}.{value.__qualname__}".encode())
    else:
        # weight adapters (comfy.weight_adapter.LoRAAdapter, ...) keep their tensors in ``weights``
        sink(f"obj:{type(value).__qualname__}".encode())
        weights = getattr(value, "weights", None)
        if weights is not None:
            _describe(weights, sink, depth + 1)


def _class_names(obj):
    return [cls.__qualname__ for cls in type(obj).__mro__ if cls.__module__ not in ("builtins",)
            and not cls.__module__.startswith("torch")]


def base_weights(patcher, prefix="diffusion_model."):
    """name -> base tensor of the patcher's diffusion model, reading in-place-patched weights from the backup."""
    state = patcher.model.state_dict()
    backup = getattr(patcher, "backup", None) or {}
    weights = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        saved = backup.get(key)
        weights[key] = saved.weight if saved is not None else tensor
    return weights


def _model_sampling(patcher):
    getter = getattr(patcher, "get_model_object", None)
    if getter is not None:
        try:
            return getter("model_sampling")
        except (AttributeError, KeyError):
            pass
    return getattr(patcher.model, "model_sampling", None)


def model_sampling_description(model_sampling, sigma_digest) -> str:
    """Class hierarchy, sigma-table digest and scalar parameters of a model_sampling object."""
    if model_sampling is None:
        return "model_sampling:none"
    parts = ["classes=" + ",".join(_class_names(model_sampling))]
    sigmas = getattr(model_sampling, "sigmas", None)
    if isinstance(sigmas, torch.Tensor):  # rounded to float16: the table may be kept in the model's dtype
        parts.append("sigmas=" + sigma_digest(sigmas.detach().to(torch.float16)))
    for name in ("sigma_min", "sigma_max", "sigma_data", "shift", "multiplier", "zsnr"):
        value = getattr(model_sampling, name, None)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, (bool, int, float)):
            parts.append(f"{name}={float(value):.4g}")
    return ";".join(parts)


def model_fingerprint(patcher) -> str:
    """A hex fingerprint of a ComfyUI ModelPatcher (see the module docstring for what it covers)."""
    base = patcher.model
    latent_format = getattr(base, "latent_format", None)
    extra = [
        "model=" + type(base).__qualname__,
        "config=" + type(getattr(base, "model_config", None)).__qualname__,
        "latent_format=" + type(latent_format).__qualname__,
        f"latent_channels={getattr(latent_format, 'latent_channels', None)}",
        model_sampling_description(_model_sampling(patcher), sigma_digest),
    ]
    patches = hashlib.sha256()
    for key in sorted(getattr(patcher, "patches", {}) or {}):
        patches.update(b"\x00" + key.encode())
        for entry in patcher.patches[key]:
            _describe(entry, patches.update)
    extra.append("weight_patches=" + patches.hexdigest())
    objects = sorted((name, type(obj).__qualname__) for name, obj in (getattr(patcher, "object_patches", {}) or
                                                                        {}).items() if name != "model_sampling")
    extra.append("object_patches=" + repr(objects))
    digest = hashlib.sha256(_WEIGHTS(base_weights(patcher)).encode())
    for item in extra:
        digest.update(b"\x00" + item.encode())
    return digest.hexdigest()[:32]


__all__ = ["model_fingerprint", "base_weights", "model_sampling_description"]
