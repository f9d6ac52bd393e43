"""What an EMS computation depends on, in one place: ``EMSSettings`` (how to estimate), ``EMSTarget`` (what model,
guidance scale, latent and sigma range) and ``EMSKey`` (both, with the estimator version: the cache key, stored in
every file as metadata ``cache_key`` and hashed into its name).

Defaults: N = 200, K = 8, per-channel, and ``tune``: the fit of s, b and the per-NFE decisions are chosen by
measurement (``stats.tuning``; bench/results_ems_tuning.md), within the estimation's own model rows.  N and K as
measured in bench/results_ems_cost.md: the grid's resolution matters, the samples per node barely (beyond what they
give the tuning), so 200 x 8 matched 100 x 32 on the study's models at half the model rows.  ``sb_window``,
``s_ridge`` and ``smooth`` (+-0.5 in lambda, 0.01, 5: the fit measured on the embedded trained models,
bench/results_v3_study.md) apply where the tuning is off or its budget too small; then the v3-vs-DPM-Solver++(2M)
check runs, with at most 16 reference samples and never more model rows than the estimation's model calls
(``check_plan``, ``tuning_budget``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from ..samplers.schedule import MODEL_KINDS

ESTIMATOR_VERSION = "3"  # 3: one EMS job for every host (settings object, checked decisions, checksummed files)
REDUCTIONS = ("per_element", "per_channel", "scalar")
JVP_BACKENDS = ("auto", "forward", "finite_difference", "one_sided_difference")
SAMPLE_SOURCES = ("diffused", "trajectory")
GUIDANCE_MODES = ("guided", "uncond")
CHECK_NFES = (5, 6, 8, 10, 15, 20)
MAX_CHECK_SAMPLES = 16
CHECK_STEPS_FACTOR = 4  # the check's reference steps: 4 x the largest NFE it judges (a coarser one judges itself)
JVP_ROW_COST = 2  # a JVP row costs about 2-3 forward rows; the check budget counts it as 2


def check_rows_per_sample(steps, nfes) -> int:
    """Model rows of one sample of the v3-vs-DPM-Solver++(2M) check: its reference, then a v3 and a 2M run per NFE."""
    return steps + 2 * sum(nfes)


def least_N(needed_rows, K, rows_per_node) -> int:
    """The smallest grid N whose estimation, (N + 1) K rows_per_node + 10 model rows, reaches ``needed_rows``."""
    return max(2, -(-(needed_rows - 10) // (K * rows_per_node)) - 1)


def _integer(name, value, minimum, maximum=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and
                                                                                  value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _real(name, value, minimum=0.0, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum \
            or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else f'>= {minimum:g}'}, got {value!r}")


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _from_dict(cls, values, source, what, required=()):
    """``cls(**values)`` for a JSON object read from a file; ValueError naming ``source`` and the problem."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: {what} must be a JSON object, got {type(values).__name__}")
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"{source}: {what} lacks {missing}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{source}: unknown {what} fields {unknown}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None


