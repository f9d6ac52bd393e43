"""Issue 15, the noise-prediction SDE solvers (bench/results_flow_guidance.md): SDE-DPM-Solver-2M and -1 with and
without their guard (a step whose noise-form recurrence is unstable is taken in the data form, ``samplers/sde.py``),
next to the data-prediction SDE-DPM-Solver++(2M) and ++1.

    python bench/flow_guidance_noise_sde.py --part range --seeds 0 1 2     # the mixtures of tests/test_flow_guidance.py
    python bench/flow_guidance_noise_sde.py --part range --seeds 3 4 5 6   # held out
    python bench/flow_guidance_noise_sde.py --part strong --seeds 3 4
    python bench/flow_guidance_noise_sde.py --part ode --seeds 3 4 5

Mixtures as tests/test_flow_guidance.py (16-d, 8 components, means spread 1, guidance on components 0-1; 32 samples,
noise seed 10 + seed), guidance 1, 5, 7.5.  ``range``: max |output| / max |exact ODE output| (same noise, DOP853
rtol = atol = 1e-10) over the step counts, eta = 1, Gaussian noise seed 0; schedules as the test (eps: Karras rho 7
14.6 -> 0.03 and logSNR-uniform 80 -> 0.002; flow: shift 3 and 1 -> 0.995 -> logSNR-uniform -> 0.002; trailing 0).
``strong``: eta = 1, median per-sample MSE against a 1920-step Taylor-weighted data-form 2M SDE solution on the same
exact Brownian path (logSNR-uniform grids as bench/flow_guidance_sde.py; coarse runs take sub-grids).  ``ode``: eta = 0
(the guarded steps of DPM-Solver's multistep 2), median per-sample MSE against DOP853, next to DPM-Solver++(2M).
1 thread.
"""
import argparse
import math
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from flow_guidance import load_package  # noqa: E402
from flow_guidance_sde import FINE, BrownianPath  # noqa: E402

GUIDANCE = (1.0, 5.0, 7.5)
STEPS = (5, 6, 7, 8, 10, 12, 15, 20, 30, 40)
STRONG_STEPS = (5, 6, 8, 10, 12, 15, 20, 30, 40)  # divisors of FINE


def schedules(kind):
    from dpm_solver_nodes.samplers.sigmas import exponential, flow_logsnr_uniform, karras, shifted, with_zero
    if kind == "eps":
        return {"karras": lambda n: with_zero(karras(n, 0.03, 14.6, 7.0)),
                "logsnr": lambda n: with_zero(exponential(n, 0.002, 80.0))}

    def logsnr(n):
        inner = flow_logsnr_uniform(n - 1, -math.log(0.995 / 0.005), math.log(0.998 / 0.002))
        return with_zero(torch.cat([torch.ones(1, dtype=torch.float64), inner]))
    return {"shift3": lambda n: shifted(n, 3.0), "logsnr": logsnr}


def mixture(seed, guidance, kind):
    from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, GuidedGaussianMixture
    base = GaussianMixture.random(dim=16, components=8, seed=seed, spread=1.0)
    return GuidedGaussianMixture(base, [0, 1], scale=guidance).denoiser(kind)


def samplers(eta, noise):
    from dpm_solver_nodes.samplers import sde
    common = dict(eta=eta, disable=True, **noise)
    return {
        "SDE-DPM-Solver-2M, no guard": lambda m, x, s, k: sde.sample_dpm_solver_sde_2m(m, x, s, model_kind=k,
                                                                                       guard=False, **common),
        "SDE-DPM-Solver-2M, guard": lambda m, x, s, k: sde.sample_dpm_solver_sde_2m(m, x, s, model_kind=k, **common),
        "SDE-DPM-Solver-1, no guard": lambda m, x, s, k: sde.sample_dpm_solver_sde_1(m, x, s, model_kind=k,
                                                                                     guard=False, **common),
        "SDE-DPM-Solver-1, guard": lambda m, x, s, k: sde.sample_dpm_solver_sde_1(m, x, s, model_kind=k, **common),
        "SDE-DPM-Solver++(2M)": lambda m, x, s, k: sde.sample_dpmpp_2m_sde(m, x, s, model_kind=k, **common),
        "SDE-DPM-Solver++1": lambda m, x, s, k: sde.sample_dpmpp_sde_1(m, x, s, model_kind=k, **common),
    }


