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

File format (one safetensors file, version 2): tensors ``lambdas``, ``l``, ``s``, ``b`` and optional standard errors
``se_<name>``; string metadata with ``format=dpm_solver_nodes.ems``, ``version``, ``tensor_sha256`` (sha256 of the
tensor names, dtypes, shapes and bytes, verified on every read), ``model_kind``, ``N``, ``reduction`` and, from the
EMS job, ``cache_key`` (the JSON of ``stats.settings.EMSKey``) and ``v3_decisions`` (JSON [[nfe, solver, ratio],
...]).  Every field with a meaning is validated when a file is read, with an error naming the file; other fields
(host, prompt, timings) are free text of bounded length.  Files are read through one open (bytes read once, then
parsed), written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets

import numpy as np
import torch

from ..samplers.ems_data import STAT_NAMES, EMSData, reduction_of, validate_arrays, validate_decisions
from ..samplers.schedule import MODEL_KINDS

logger = logging.getLogger("dpm_solver_nodes")

FORMAT = "dpm_solver_nodes.ems"
VERSION = "2"  # 2: sha256 of the tensor data, validated metadata, structured v3 decisions
SUPPORTED_VERSIONS = ("2",)
REDUCTIONS = ("per_element", "per_channel", "scalar")
TMP_PREFIX = ".ems-"
TMP_SUFFIX = ".tmp"
MAX_METADATA_VALUE = 4096  # characters per metadata string
MAX_HEADER_BYTES = 1 << 20


def _package_version() -> str:
    try:
        from .. import __version__

        return str(__version__)
    except Exception:  # the module used outside the package
        return "unknown"


def _sigma_from_ve_lambda(lam: float, model_kind: str) -> float:
    sigma_ve = math.exp(-lam)
    return sigma_ve / (1 + sigma_ve) if model_kind == "flow" else sigma_ve


def tensor_digest(tensors) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes in name order (stored as ``tensor_sha256``)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encode_decisions(decisions) -> str:
    return json.dumps([[d.nfe, d.solver, round(d.ratio, 6)] + ([d.corrector, d.order] if d.order != 2 else
                                                               [] if d.corrector else [False]) for d in decisions],
                      separators=(",", ":"))


def _parse_decisions(text, source):
    try:
        return validate_decisions([tuple(item) if isinstance(item, list) else item for item in json.loads(text)])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{source}: metadata v3_decisions {text[:80]!r} is invalid ({error})") from error


def _number(text, source, name, integer=False, positive=False):
    try:
        value = int(text) if integer else float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: metadata {name} = {text!r:.80} is not {'an integer' if integer else 'a number'}"
                         ) from None
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{source}: metadata {name} = {text!r:.80} must be {'> 0 and ' if positive else ''}finite")
    return value


def _reduction_fits(reduction, stat_shape) -> bool:
    """Whether statistics of ``stat_shape`` can come from ``reduction`` (one channel: per_channel is scalar-shaped;
    a 1x1 latent: per_element is per_channel-shaped)."""
    ones = all(v == 1 for v in stat_shape[1:])
    return {"per_element": True, "per_channel": ones, "scalar": ones and stat_shape[0] == 1}.get(reduction, False)


# metadata fields with a meaning: their values are checked when a file is read (other fields are free text)
_INTEGER_FIELDS = ("N", "K", "n_probes", "smooth", "error_groups", "x0_steps", "substeps", "forward_rows",
                   "jvp_rows", "seed")
_POSITIVE_FIELDS = ("sigma_min", "sigma_max")
_NUMBER_FIELDS = ("cfg", "sb_window", "s_ridge", "seconds", "x0_seconds")