@dataclasses.dataclass(frozen=True)
class EMSSettings:
    """How EMS are estimated (``stats.estimate.estimate_ems`` documents each field) and checked.

    ``check_samples``: reference samples of the v3-vs-DPM-Solver++(2M) check; None: as many as fit the
    estimation's own cost, at most 16 (fewer than 2: no check, logged); 0: no check.  ``check_steps``: steps of those
    references (None: 4 x max(check_nfes), the coarsest reference that still judges every NFE).
    """

    N: int = 200
    K: int = 8
    reduction: str = "per_channel"
    sb_window: float = 0.5
    s_ridge: float = 0.01
    smooth: int = 5
    n_probes: int = 1
    samples: str = "diffused"
    substeps: int = 4
    jvp: str = "auto"
    seed: int = 0
    x0_steps: int = 50
    guidance: str = "guided"
    check_nfes: tuple = CHECK_NFES
    check_samples: int = None
    check_steps: int = None
    tune: bool = True

    def __post_init__(self):
        _integer("N", self.N, 2, 100_000)
        _integer("K", self.K, 2, 1 << 20)
        _choice("reduction", self.reduction, REDUCTIONS)
        _real("sb_window", self.sb_window)
        _real("s_ridge", self.s_ridge)
        _integer("smooth", self.smooth, 0, 10_000)
        _integer("n_probes", self.n_probes, 1, 64)
        _choice("samples", self.samples, SAMPLE_SOURCES)
        _integer("substeps", self.substeps, 1, 1000)
        _choice("jvp", self.jvp, JVP_BACKENDS)
        _integer("seed", self.seed, 0, 2 ** 64 - 1)
        _integer("x0_steps", self.x0_steps, 2, 100_000)
        _choice("guidance", self.guidance, GUIDANCE_MODES)
        nfes = self.check_nfes
        if isinstance(nfes, list):
            object.__setattr__(self, "check_nfes", tuple(nfes))
        if not isinstance(self.check_nfes, tuple):
            raise ValueError(f"check_nfes must be a tuple of integers, got {nfes!r}")
        for nfe in self.check_nfes:
            _integer("check_nfes item", nfe, 1, 1000)
        if self.check_samples is not None:
            _integer("check_samples", self.check_samples, 0, 1 << 16)
        if self.check_steps is not None:
            _integer("check_steps", self.check_steps, 2, 100_000)
        if not isinstance(self.tune, bool):
            raise ValueError(f"tune must be true or false, got {self.tune!r}")

    def unverified_reason(self):
        """None where the EMS job will tune or check v3 (or ``check_samples=0`` opts out on purpose); else why these
        settings leave no budget for the v3 check, so v3 would run unverified at every NFE (the job refuses them)."""
        _, steps, nfes = plan = self.check_plan()
        if self.check_samples is not None or plan[0] > 0:
            return None
        if not nfes:
            return (f"check_nfes {self.check_nfes} with check_steps {steps}: no NFE can be checked (each needs "
                    f"check_steps >= {CHECK_STEPS_FACTOR} x NFE), so v3 would run unverified; raise check_steps, or "
                    f"set check_samples=0 to store unchecked EMS on purpose")
        needed = 2 * check_rows_per_sample(steps, nfes)
        n_min = least_N(needed, self.K, (self.tuning_budget() - 10) // ((self.N + 1) * self.K))
        return (f"N = {self.N}, K = {self.K} are too small to check DPM-Solver-v3 against DPM-Solver++ on this model "
                f"({self.tuning_budget()} model rows; the check needs {needed}), so v3 would run unverified at every "
                f"NFE: use N >= {n_min} at K = {self.K} (or a larger K), or set check_samples=0 to store unchecked "
                f"EMS on purpose")

    # ---- cost -------------------------------------------------------------------------------------------------
    def estimation_rows(self, backend=None) -> int:
        """Model rows of the estimation in forward-row equivalents for the JVP ``backend`` (None: ``jvp``; "auto"
        and "forward" count a JVP row as ``JVP_ROW_COST`` rows; the differences count their forward rows)."""
        backend = self.jvp if backend is None else backend
        _choice("backend", backend, JVP_BACKENDS)
        per_node = {"finite_difference": 3 + 2 * self.n_probes, "one_sided_difference": 2 + self.n_probes}.get(
            backend, (self.n_probes + 1) * JVP_ROW_COST)
        per_sample = per_node + (self.substeps if self.samples == "trajectory" else 0)
        return (self.N + 1) * self.K * per_sample

    def check_plan(self):
        """(samples, reference steps, NFEs) of the check; samples 0 means no check.  Only NFEs with 4 x NFE <=
        steps are judged (a coarser reference would judge itself)."""
        steps = self.check_steps if self.check_steps is not None else CHECK_STEPS_FACTOR * max(self.check_nfes,
                                                                                                default=1)
        nfes = tuple(n for n in self.check_nfes if CHECK_STEPS_FACTOR * n <= steps)
        if not nfes:
            return 0, steps, ()
        per_sample = check_rows_per_sample(steps, nfes)
        if self.check_samples is not None:
            return min(self.check_samples, self.K) if self.check_samples >= 2 else 0, steps, nfes
        samples = min(MAX_CHECK_SAMPLES, self.K, self.tuning_budget() // per_sample)
        return (samples if samples >= 2 else 0), steps, nfes

    def tuning_budget(self) -> int:
        """The estimation's model evaluations in rows (a JVP counted as one, whatever the JVP back-end): the most
        rows the tuning or the check may spend (issue 12: the tuning adds at most as many model calls as the
        estimation)."""
        per_sample = (self.n_probes + 1) + (self.substeps if self.samples == "trajectory" else 0)
        return (self.N + 1) * self.K * per_sample + 10

    def tuning_plan(self, guided=True):
        """(samples per set, fits) of the tuning (``stats.tuning.tuning_plan`` within ``tuning_budget``; a guided
        model's selection runs one pack solver fewer); (0, ()): no tuning, the check runs instead."""
        if not self.tune:
            return 0, ()
        from .tuning import tuning_plan

        return tuning_plan(self.tuning_budget(), self.check_nfes, guided=guided)

    def tuning_samples(self, guided=True) -> int:
        """Samples per set of the tuning (0: no tuning, the check runs instead)."""
        return self.tuning_plan(guided)[0]

    def cost(self, guided=True, backend=None) -> dict:
        """Model rows per phase (x0, estimate, tune, check; one row = one sample through the network, doubled by
        CFG; the estimate's for the JVP ``backend``, see ``estimation_rows``).  The check runs only where the tuning
        does not."""
        from .tuning import tuning_rows

        factor = 2 if guided else 1
        tune_samples, fits = self.tuning_plan(guided)
        samples, steps, nfes = self.check_plan() if not tune_samples else (0, 0, ())
        rows = {"x0": self.K * self.x0_steps, "estimate": self.estimation_rows(backend) + 10,
                "tune": tuning_rows(tune_samples, self.check_nfes, len(fits), pack=1 if guided else 2)
                if tune_samples else 0,
                "check": samples * (steps + 2 * sum(nfes))}
        rows = {k: v * factor for k, v in rows.items()}
        rows["total"] = sum(rows.values())
        return rows

    # ---- estimator options, serialisation ---------------------------------------------------------------------
    def estimate_options(self) -> dict:
        """Keyword arguments of ``estimate_ems`` for these settings."""
        return {"N": self.N, "K": self.K, "reduction": self.reduction, "sb_window": float(self.sb_window),
                "s_ridge": float(self.s_ridge), "smooth": self.smooth, "n_probes": self.n_probes,
                "samples": self.samples, "substeps": self.substeps, "jvp": self.jvp, "seed": self.seed,
                "tune": self.tune, "tune_nfes": self.check_nfes}

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["check_nfes"] = list(self.check_nfes)
        return out

    @classmethod
    def from_dict(cls, values, source="EMS settings"):
        if isinstance(values, dict) and isinstance(values.get("check_nfes"), list):
            values = dict(values, check_nfes=tuple(values["check_nfes"]))
        return _from_dict(cls, values, source, "settings")


@dataclasses.dataclass(frozen=True)
class EMSTarget:
    """What the EMS describe: the model (``fingerprint``: ComfyUI's model fingerprint or the WebUI's checkpoint
    sha256; ``sigma_digest`` of its sigma table where the fingerprint does not cover it), its kind, the guidance
    scale, one latent's shape (C, H, W) and the sigma range of the grid."""

    fingerprint: str
    model_kind: str
    cfg: float
    latent_shape: tuple
    sigma_min: float
    sigma_max: float
    sigma_digest: str = ""

    def __post_init__(self):
        if not isinstance(self.fingerprint, str) or not 1 <= len(self.fingerprint) <= 128:
            raise ValueError(f"fingerprint must be a non-empty string of at most 128 characters, got "
                             f"{self.fingerprint!r:.80}")
        _choice("model_kind", self.model_kind, MODEL_KINDS)
        _real("cfg", self.cfg)
        shape = self.latent_shape
        if isinstance(shape, list):
            object.__setattr__(self, "latent_shape", tuple(shape))
        if not isinstance(self.latent_shape, tuple) or not 1 <= len(self.latent_shape) <= 5:
            raise ValueError(f"latent_shape must be (C, H, W), got {shape!r}")
        for size in self.latent_shape:
            _integer("latent_shape item", size, 1, 1 << 20)
        _real("sigma_min", self.sigma_min, positive=True)
        _real("sigma_max", self.sigma_max, positive=True)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got {self.sigma_min!r}, {self.sigma_max!r}")
        if self.model_kind == "flow" and self.sigma_max >= 1:
            raise ValueError(f"flow models need sigma_max < 1 (sigma = 1 is lambda = -inf), got {self.sigma_max!r}")
        if not isinstance(self.sigma_digest, str) or len(self.sigma_digest) > 64:
            raise ValueError(f"sigma_digest must be a string of at most 64 characters, got {self.sigma_digest!r:.80}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["latent_shape"] = list(self.latent_shape)
        out["cfg"], out["sigma_min"], out["sigma_max"] = (float(f"{v:.12g}") for v in (self.cfg, self.sigma_min,
                                                                                        self.sigma_max))
        return out

    @classmethod
    def from_dict(cls, values, source="EMS target"):
        return _from_dict(cls, values, source, "target", required=("fingerprint", "model_kind", "cfg", "latent_shape",
                                                                  "sigma_min", "sigma_max"))


@dataclasses.dataclass(frozen=True)
class EMSKey:
    """The cache key: target + settings + estimator version.  ``to_json`` is canonical (sorted, numbers to 12
    significant digits); ``digest`` names the file.  The per-element statistics fit only their latent shape; the
    others keep only the channel count in the key (they serve every resolution)."""

    target: EMSTarget
    settings: EMSSettings
    version: str = ESTIMATOR_VERSION

    def to_json(self) -> str:
        target = self.target.to_dict()
        if self.settings.reduction != "per_element":
            target["latent_shape"] = target["latent_shape"][:1]
        return json.dumps({"target": target, "settings": self.settings.to_dict(), "version": self.version},
                          sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text, source="EMS"):
        """Parse and validate a stored ``cache_key``; ValueError naming ``source`` and the problem."""
        try:
            values = json.loads(text)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: metadata cache_key is not JSON ({str(text)[:80]!r})") from None
        if not isinstance(values, dict) or set(values) != {"target", "settings", "version"}:
            raise ValueError(f"{source}: metadata cache_key must be an object with target, settings and version, "
                             f"got {str(text)[:80]!r}")
        if not isinstance(values["version"], str):
            raise ValueError(f"{source}: metadata cache_key version must be a string")
        return cls(EMSTarget.from_dict(values["target"], f"{source}: cache_key"),
                   EMSSettings.from_dict(values["settings"], f"{source}: cache_key"), values["version"])


__all__ = ["EMSSettings", "EMSTarget", "EMSKey", "ESTIMATOR_VERSION", "REDUCTIONS", "JVP_BACKENDS",
           "SAMPLE_SOURCES", "GUIDANCE_MODES", "CHECK_NFES"]