def part_range(seeds):
    from dpm_solver_nodes.analytic.gaussian_mixture import reference_solution, sample_noise
    runs = samplers(1.0, dict(seed=0, noise_type="gaussian"))
    print("max |output| / max |exact|, worst over seeds %s, both schedules, steps %s" % (list(seeds), list(STEPS)))
    print("| sampler | " + " | ".join("%s %g" % (k, g) for k in ("eps", "flow") for g in GUIDANCE) + " |")
    print("|---|" + "---|" * 6)
    worst = {}
    for kind in ("eps", "flow"):
        for g in GUIDANCE:
            for seed in seeds:
                model = mixture(seed, g, kind)
                for make in schedules(kind).values():
                    start = float(make(8)[0])
                    x = sample_noise(32, (16,), seed=10 + seed) * start
                    scale = reference_solution(model, x, start, 0.0, kind, rtol=1e-10, atol=1e-10).abs().max().item()
                    for name, run in runs.items():
                        for n in STEPS:
                            ratio = run(model, x, make(n), kind).abs().max().item() / scale
                            key = name, kind, g
                            worst[key] = max(worst.get(key, 0.0), ratio)
    for name in runs:
        print("| %s | " % name + " | ".join("%.3g" % worst[name, k, g] for k in ("eps", "flow") for g in GUIDANCE)
              + " |", flush=True)


def fine_grid(kind):
    if kind == "eps":
        return torch.linspace(math.log(14.6), math.log(0.03), FINE + 1, dtype=torch.float64).exp()
    lam = torch.linspace(math.log(0.001 / 0.999), math.log(0.97 / 0.03), FINE + 1, dtype=torch.float64)
    return torch.sigmoid(-lam)


def part_strong(seeds):
    from dpm_solver_nodes.analytic.gaussian_mixture import sample_noise
    from dpm_solver_nodes.samplers import sde
    print("eta = 1, median per-sample MSE against the 1920-step solution on one Brownian path, mean over seeds %s"
          % list(seeds))
    names = list(samplers(1.0, {}))
    print("| model, guidance | steps | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for kind in ("eps", "flow"):
        grid = fine_grid(kind)
        for g in GUIDANCE:
            errors = {}
            for seed in seeds:
                model = mixture(seed, g, kind)
                x = sample_noise(32, (16,), seed=10 + seed) * float(grid[0])
                path = BrownianPath(grid, (32, 16), seed + 20)
                ref = sde.sample_dpmpp_2m_sde(model, x, grid, model_kind=kind, noise_sampler=path, solver_type="heun",
                                              lower_order_final=False, disable=True)
                for name, run in samplers(1.0, dict(noise_sampler=path)).items():
                    for n in STRONG_STEPS:
                        y = run(model, x, grid[::FINE // n], kind)
                        errors.setdefault((name, n), []).append((y - ref).pow(2).mean(1).median().item())
            for n in STRONG_STEPS:
                print("| %s %g | %d | " % (kind, g, n) + " | ".join(
                    "%.3g" % (sum(errors[name, n]) / len(seeds)) for name in names) + " |", flush=True)


def part_ode(seeds):
    from dpm_solver_nodes.analytic.gaussian_mixture import reference_solution, sample_noise
    from dpm_solver_nodes.samplers import sample_dpmpp_2m, sde
    runs = {"DPM-Solver-2M (eta 0), no guard": lambda m, x, s, k: sde.sample_dpm_solver_sde_2m(
                m, x, s, model_kind=k, eta=0.0, guard=False, disable=True),
            "DPM-Solver-2M (eta 0), guard": lambda m, x, s, k: sde.sample_dpm_solver_sde_2m(
                m, x, s, model_kind=k, eta=0.0, disable=True),
            "DPM-Solver++(2M)": lambda m, x, s, k: sample_dpmpp_2m(m, x, s, model_kind=k, disable=True)}
    print("eta = 0, median per-sample MSE against DOP853, mean over seeds %s; only rows where the guard acted"
          % list(seeds))
    print("| model, guidance, schedule | steps | " + " | ".join(runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    acted = 0
    for kind in ("eps", "flow"):
        for g in GUIDANCE:
            for label, make in schedules(kind).items():
                errors = {}
                for seed in seeds:
                    model = mixture(seed, g, kind)
                    start = float(make(8)[0])
                    x = sample_noise(32, (16,), seed=10 + seed) * start
                    ref = reference_solution(model, x, start, 0.0, kind, rtol=1e-10, atol=1e-10)
                    for name, run in runs.items():
                        for n in STEPS:
                            mse = (run(model, x, make(n), kind) - ref).pow(2).mean(1).median().item()
                            errors.setdefault((name, n), []).append(mse)
                names = list(runs)
                for n in STEPS:
                    if errors[names[0], n] != errors[names[1], n]:
                        acted += 1
                        print("| %s %g %s | %d | " % (kind, g, label, n) + " | ".join(
                            "%.3g" % (sum(errors[name, n]) / len(seeds)) for name in names) + " |", flush=True)
    print("(the guard acted in %d of %d rows)" % (acted, 2 * len(GUIDANCE) * 2 * len(STEPS)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("range", "strong", "ode"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_package(ROOT)
    {"range": part_range, "strong": part_strong, "ode": part_ode}[args.part](args.seeds)


if __name__ == "__main__":
    main()
