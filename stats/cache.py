"""A folder of estimated EMS, keyed by everything the statistics depend on (docs/dpm_solver_v3.md sections 3.5, 5).

The key is a small dict: model fingerprint, cfg, guidance mode, reduction, latent shape, N, sigma range, model kind
and the estimator version (plus anything a host adds).  Its canonical JSON is hashed into the file name and also
stored inside the file (metadata ``cache_key``), so a file is only ever served for exactly the key it was written
for: a renamed, corrupt, truncated or mismatching file is logged and ignored.  Writes go to a temporary file in the
same folder and are moved into place with ``os.replace`` (``EMS.save``), so concurrent writers leave one complete
file and readers never see a half-written one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import torch

from .ems import EMS, load_ems
from .estimate import ESTIMATOR_VERSION

logger = logging.getLogger("dpm_solver_nodes")

KEY_FIELDS = ("fingerprint", "cfg", "guidance", "reduction", "latent_shape", "N", "sigma_min", "sigma_max",
              "model_kind", "samples", "estimator_version")
SUFFIX = ".ems.safetensors"


def _canonical(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cache key values must be finite, got {value!r}")
        return float(f"{value:.12g}")
    if isinstance(value, torch.Tensor):
        return _canonical(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise ValueError(f"cache key values must be strings, numbers or lists of them, got {type(value).__name__}")


def make_key(fingerprint, *, cfg, guidance, reduction, latent_shape, N, sigma_min, sigma_max, model_kind="eps",
             samples="diffused", estimator_version=ESTIMATOR_VERSION, **extra):
    """The cache key of one EMS: a dict with the ``KEY_FIELDS`` (``samples`` is ``estimate_ems``'s sample source)
    and any ``extra`` host fields (x0 source, K, dtype, ...).  Numbers are compared to 12 significant digits."""
    key = {"fingerprint": str(fingerprint), "cfg": float(cfg), "guidance": str(guidance),
           "reduction": str(reduction), "latent_shape": [int(v) for v in latent_shape], "N": int(N),
           "sigma_min": float(sigma_min), "sigma_max": float(sigma_max), "model_kind": str(model_kind),
           "samples": str(samples), "estimator_version": str(estimator_version)}
    key.update(extra)
    return key


def key_json(key) -> str:
    """The canonical JSON text of a key (sorted, numbers rounded to 12 significant digits)."""
    if not isinstance(key, dict):
        raise ValueError(f"an EMS cache key must be a dict (see make_key), got {type(key).__name__}")
    missing = [f for f in KEY_FIELDS if f not in key]
    if missing:
        raise ValueError(f"EMS cache key lacks {missing}; build it with make_key")
    return json.dumps({str(k): _canonical(v) for k, v in key.items()}, sort_keys=True, separators=(",", ":"))


class EMSCache:
    """EMS files in the folder ``root``, one per key (see the module docstring).

    ``get(key)`` returns the EMS or None; ``put(key, ems)`` stores it and returns the path; ``entries()`` lists what
    is there; ``path(key)`` is the file a key maps to.
    """

    def __init__(self, root):
        self.root = os.fspath(root)

    def path(self, key) -> str:
        name = hashlib.sha256(key_json(key).encode()).hexdigest()[:32]
        return os.path.join(self.root, name + SUFFIX)

    def get(self, key):
        text = key_json(key)
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        try:
            ems = load_ems(path)
        except (ValueError, OSError) as error:
            logger.warning("DPM-Solver-v3 EMS cache: ignoring unreadable file %s (%s)", path, error)
            return None
        stored = ems.metadata.get("cache_key")
        if stored != text:
            logger.warning("DPM-Solver-v3 EMS cache: ignoring %s, written for another key (%s, wanted %s)", path,
                           stored, text)
            return None
        return ems

    def put(self, key, ems: EMS) -> str:
        if not isinstance(ems, EMS):
            raise ValueError(f"EMSCache.put needs an EMS, got {type(ems).__name__}")
        metadata = dict(ems.metadata)
        metadata["cache_key"] = key_json(key)
        stored = EMS(ems.lambdas, ems.l, ems.s, ems.b, metadata=metadata, standard_errors=ems.standard_errors)
        os.makedirs(self.root, exist_ok=True)
        return stored.save(self.path(key))

    def entries(self):
        """[(path, key dict, metadata dict)] for the readable cache files (unreadable ones are skipped)."""
        from safetensors import safe_open

        found = []
        if not os.path.isdir(self.root):
            return found
        for name in sorted(os.listdir(self.root)):
            if not name.endswith(SUFFIX):
                continue
            path = os.path.join(self.root, name)
            try:
                with safe_open(path, framework="pt") as handle:
                    metadata = dict(handle.metadata() or {})
                key = json.loads(metadata["cache_key"])
            except Exception:  # noqa: BLE001 - corrupt files are listed by nobody and served to nobody
                continue
            found.append((path, key, metadata))
        return found


def _tensor_head_bytes(tensor, count=4096) -> bytes:
    if tensor.device.type == "meta":
        return b""
    head = tensor.detach().reshape(-1)[:count].contiguous().cpu()
    if head.is_quantized:
        head = head.dequantize()
    return head.view(torch.uint8).numpy().tobytes() if head.element_size() > 0 else b""


def fingerprint_state_dict(state_dict, extra=(), every=16, values=4096) -> str:
    """A cheap, stable fingerprint of model weights (milliseconds for an SD-sized dict, docs/hosts.md 1.6).

    sha256 over the sorted names, shapes and dtypes of all tensors, the first ``values`` values of every
    ``every``-th tensor (in sorted name order) and the ``extra`` strings (config class, ``sigma_digest``, patch keys
    and strengths...).  It does not read whole tensors: a change outside the sampled values goes unnoticed, so hosts
    add what they know changes the model (LoRA keys and strengths) to ``extra``.
    """
    digest = hashlib.sha256()
    for index, name in enumerate(sorted(state_dict)):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"{name}={tensor!r};".encode())
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if index % every == 0:
            digest.update(_tensor_head_bytes(tensor, values))
    for item in extra:
        digest.update(b"\x00" + str(item).encode())
    return digest.hexdigest()[:32]


def sigma_digest(sigmas) -> str:
    """A digest of a model's sigma table (covers zero-terminal-SNR rescaling and shifts), float32 values."""
    values = torch.as_tensor(sigmas).detach().reshape(-1).to("cpu", torch.float32)
    return hashlib.sha256(values.numpy().tobytes()).hexdigest()[:16]


__all__ = ["EMSCache", "make_key", "key_json", "fingerprint_state_dict", "sigma_digest", "KEY_FIELDS"]
