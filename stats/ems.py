"""DPM-Solver-v3 empirical model statistics (EMS): the ``EMS`` object, its safetensors file format and the importer
for the official thu-ml ``l.npz`` / ``sb.npz`` statistics.

The EMS of a model are three lambda-dependent coefficient maps l, s, b (DPM-Solver-v3, Zheng et al. 2023, Eq. 5 and
11) tabulated on a grid ``lambdas`` (float64, strictly increasing, index 0 the noisiest node).  lambda is the
half log-SNR in VE coordinates, lambda = -log(sigma~): sigma~ = sigma for ``model_kind="eps"`` and
sigma~ = sigma / (1 - sigma) for ``model_kind="flow"`` (the same number as the flow's log((1 - sigma) / sigma)).

``l``, ``s`` and ``b`` have shape (N + 1, *stat_shape) with stat_shape one of
  (C, H, W)  "per_element" (the official layout; valid only for one latent size),
  (C, 1, 1)  "per_channel" (resolution-free),
  (1, 1, 1)  "scalar".

File format (one safetensors file, see docs/dpm_solver_v3.md section 5): tensors ``lambdas``, ``l``, ``s``, ``b`` and
optional standard errors ``se_<name>``; string metadata with ``format=dpm_solver_nodes.ems`` and ``version`` plus
whatever describes the statistics (model_kind, reduction, latent_shape, N, K, cfg, guidance, fingerprint, ...).
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile

import numpy as np
import torch

logger = logging.getLogger("dpm_solver_nodes")

FORMAT = "dpm_solver_nodes.ems"
VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
REDUCTIONS = ("per_element", "per_channel", "scalar")
STAT_NAMES = ("l", "s", "b")


def _package_version() -> str:
    try:
        from .. import __version__

        return str(__version__)
    except Exception:  # the module used outside the package
        return "unknown"


def reduction_of(stat_shape) -> str:
    """The reduction a stat shape (C, H, W) stands for."""
    stat_shape = tuple(stat_shape)
    if stat_shape == (1, 1, 1):
        return "scalar"
    if len(stat_shape) == 3 and stat_shape[1:] == (1, 1):
        return "per_channel"
    return "per_element"


def _sigma_from_ve_lambda(lam: float, model_kind: str) -> float:
    sigma_ve = math.exp(-lam)
    return sigma_ve / (1 + sigma_ve) if model_kind == "flow" else sigma_ve


class EMS:
    """Empirical model statistics l, s, b on a lambda grid (see the module docstring for the conventions).

    Args:
      lambdas: (N + 1,) strictly increasing grid, index 0 the noisiest node (VE lambda = -log sigma~).
      l, s, b: (N + 1, *stat_shape) float tensors, stat_shape (C, H, W), (C, 1, 1) or (1, 1, 1).
      metadata: dict of strings describing the statistics (values are converted with ``str``).
      standard_errors: optional dict name -> tensor of the Monte-Carlo standard errors (e.g. of l, s, b).

    The tensors are kept on the CPU; ``lambdas`` in float64.  Bad shapes or non-finite values raise ``ValueError``.
    """

    def __init__(self, lambdas, l, s, b, metadata=None, standard_errors=None):
        lambdas = torch.as_tensor(lambdas).detach().to("cpu", torch.float64)
        stats = {}
        for name, value in zip(STAT_NAMES, (l, s, b)):
            value = torch.as_tensor(value).detach().cpu()
            if not value.is_floating_point():
                value = value.to(torch.float64)
            stats[name] = value
        _validate_arrays(lambdas, stats)
        self.lambdas = lambdas
        self.l, self.s, self.b = stats["l"], stats["s"], stats["b"]
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.standard_errors = {}
        for name, value in (standard_errors or {}).items():
            value = torch.as_tensor(value).detach().cpu()
            if not torch.isfinite(value).all():
                raise ValueError(f"standard error {name!r} contains NaN or inf")
            self.standard_errors[str(name)] = value
        self._fallback_logged = set()

    # ---- description ---------------------------------------------------------------------------------------------
    @property
    def N(self) -> int:
        return self.lambdas.shape[0] - 1

    @property
    def stat_shape(self) -> tuple:
        return tuple(self.l.shape[1:])

    @property
    def reduction(self) -> str:
        return reduction_of(self.stat_shape)

    @property
    def model_kind(self) -> str:
        """``metadata["model_kind"]``, "eps" when the metadata does not say."""
        return self.metadata.get("model_kind", "eps")

    @property
    def sigma_max(self) -> float:
        """The host sigma (of ``model_kind``) at the noisiest grid node."""
        return _sigma_from_ve_lambda(float(self.lambdas[0]), self.model_kind)

    @property
    def sigma_min(self) -> float:
        """The host sigma (of ``model_kind``) at the cleanest grid node."""
        return _sigma_from_ve_lambda(float(self.lambdas[-1]), self.model_kind)

    def __repr__(self):
        return (f"EMS(N={self.N}, stat_shape={self.stat_shape}, reduction={self.reduction!r}, "
                f"model_kind={self.model_kind!r}, sigma {self.sigma_max:.6g} -> {self.sigma_min:.6g})")

    @classmethod
    def degenerate(cls, lambdas, channels=1):
        """l = 1, s = b = 0 (DPM-Solver++, the official ``degenerated=True``), per channel (scalar if channels=1)."""
        lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
        shape = (lambdas.shape[0], channels, 1, 1)
        return cls(lambdas, torch.ones(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64),
                   torch.zeros(shape, dtype=torch.float64), metadata={"estimator": "degenerate"})

    # ---- use -----------------------------------------------------------------------------------------------------
    def for_latent(self, shape):
        """l, s, b of shape (N + 1, *per_sample) where ``per_sample`` broadcasts against a latent of full shape
        ``shape`` = (batch, C, ...).

        Per-element statistics of another latent size fall back to their per-channel means (logged once per
        shape); a channel count that differs from the latent's raises ``ValueError`` (scalar statistics fit any).
        """
        shape = tuple(int(v) for v in shape)
        if len(shape) < 2:
            raise ValueError(f"for_latent needs a batched latent shape (batch, C, ...), got {shape}")
        per_sample = shape[1:]
        channels = self.stat_shape[0]
        rows = self.N + 1
        if self.reduction == "scalar":
            view = (rows,) + (1,) * len(per_sample)
            return tuple(t.reshape(view) for t in (self.l, self.s, self.b))
        if channels != per_sample[0]:
            raise ValueError(
                f"the EMS have {channels} channels (stat shape {self.stat_shape}) but the latent has "
                f"{per_sample[0]} channels (shape {shape}): these statistics belong to another model family")
        if self.reduction == "per_element" and self.stat_shape == per_sample:
            return self.l, self.s, self.b
        if self.reduction == "per_element" and per_sample not in self._fallback_logged:
            self._fallback_logged.add(per_sample)
            logger.warning(
                "DPM-Solver-v3: per-element EMS of shape %s do not fit a latent of shape %s; using their per-channel "
                "means", self.stat_shape, per_sample)
        view = (rows, channels) + (1,) * (len(per_sample) - 1)
        return tuple(t.reshape(rows, channels, -1).mean(-1).reshape(view) for t in (self.l, self.s, self.b))

    # ---- files ---------------------------------------------------------------------------------------------------
    def save(self, path, dtype=torch.float32):
        """Write one safetensors file atomically (temp file in the same folder + ``os.replace``).

        ``lambdas`` are stored in float64, l, s, b and standard errors in ``dtype`` (float32 is enough: the
        Monte-Carlo error dominates).  Two processes saving the same path leave one complete file.
        """
        from safetensors.torch import save_file

        tensors = {"lambdas": self.lambdas.contiguous()}
        for name in STAT_NAMES:
            tensors[name] = getattr(self, name).to(dtype).contiguous()
        for name, value in self.standard_errors.items():
            tensors[f"se_{name}"] = value.to(dtype).contiguous()
        metadata = dict(self.metadata)
        metadata.update({"format": FORMAT, "version": VERSION, "N": str(self.N), "reduction": self.reduction,
                         "grid_min_lambda": repr(float(self.lambdas[0])),
                         "grid_max_lambda": repr(float(self.lambdas[-1]))})
        metadata.setdefault("library_version", _package_version())
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ems-", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shareable file gets the usual permissions
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path


def _validate_arrays(lambdas, stats, where="EMS"):
    if lambdas.ndim != 1 or lambdas.shape[0] < 2:
        raise ValueError(f"{where}: lambdas must be 1-D with at least 2 nodes, got shape {tuple(lambdas.shape)}")
    if not torch.isfinite(lambdas).all():
        raise ValueError(f"{where}: lambdas contain NaN or inf")
    steps = lambdas[1:] - lambdas[:-1]
    if (steps <= 0).any():
        k = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(f"{where}: lambdas must be strictly increasing (noisiest first); lambdas[{k}] = "
                         f"{lambdas[k].item():.6g} >= lambdas[{k + 1}] = {lambdas[k + 1].item():.6g}")
    rows = lambdas.shape[0]
    shape = None
    for name, value in stats.items():
        if value.ndim != 4:
            raise ValueError(f"{where}: {name} must have shape (N + 1, C, H, W), got {tuple(value.shape)}")
        if value.shape[0] != rows:
            raise ValueError(f"{where}: {name} has {value.shape[0]} rows but lambdas has {rows} nodes")
        if shape is None:
            shape = tuple(value.shape)
        elif tuple(value.shape) != shape:
            raise ValueError(f"{where}: l, s, b shapes differ: {name} is {tuple(value.shape)}, expected {shape}")
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{where}: {name} contains {bad} NaN or inf values")


def _values_match(expected, actual) -> bool:
    if actual is None:
        return False
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            return math.isclose(float(actual), float(expected), rel_tol=1e-6, abs_tol=1e-12)
        except ValueError:
            return False
    return str(actual) == str(expected)


def check_expectations(ems: EMS, expect, source="EMS"):
    """Raise ``ValueError`` naming the key and both values when ``ems`` does not match ``expect``.

    Keys: any metadata key (compared as strings, numbers numerically to 1e-6), plus ``channels`` (the latent's
    channel count; scalar statistics fit any), ``stat_shape``, ``sigma_min``/``sigma_max`` (computed from the grid
    when the metadata lacks them).
    """
    for key, value in (expect or {}).items():
        if key == "channels":
            if ems.reduction != "scalar" and ems.stat_shape[0] != int(value):
                raise ValueError(f"{source}: channels mismatch: expected {value}, the file has {ems.stat_shape[0]}")
            continue
        if key == "stat_shape":
            if tuple(value) != ems.stat_shape:
                raise ValueError(f"{source}: stat_shape mismatch: expected {tuple(value)}, the file has "
                                 f"{ems.stat_shape}")
            continue
        if key in ("sigma_min", "sigma_max"):
            actual = ems.metadata.get(key, getattr(ems, key))
            if not _values_match(float(value), actual):
                raise ValueError(f"{source}: {key} mismatch: expected {value}, the file has {actual}")
            continue
        actual = ems.metadata.get(key)
        if not _values_match(value, actual):
            raise ValueError(f"{source}: {key} mismatch: expected {value!r}, the file has {actual!r}")


def load_ems(path, expect=None, **official_options):
    """Read an EMS file written by ``EMS.save`` (or an official thu-ml folder, see ``import_official_ems``).

    Everything is validated (format, version, shapes, strictly increasing lambdas, finite values); a corrupt or
    truncated file raises ``ValueError`` saying so.  ``expect`` is a dict of properties that must match (see
    ``check_expectations``), e.g. ``{"channels": 4, "model_kind": "eps", "fingerprint": "..."}``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        ems = import_official_ems(path, **official_options)
        check_expectations(ems, expect, source=path)
        return ems
    if not os.path.isfile(path):
        raise ValueError(f"EMS file {path!r} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
            tensors = {k: handle.get_tensor(k) for k in keys}
    except Exception as error:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(f"EMS file {path!r} is corrupt or truncated ({type(error).__name__}: {error})") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a {FORMAT} file (format = {metadata.get('format')!r})")
    if metadata.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path!r} has EMS format version {metadata.get('version')!r}; this library reads "
                         f"{SUPPORTED_VERSIONS}")
    missing = [k for k in ("lambdas",) + STAT_NAMES if k not in keys]
    if missing:
        raise ValueError(f"{path!r} lacks the tensors {missing}")
    lambdas = tensors["lambdas"].to(torch.float64)
    stats = {k: tensors[k] for k in STAT_NAMES}
    _validate_arrays(lambdas, stats, where=repr(path))
    if "N" in metadata and metadata["N"] != str(lambdas.shape[0] - 1):
        raise ValueError(f"{path!r}: metadata N = {metadata['N']} but the grid has {lambdas.shape[0] - 1} cells")
    shape = tuple(stats["l"].shape[1:])
    if "reduction" in metadata and metadata["reduction"] != reduction_of(shape):
        raise ValueError(f"{path!r}: metadata reduction = {metadata['reduction']!r} but the statistics have shape "
                         f"{shape} ({reduction_of(shape)})")
    errors = {k[3:]: v for k, v in tensors.items() if k.startswith("se_")}
    for name, value in errors.items():
        if name in stats and tuple(value.shape) != tuple(stats[name].shape):
            raise ValueError(f"{path!r}: se_{name} has shape {tuple(value.shape)}, {name} has "
                             f"{tuple(stats[name].shape)}")
    ems = EMS(lambdas, stats["l"], stats["s"], stats["b"], metadata=metadata, standard_errors=errors)
    check_expectations(ems, expect, source=repr(path))
    return ems


