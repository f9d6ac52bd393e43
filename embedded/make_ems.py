"""Estimate and ship DPM-Solver-v3's EMS for the embedded models, one file per guidance scale.

    python -m dpm_solver_nodes.embedded.make_ems eps --cfg 1 5 [--N 200] [--K 50] [--reduction per_channel]

writes ``mnist16_<kind>_ems_cfg<w>.safetensors`` next to the weights (``EMS.save``: temp file + ``os.replace``)
through the package's one EMS job (``stats.EMSJob``): x0 are the model's own samples at the same guidance scale,
sample k with label k mod 10 (the model wrapper gives row r of every call the label r mod 10 and the batch size is a
multiple of 10, so each x0 is always noised and denoised under its own label); settings ``embedded_settings``
(``EMSSettings`` defaults: N = 200, per_channel, s and b fitted over +-0.5 in lambda, ridge 0.01 on s;
bench/results_v3_study.md); the job's check stores the v3 / DPM-Solver++(2M) decision per NFE in the file.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from ..stats.fingerprint import weights_digest
from ..stats.job import EMSJob, ModelAccess
from ..stats.settings import EMSSettings, EMSTarget
from .model import HERE, NUM_CLASSES, load_model

BATCH = 50


class LabelledByRow(torch.nn.Module):
    """The embedded denoiser with label (row mod 10) and a fixed guidance scale, as a plain ``D(x, sigma)``."""

    def __init__(self, model, cfg_scale):
        super().__init__()
        self.model = model
        self.cfg_scale = float(cfg_scale)

    def forward(self, x, sigma, **_):
        labels = torch.arange(len(x), device=x.device) % NUM_CLASSES
        return self.model(x, sigma, cond=labels, cfg_scale=self.cfg_scale)


def ems_path(kind, cfg_scale):
    return HERE / f"mnist16_{kind}_ems_cfg{float(cfg_scale):g}.safetensors"


def embedded_settings(N=200, K=50, reduction="per_channel", seed=0):
    """The shipped files' settings: ``EMSSettings`` defaults (window 0.5, ridge 0.01) with K = 50 samples of 100
    steps, checked on 50 references of 100 steps (the check of the files before the EMS job existed)."""
    return EMSSettings(N=N, K=K, reduction=reduction, seed=seed, x0_steps=100, check_samples=50, check_steps=100)


def make_ems(kind, cfg_scale, N=200, K=50, reduction="per_channel", seed=0, out=None):
    """Run the EMS job for the embedded ``kind`` model at ``cfg_scale`` and write the file (``out`` or
    ``ems_path``); returns (path, EMS)."""
    if K % BATCH:
        raise ValueError(f"K must be a multiple of {BATCH} (labels follow the row position), got {K}")
    model = load_model(kind)
    wrapped = LabelledByRow(model, cfg_scale)
    sigma_max = model.sigma_max if kind == "eps" else 0.999
    target = EMSTarget(weights_digest(model.state_dict())[:32], kind, float(cfg_scale), tuple(model.shape),
                       model.sigma_min, sigma_max)
    job = EMSJob(target, embedded_settings(N, K, reduction, seed), batch_size=BATCH,
                 metadata={"model": f"embedded mnist16_{kind}",
                           "x0_source": "model samples (100 steps), label k mod 10"})
    ems = job.compute(ModelAccess(wrapped))
    path = out or ems_path(kind, cfg_scale)
    ems.save(path)
    return path, ems


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dpm_solver_nodes.embedded.make_ems", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("eps", "flow"))
    parser.add_argument("--cfg", nargs="+", type=float, default=[1.0, 5.0])
    parser.add_argument("--N", type=int, default=200)
    parser.add_argument("--K", type=int, default=50)
    parser.add_argument("--reduction", default="per_channel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for w in args.cfg:
        start = time.perf_counter()
        path, ems = make_ems(args.kind, w, args.N, args.K, args.reduction, args.seed)
        print(json.dumps({"path": str(path), "seconds": round(time.perf_counter() - start, 1),
                          "ems": repr(ems), "metadata": ems.metadata}, indent=1), flush=True)


if __name__ == "__main__":
    main()