def validate_metadata(metadata, source="EMS", lambdas=None, stat_shape=None):
    """Check every metadata field with a meaning (module docstring); ValueError naming ``source`` and the field.
    Returns (model_kind, decisions)."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"{source}: metadata must map strings to strings, got {key!r}: {type(value).__name__}")
        if len(value) > MAX_METADATA_VALUE:
            raise ValueError(f"{source}: metadata {key} is {len(value)} characters long (limit {MAX_METADATA_VALUE})")
    model_kind = metadata.get("model_kind")
    if model_kind is not None and model_kind not in MODEL_KINDS:
        raise ValueError(f"{source}: metadata model_kind = {model_kind!r:.80} is not one of {MODEL_KINDS}")
    for name in _INTEGER_FIELDS:
        if name in metadata:
            _number(metadata[name], source, name, integer=True)
    for name in _POSITIVE_FIELDS:
        if name in metadata:
            _number(metadata[name], source, name, positive=True)
    for name in _NUMBER_FIELDS:
        if name in metadata:
            _number(metadata[name], source, name)
    if "latent_shape" in metadata and not re.fullmatch(r"\d{1,6}(x\d{1,6}){0,4}", metadata["latent_shape"]):
        raise ValueError(f"{source}: metadata latent_shape = {metadata['latent_shape']!r:.80} is not like 4x64x64")
    if lambdas is not None and "N" in metadata and int(metadata["N"]) != lambdas.shape[0] - 1:
        raise ValueError(f"{source}: metadata N = {metadata['N']} but the grid has {lambdas.shape[0] - 1} cells")
    if stat_shape is not None and "reduction" in metadata and not _reduction_fits(metadata["reduction"], stat_shape):
        raise ValueError(f"{source}: metadata reduction = {metadata['reduction']!r:.80} but the statistics have "
                         f"shape {stat_shape} ({reduction_of(stat_shape)})")
    if "cache_key" in metadata:
        from .settings import EMSKey

        EMSKey.from_json(metadata["cache_key"], source)
    decisions = _parse_decisions(metadata["v3_decisions"], source) if "v3_decisions" in metadata else ()
    return model_kind, decisions


class EMS(EMSData):
    """Empirical model statistics l, s, b on a lambda grid (see the module docstring for the conventions).

    Args:
      lambdas: (N + 1,) strictly increasing grid, index 0 the noisiest node (VE lambda = -log sigma~).
      l, s, b: (N + 1, *stat_shape) float tensors, stat_shape (C, H, W), (C, 1, 1) or (1, 1, 1).
      metadata: dict of strings describing the statistics (values are converted with ``str``), validated
        (``validate_metadata``): ``model_kind`` (absent: usable for either kind) and ``v3_decisions`` set the
        sampler's ``model_kind`` and ``decisions``.
      standard_errors: optional dict name -> tensor of the Monte-Carlo standard errors (e.g. of l, s, b).
      decisions: the v3 decision per NFE (``samplers.ems_data.NFEDecision`` or (nfe, solver, ratio)); given, it
        replaces ``metadata["v3_decisions"]``.

    The tensors are kept on the CPU; ``lambdas`` in float64.  Bad shapes, values or metadata raise ``ValueError``.
    """

    def __init__(self, lambdas, l, s, b, metadata=None, standard_errors=None, decisions=None, where="EMS"):
        metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        if decisions is not None:
            decisions = validate_decisions(decisions)
            if decisions:
                metadata["v3_decisions"] = encode_decisions(decisions)
            else:
                metadata.pop("v3_decisions", None)
        model_kind, parsed = validate_metadata(metadata, where)
        super().__init__(lambdas, l, s, b, model_kind=model_kind, decisions=parsed, where=where)
        validate_metadata(metadata, where, self.lambdas, self.stat_shape)
        self.metadata = metadata
        self.standard_errors = {}
        for name, value in (standard_errors or {}).items():
            value = torch.as_tensor(value).detach().cpu()
            if not torch.isfinite(value).all():
                raise ValueError(f"{where}: standard error {name!r} contains NaN or inf")
            self.standard_errors[str(name)] = value

    def replace(self, metadata=None, decisions=None):
        """A copy with ``metadata`` merged in and, if given, other ``decisions`` (arrays shared, not copied)."""
        return EMS(self.lambdas, self.l, self.s, self.b, metadata={**self.metadata, **(metadata or {})},
                   standard_errors=self.standard_errors, decisions=decisions)

    # ---- description ---------------------------------------------------------------------------------------------
    @property
    def sigma_max(self) -> float:
        """The host sigma (of ``model_kind``) at the noisiest grid node."""
        return _sigma_from_ve_lambda(float(self.lambdas[0]), self.model_kind or "eps")

    @property
    def sigma_min(self) -> float:
        """The host sigma (of ``model_kind``) at the cleanest grid node."""
        return _sigma_from_ve_lambda(float(self.lambdas[-1]), self.model_kind or "eps")

    def __repr__(self):
        return (f"EMS(N={self.N}, stat_shape={self.stat_shape}, reduction={self.reduction!r}, "
                f"model_kind={self.model_kind!r}, sigma {self.sigma_max:.6g} -> {self.sigma_min:.6g})")

    @classmethod
    def degenerate(cls, lambdas, channels=1):
        """l = 1, s = b = 0 (DPM-Solver++, the official ``degenerated=True``), per channel (scalar if channels=1)."""
        data = EMSData.degenerate(lambdas, channels)
        return cls(data.lambdas, data.l, data.s, data.b, metadata={"estimator": "degenerate"})

    # ---- files ---------------------------------------------------------------------------------------------------
    def to_bytes(self, dtype=torch.float32) -> bytes:
        """The safetensors file: ``lambdas`` in float64, l, s, b and standard errors in ``dtype`` (float32 is
        enough: the Monte-Carlo error dominates), metadata with ``tensor_sha256`` of the tensor data."""
        from safetensors.torch import save

        tensors = {"lambdas": self.lambdas.contiguous()}
        for name in STAT_NAMES:
            tensors[name] = getattr(self, name).to(dtype).contiguous()
        for name, value in self.standard_errors.items():
            tensors[f"se_{name}"] = value.to(dtype).contiguous()
        metadata = dict(self.metadata)
        metadata.setdefault("reduction", self.reduction)
        metadata.update({"format": FORMAT, "version": VERSION, "N": str(self.N),
                         "tensor_sha256": tensor_digest(tensors),
                         "grid_min_lambda": repr(float(self.lambdas[0])),
                         "grid_max_lambda": repr(float(self.lambdas[-1]))})
        metadata.setdefault("library_version", _package_version())
        return save(tensors, metadata=metadata)

    def save(self, path, dtype=torch.float32):
        """Write one safetensors file atomically (temp file ``.ems-<pid>-<random>.tmp`` in the same folder, fsync,
        ``os.replace``); two processes saving the same path leave one complete file.  Returns the path."""
        path = os.fspath(path)
        data = self.to_bytes(dtype)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies: shareable file
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path


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


def read_header(data: bytes, source):
    """The ``__metadata__`` dict of safetensors bytes (at least the header); ValueError naming ``source``."""
    if len(data) < 8:
        raise ValueError(f"EMS file {source} is corrupt or truncated ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER_BYTES or len(data) < 8 + size:
        raise ValueError(f"EMS file {source} is corrupt or truncated (header of {size} bytes)")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as error:
        raise ValueError(f"EMS file {source} is corrupt (header is not JSON: {error})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ValueError(f"EMS file {source} is corrupt (header is not a JSON object)")
    metadata = header.get("__metadata__", {})
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{source} is not a {FORMAT} file (format = {metadata.get('format')!r:.80})")
    if metadata.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(f"{source} has EMS format version {metadata.get('version')!r:.20}; this library reads "
                         f"{SUPPORTED_VERSIONS} (files of version 1 have no checksum: compute the EMS again)")
    return metadata


def read_file_header(path):
    """(metadata, (mtime_ns, size, inode)) of an EMS file, reading only its header through one open."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        head = handle.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        head += handle.read(min(size, MAX_HEADER_BYTES))
    return read_header(head, repr(path)), (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def ems_from_bytes(data: bytes, source="EMS") -> EMS:
    """Parse and validate a whole EMS file: header, ``tensor_sha256``, shapes, bounds, metadata."""
    from safetensors.torch import load

    metadata = read_header(data, source)
    try:
        tensors = load(data)
    except Exception as error:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(f"EMS file {source} is corrupt or truncated ({type(error).__name__}: {error})") from error
    stored = metadata.get("tensor_sha256")
    if stored is None:
        raise ValueError(f"EMS file {source} has no tensor_sha256 checksum")
    if tensor_digest(tensors) != stored:
        raise ValueError(f"EMS file {source} is corrupt: its tensor data do not match the stored sha256")
    missing = [k for k in ("lambdas",) + STAT_NAMES if k not in tensors]
    if missing:
        raise ValueError(f"{source} lacks the tensors {missing}")
    stats = {k: tensors[k] for k in STAT_NAMES}
    lambdas = tensors["lambdas"].to(torch.float64)
    validate_arrays(lambdas, stats, where=source)
    errors = {k[3:]: v for k, v in tensors.items() if k.startswith("se_")}
    for name, value in errors.items():
        if name in stats and tuple(value.shape) != tuple(stats[name].shape):
            raise ValueError(f"{source}: se_{name} has shape {tuple(value.shape)}, {name} has "
                             f"{tuple(stats[name].shape)}")
    return EMS(lambdas, stats["l"], stats["s"], stats["b"], metadata=metadata, standard_errors=errors, where=source)


def read_ems_file(path):
    """(EMS, (mtime_ns, size, inode)) read through one open: the bytes are read once and parsed from memory, so
    a concurrent ``os.replace`` cannot mix two files' header and data."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        data = handle.read()
    return ems_from_bytes(data, repr(os.fspath(path))), (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def load_ems(path, expect=None, **official_options):
    """Read an EMS file written by ``EMS.save`` (or an official thu-ml folder, see ``import_official_ems``).

    Everything is validated (format, version, the sha256 of the tensor data, shapes, strictly increasing lambdas,
    finite and bounded values, every metadata field with a meaning); a bad file raises ``ValueError`` naming it.
    ``expect`` is a dict of properties that must match (see ``check_expectations``), e.g. ``{"channels": 4,
    "model_kind": "eps", "fingerprint": "..."}``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        ems = import_official_ems(path, **official_options)
        check_expectations(ems, expect, source=path)
        return ems
    try:
        ems, _ = read_ems_file(path)
    except FileNotFoundError:
        raise ValueError(f"EMS file {path!r} does not exist") from None
    except (IsADirectoryError, PermissionError) as error:
        raise ValueError(f"EMS file {path!r} cannot be read ({error})") from None
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


__all__ = ["EMS", "load_ems", "import_official_ems", "check_expectations", "read_ems_file", "read_file_header",
           "ems_from_bytes", "validate_metadata", "tensor_digest", "FORMAT", "VERSION", "REDUCTIONS"]