# ---- official statistics --------------------------------------------------------------------------------------

def _vp_discrete_sigma(betas, index):
    """k-diffusion sigma of a discrete VP model (DDPM betas) at integer timestep ``index``."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    return float(np.sqrt((1 - alphas_cumprod[index]) / alphas_cumprod[index]))


def _scaled_linear_betas(start, end, n=1000):
    return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2


def _vp_linear_sigma(t, beta_0=0.1, beta_1=20.0):
    """sigma of the continuous VP-linear SDE (ScoreSDE) at time t: log alpha = -t^2 (b1 - b0)/4 - t b0/2."""
    log_alpha = -0.25 * t ** 2 * (beta_1 - beta_0) - 0.5 * t * beta_0
    return math.sqrt(-math.expm1(2 * log_alpha)) / math.exp(log_alpha)


# model -> (folder pattern, function(match) -> (sigma_min, sigma_max) or None)
OFFICIAL_MODELS = {
    # Stable Diffusion 1.x/2.x: scaled-linear betas 0.00085..0.012, t 1 -> 1e-3 is index 999 -> 0.
    "sd": (r"^(?P<cfg>[0-9.]+)_(?P<N>\d+)_(?P<K>\d+)$",
           lambda m: (_vp_discrete_sigma(_scaled_linear_betas(0.00085, 0.012), 0),
                      _vp_discrete_sigma(_scaled_linear_betas(0.00085, 0.012), 999))),
    "edm": (r"^(?P<sigma_min>[0-9.eE-]+)_(?P<sigma_max>[0-9.eE-]+)_(?P<N>\d+)_(?P<K>\d+)$",
            lambda m: (float(m["sigma_min"]), float(m["sigma_max"]))),
    # ScoreSDE VP-linear (beta 0.1..20), t 1 -> eps.
    "scoresde": (r"^(?P<eps>[0-9.eE-]+)_(?P<N>\d+)_(?P<K>\d+)$",
                 lambda m: (_vp_linear_sigma(float(m["eps"])), _vp_linear_sigma(1.0))),
    # LDM LSUN-Bedroom: scaled-linear betas 0.0015..0.0195, discrete t 1 -> 1e-3.
    "lsun": (r"^(?P<N>\d+)_(?P<K>\d+)$",
             lambda m: (_vp_discrete_sigma(_scaled_linear_betas(0.0015, 0.0195), 0),
                        _vp_discrete_sigma(_scaled_linear_betas(0.0015, 0.0195), 999))),
    # guided-diffusion ImageNet-256: linear betas 1e-4..0.02, discrete t 1 -> 1e-3.
    "imagenet": (r"^(?P<N>\d+)_(?P<K>\d+)$",
                 lambda m: (_vp_discrete_sigma(np.linspace(1e-4, 0.02, 1000), 0),
                            _vp_discrete_sigma(np.linspace(1e-4, 0.02, 1000), 999))),
}


def _load_npz(path, keys):
    if not os.path.isfile(path):
        raise ValueError(f"official EMS folder lacks {os.path.basename(path)} ({path!r})")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise ValueError(f"{path!r} lacks the arrays {missing} (has {data.files})")
            return [np.asarray(data[k], dtype=np.float64) for k in keys]
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"{path!r} is corrupt or truncated ({type(error).__name__}: {error})") from error


def import_official_ems(directory, sigma_min=None, sigma_max=None, model="sd"):
    """Load the official thu-ml/DPM-Solver-v3 statistics: ``l.npz`` (key ``l``) and ``sb.npz`` (keys ``s``, ``b``),
    float64 arrays (N + 1, C, H, W) with row 0 the noisiest node, on a grid uniform in lambda.

    The grid is not stored in the files: give ``sigma_min`` and ``sigma_max`` (k-diffusion sigmas) or let them be
    parsed from the folder name of ``model``: "sd" (``{cfg}_{N}_{K}``, sigma 14.614641 -> 0.0291672 for SD-1.x/2.x),
    "edm" (``{sigma_min}_{sigma_max}_{N}_{K}``), "scoresde" (``{eps}_{N}_{K}``, VP-linear t 1 -> eps), "lsun" and
    "imagenet" (``{N}_{K}``, discrete t 1 -> 1e-3).  Returns an ``EMS`` (model_kind "eps").
    """
    if model not in OFFICIAL_MODELS:
        raise ValueError(f"model must be one of {tuple(OFFICIAL_MODELS)}, got {model!r}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"official EMS folder {directory!r} does not exist")
    (l,) = _load_npz(os.path.join(directory, "l.npz"), ["l"])
    s, b = _load_npz(os.path.join(directory, "sb.npz"), ["s", "b"])
    pattern, parse_range = OFFICIAL_MODELS[model]
    match = re.match(pattern, os.path.basename(os.path.normpath(directory)))
    metadata = {"model_kind": "eps", "source": "thu-ml/DPM-Solver-v3 official statistics", "official_model": model,
                "grid": "uniform_lambda", "estimator": "official"}
    if match:
        metadata.update({k: v for k, v in match.groupdict().items() if k in ("cfg", "N", "K")})
    if sigma_min is None or sigma_max is None:
        if not match:
            raise ValueError(
                f"cannot read the sigma range from the folder name {os.path.basename(directory)!r} (expected "
                f"{pattern} for model={model!r}); pass sigma_min and sigma_max")
        parsed_min, parsed_max = parse_range(match)
        sigma_min = parsed_min if sigma_min is None else sigma_min
        sigma_max = parsed_max if sigma_max is None else sigma_max
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    for name, array in (("l", l), ("s", s), ("b", b)):
        if array.ndim != 4:
            raise ValueError(f"official {name} must have shape (N + 1, C, H, W), got {array.shape}")
    rows = l.shape[0]
    if "N" in metadata and int(metadata["N"]) != rows - 1:
        raise ValueError(f"folder name says N = {metadata['N']} but l.npz has {rows} rows (N = {rows - 1})")
    metadata.update({"N": str(rows - 1), "sigma_min": repr(sigma_min), "sigma_max": repr(sigma_max),
                     "latent_shape": "x".join(str(v) for v in l.shape[1:])})
    lambdas = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), rows, dtype=torch.float64)
    return EMS(lambdas, torch.from_numpy(l), torch.from_numpy(s), torch.from_numpy(b), metadata=metadata)


__all__ = ["EMS", "load_ems", "import_official_ems", "check_expectations", "FORMAT", "VERSION", "REDUCTIONS"]
