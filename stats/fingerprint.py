"""Fingerprints of model weights and sigma tables: the identity EMS are stored and found under.

``weights_digest`` reads every value of every tensor: each tensor is rounded to float16 (so an fp32 load on a CPU
and an fp16 load on a GPU of the same checkpoint agree) and its bit patterns are summed exactly as integers, as
int16 values and as wrapping uint64 words of four values, which numpy does at memory speed.  Any single changed
value changes the first sum; the sums do not depend on the summation order, so they are the same on every device
and across restarts.  Cost for a full SD1.5 UNet on one CPU thread: README "EMS store" (the measuring command is
``python -m dpm_solver_nodes.stats.fingerprint``).  ``CachedWeightsDigest`` repeats it only when a tensor was
replaced or modified in place (data pointer or torch's version counter changed).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

CHUNK = 1 << 22  # values rounded to float16 at a time


def tensor_sums(tensor: torch.Tensor) -> bytes:
    """Shape, then the exact integer sums of the float16-rounded values' bit patterns (module docstring)."""
    flat = tensor.detach().reshape(-1)
    if flat.is_quantized:
        flat = flat.dequantize()
    total16, total64 = 0, np.uint64(0)
    for lo in range(0, flat.numel(), CHUNK):
        chunk = flat[lo:lo + CHUNK]
        if chunk.is_floating_point() or chunk.is_complex():
            chunk = chunk.to(torch.float16) if chunk.dtype != torch.float16 else chunk
            bits = chunk.cpu().contiguous().view(torch.int16).numpy()
        else:
            bits = chunk.cpu().contiguous().view(torch.uint8).numpy().view(np.int8).astype(np.int16)
        total16 += int(bits.sum(dtype=np.int64))
        usable = bits.size - bits.size % 4
        if usable:
            with np.errstate(over="ignore"):
                total64 = total64 + bits[:usable].view(np.uint64).sum(dtype=np.uint64)
    return f"{tuple(tensor.shape)}|{total16}|{int(total64)};".encode()


def weights_digest(weights) -> str:
    """sha256 over the sorted names, shapes and the full-data sums of every tensor in ``weights`` (name -> tensor;
    non-tensors by repr).  Meta tensors contribute only their shape."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name]
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"{name}={tensor!r};".encode())
        elif tensor.device.type == "meta":
            digest.update(f"{name}:{tuple(tensor.shape)}:meta;".encode())
        else:
            digest.update(f"{name}:".encode() + tensor_sums(tensor))
    return digest.hexdigest()


def _identity(tensor):
    """What the cache keys a tensor by: its address and version counter, and always 61 strided values, because a
    freed checkpoint's address can be reused by another one with the same shapes and a fresh version counter (an id
    or address alone would serve the first checkpoint's digest, and its EMS, for the second).  Inference tensors
    (ComfyUI loads weights under inference_mode) have no version counter."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return repr(type(tensor)), 0, 0
    flat = tensor.detach().reshape(-1)
    values = flat[::max(1, flat.numel() // 61)].float().cpu().numpy().tobytes()
    version = None if tensor.is_inference() else tensor._version
    return tensor.data_ptr(), version, values, tuple(tensor.shape), str(tensor.dtype), str(tensor.device)


class CachedWeightsDigest:
    """``weights_digest`` remembered per exact set of tensors (data pointers and in-place version counters), so a
    host can fingerprint the model at every generation for the cost of reading those counters."""

    def __init__(self, size=8):
        self.size = size
        self._cache = {}

    def __call__(self, weights) -> str:
        key = tuple((name, _identity(weights[name])) for name in sorted(weights))
        if key not in self._cache:
            if len(self._cache) >= self.size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = weights_digest(weights)
        return self._cache[key]


def fingerprint_state_dict(state_dict, extra=()) -> str:
    """A fingerprint of model weights every value influences (``weights_digest``) plus ``extra`` strings (config
    class, ``sigma_digest``, patch keys and strengths, ...): 32 hex digits."""
    digest = hashlib.sha256(weights_digest(state_dict).encode())
    for item in extra:
        digest.update(b"\x00" + str(item).encode())
    return digest.hexdigest()[:32]


def sigma_digest(sigmas) -> str:
    """16 hex digits identifying a sigma table (covers zero-terminal-SNR rescaling and shifts): float64 values
    printed to 9 significant digits, so float32 and float64 copies of one table agree."""
    values = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1).tolist()
    return hashlib.sha256(",".join(f"{v:.9g}" for v in values).encode()).hexdigest()[:16]


def _sd15_unet_shapes():
    """Parameter shapes of the SD1.5 UNet (diffusers' UNet2DConditionModel with SD1.5's config, on meta)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return {name: tuple(p.shape) for name, p in unet.state_dict().items()}


def main():
    """Time ``weights_digest`` on random tensors of the SD1.5 UNet's shapes (fp32 and fp16), one CPU thread."""
    import time

    torch.set_num_threads(1)
    shapes = _sd15_unet_shapes()
    count = sum(int(np.prod(s)) for s in shapes.values())
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.float32):
        weights = {n: torch.randn(s, generator=generator).to(dtype) for n, s in shapes.items()}
        started = time.perf_counter()
        weights_digest(weights)
        seconds = time.perf_counter() - started
        cached = CachedWeightsDigest()
        cached(weights)
        started = time.perf_counter()
        cached(weights)
        again = time.perf_counter() - started
        print(f"SD1.5 UNet, {len(shapes)} tensors, {count / 1e6:.1f}M values, {dtype}: weights_digest {seconds:.2f} s, "
              f"cached repeat {again * 1e3:.1f} ms", flush=True)
        del weights


if __name__ == "__main__":
    main()


__all__ = ["weights_digest", "tensor_sums", "CachedWeightsDigest", "fingerprint_state_dict", "sigma_digest"]
