"""What v3 costs a user with EMS nobody checked: settings too small for the tuning or the check (N 20, K 10).

    python -m dpm_solver_nodes.bench.unchecked_ems [--out bench/results_unchecked_ems.md]

For both embedded models at CFG 1 and 5: ``stats.EMSJob`` with ``EMSSettings(N=20, K=10, check_samples=0)`` (the
explicit opt-out; without it the job now refuses these settings), then on 20 fresh noises ``sample_dpm_solver_v3``
with those EMS and default options against our DPM-Solver++(2M), both on ``recommended_sigmas`` at 5, 10, 20 steps,
RMS error against 200 steps of the 2M.  1 torch thread.
"""
from __future__ import annotations

import argparse
import pathlib

import torch

from ..embedded.make_ems import LabelledByRow
from ..embedded.model import load_model
from ..samplers import recommended_sigmas, sample_dpm_solver_v3, sample_dpmpp_2m
from ..stats.job import EMSJob, ModelAccess
from ..stats.settings import EMSSettings, EMSTarget

HERE = pathlib.Path(__file__).resolve().parent


def measure(kind, cfg, N=20, K=10, steps=(5, 10, 20), samples=20):
    model = load_model(kind)
    wrapped = LabelledByRow(model, cfg)
    sigma_max = model.sigma_max if kind == "eps" else 0.999
    target = EMSTarget("unchecked-" + kind, kind, cfg, tuple(model.shape), model.sigma_min, sigma_max)
    ems = EMSJob(target, EMSSettings(N=N, K=K, check_samples=0), batch_size=10).compute(ModelAccess(wrapped))
    noise = torch.randn((samples,) + tuple(model.shape), generator=torch.Generator().manual_seed(5))

    def run(solver, n, **options):
        sigmas = recommended_sigmas(n, model.sigma_min, sigma_max, kind).float()
        x = noise * sigmas[0] if kind == "eps" else noise
        return solver(wrapped, x, sigmas, model_kind=kind, disable=True, **options)

    rows = []
    with torch.no_grad():
        reference = run(sample_dpmpp_2m, 200)
        for n in steps:
            error_2m = (run(sample_dpmpp_2m, n) - reference).pow(2).mean().sqrt().item()
            error_v3 = (run(sample_dpm_solver_v3, n, ems=ems) - reference).pow(2).mean().sqrt().item()
            rows.append((kind, cfg, n, error_2m, error_v3))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results_unchecked_ems.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["# v3 with unchecked EMS (N 20, K 10, check_samples=0) against DPM-Solver++(2M)", "",
             "`python -m dpm_solver_nodes.bench.unchecked_ems` (1 thread). RMS error against 200 steps of the 2M, "
             "20 samples, both on `recommended_sigmas`.", "",
             "| model | CFG | steps | 2M error | v3 error | v3 / 2M |", "|---|---|---|---|---|---|"]
    for kind in ("eps", "flow"):
        for cfg in (1.0, 5.0):
            for kind_, cfg_, n, error_2m, error_v3 in measure(kind, cfg):
                lines.append(f"| embedded {kind_} | {cfg_:g} | {n} | {error_2m:.3g} | {error_v3:.3g} | "
                             f"{error_v3 / error_2m:.2f} |")
                print(lines[-1], flush=True)
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
