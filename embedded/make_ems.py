"""Estimate and ship DPM-Solver-v3's EMS for the embedded models, one file per guidance scale.

    python -m dpm_solver_nodes.embedded.make_ems eps --cfg 1 5 [--N 200] [--K 50] [--reduction per_channel]

writes ``mnist16_<kind>_ems_cfg<w>.safetensors`` next to the weights (``EMS.save``: temp file + ``os.replace``).
x0 are the model's own samples at the same guidance scale (``stats.estimate.generate_x0``), sample k with label
k mod 10: the model wrapper gives row r of every call the label r mod 10 and the batch size is a multiple of 10, so
each x0 is always noised and denoised under its own label.  Settings: ``stats.estimate.RECOMMENDED_SETTINGS``
(N = 200, per_channel, s and b fitted over +-0.5 in lambda, ridge 0.01 on s; bench/results_v3_study.md), then
``check_v3_against_dpmpp_2m`` stores the v3 / DPM-Solver++(2M) error ratio per NFE in the file, which the sampler's
automatic fallback reads.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

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


def make_ems(kind, cfg_scale, N=200, K=50, reduction="per_channel", seed=0, out=None):
    from ..stats.estimate import RECOMMENDED_SETTINGS, check_v3_against_dpmpp_2m, estimate_ems, generate_x0

    if K % BATCH:
        raise ValueError(f"K must be a multiple of {BATCH} (labels follow the row position), got {K}")
    model = load_model(kind)
    wrapped = LabelledByRow(model, cfg_scale)
    sigma_max = model.sigma_max if kind == "eps" else 0.999
    start = time.perf_counter()
    x0 = generate_x0(wrapped, model.shape, K, sigma_max, model.sigma_min, kind, steps=100, seed=seed,
                     batch_size=BATCH)
    x0_seconds = time.perf_counter() - start
    ems = estimate_ems(wrapped, x0, model.sigma_min, sigma_max, model_kind=kind, N=N, K=K, reduction=reduction,
                       sb_window=RECOMMENDED_SETTINGS["sb_window"], s_ridge=RECOMMENDED_SETTINGS["s_ridge"],
                       batch_size=BATCH, seed=seed,
                       metadata={"model": f"embedded mnist16_{kind}", "guidance": f"{float(cfg_scale):g}",
                                 "x0_source": "model samples (generate_x0, 100 steps), label k mod 10",
                                 "x0_seconds": f"{x0_seconds:.1f}"})
    ems = check_v3_against_dpmpp_2m(wrapped, ems, model.shape, model.sigma_min, sigma_max, seed=seed, steps=100,
                                    model_kind=kind)
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
