"""Issue 15, the start at sigma = 1 for the solvers beyond 2M/3M: the noise-prediction DPM-Solver (multistep and
singlestep), DPM-Solver++(2S), SDE-DPM-Solver-2M and DPM-Solver-v3, before and after their steps near sigma = 1
moved to rho = -log sigma (``exponential.rho_weights``).  Results: bench/results_flow_guidance.md.

    python bench/flow_start.py --part order [--root CHECKOUT] --out order.json
    python bench/flow_start.py --part mixtures [--root CHECKOUT] --out mixtures.json
    python bench/flow_start.py --part embedded [--root CHECKOUT] --out embedded.json
    python bench/flow_start.py --part sde [--root CHECKOUT] --out sde.json
    python bench/flow_start.py --report BEFORE AFTER          # markdown tables from two --out files
    RHO_MAX_EXTRAPOLATION=inf python bench/flow_start.py --part mixtures ...   # the step-size rule switched off

order: the local error of the first step whose history holds sigma = 1 (multistep: step 1 of sigmas 1, e^-H, e^-2.5H
from the sampler's own x_1; singlestep: the step 1 -> e^-H itself; v3 with the corrector: one more tiny step, so
the corrector has redone the measured step), H halved twice, against DOP853; the slope log2(e(H) / e(H/2)) is the
local order + 1.
mixtures: median per-sample MSE against DOP853 (rtol = atol = 1e-10) from sigma = 1, random 16-d Gaussian mixtures
(8 components, means spread 1, guidance on components 0-1), 32 samples; embedded: the embedded flow model (32
samples, labels 0-9) against the Taylor 3M at 500 logSNR-uniform steps; sde: strong error of SDE-DPM-Solver-2M
(eta = 1) against a 1920-step SDE-DPM-Solver++(2M) (Taylor) solution on the same exact Brownian path.
``--root`` loads another checkout as ``dpm_solver_nodes`` (the "before" numbers come from the parent commit).
"""
import argparse
import json
import math
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from flow_guidance import load_package  # noqa: E402
from flow_guidance_sde import BrownianPath  # noqa: E402

FLOW_SIGMA_MIN = 0.0029  # ComfyUI's SD3 sampling: shift 3 at t = 1/1000


def shift3(n):
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    return 3 * t / (1 + 2 * t)


def linear(n):
    """Uniform in sigma from 1 (the EMS tuning's flow check, stats/tuning.sampling_sigmas)."""
    return torch.cat([torch.linspace(1.0, FLOW_SIGMA_MIN, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def samplers(s, ems=None, lower_order_final=None):
    """The solvers measured; ``lower_order_final=False`` for the local-order part (a 1-2 step run would otherwise
    end with first-order steps)."""
    flow = dict(model_kind="flow", disable=True)
    last = dict(flow, lower_order_final=lower_order_final)
    v3_last = dict(flow) if lower_order_final is None else last
    return {
        "2m": lambda m, x, sig: s.sample_dpmpp_2m(m, x, sig, **last),
        "dpm_solver multistep 2": lambda m, x, sig: s.sample_dpm_solver(m, x, sig, order=2, method="multistep", **last),
        "dpm_solver multistep 3": lambda m, x, sig: s.sample_dpm_solver(m, x, sig, order=3, method="multistep", **last),
        "dpm_solver singlestep 2": lambda m, x, sig: s.sample_dpm_solver(m, x, sig, order=2, **last),
        "dpm_solver singlestep 3": lambda m, x, sig: s.sample_dpm_solver(m, x, sig, order=3, **last),
        "dpmpp_2s": lambda m, x, sig: s.sample_dpmpp_2s(m, x, sig, **flow),
        "dpm_solver_sde_2m eta=0": lambda m, x, sig: s.sample_dpm_solver_sde_2m(m, x, sig, eta=0.0, **last),
        "v3": lambda m, x, sig: s.sample_dpm_solver_v3(m, x, sig, ems=ems, fallback=False, **v3_last),
        "v3 no corrector": lambda m, x, sig: s.sample_dpm_solver_v3(m, x, sig, ems=ems, use_corrector=False,
                                                                    fallback=False, **v3_last),
        "v3 order 3": lambda m, x, sig: s.sample_dpm_solver_v3(m, x, sig, ems=ems, order=3, fallback=False,
                                                               **v3_last),
    }


def counted(model):
    calls = []

    def wrapper(x, sigma, **kwargs):
        calls.append(1)
        return model(x, sigma, **kwargs)
    return wrapper, calls


def part_order(pkg, gm):
    """Local error of the first step whose history holds sigma = 1 (multistep: step 1 of sigmas 1, e^-H, e^-2.5H, a
    step-size ratio of 1.5 in rho, against the exact solution from the sampler's own x_1; v3 with its corrector: one
    more tiny step, so the corrector has redone step 1) or of the step out of sigma = 1 (singlestep: 1 -> e^-H)."""
    rows = []
    table = samplers(pkg.samplers, lower_order_final=False)
    tiny = 1e-5
    for name, run in table.items():
        singlestep = "singlestep" in name or name == "dpmpp_2s"
        corrected = name.startswith("v3") and name != "v3 no corrector"
        for guidance in (1.0, 7.5):
            for seed in (0, 1, 2):
                model = gm.GuidedGaussianMixture(gm.GaussianMixture.random(dim=8, components=5, seed=seed), [0, 1],
                                                 scale=guidance).denoiser("flow")
                x = gm.sample_noise(32, (8,), seed=1 + seed)
                errors = []
                for H in (0.02, 0.01, 0.005):
                    if singlestep:
                        start, sig = x, [1.0, math.exp(-H)]
                    else:
                        sig = [1.0, math.exp(-H), math.exp(-2.5 * H)]
                        start = run(model, x, torch.tensor(sig[:2], dtype=torch.float64))
                        if corrected:
                            sig.append(sig[-1] * math.exp(-tiny))
                    sig = torch.tensor(sig, dtype=torch.float64)
                    first = 0 if singlestep else 1
                    exact = gm.reference_solution(model, start, float(sig[first]), float(sig[-1]), "flow")
                    errors.append((run(model, x, sig) - exact).norm(dim=1).median().item())
                slopes = [math.log2(errors[k] / errors[k + 1]) for k in range(len(errors) - 1)]
                rows.append(dict(part="order", sampler=name, guidance=guidance, seed=seed, errors=errors,
                                 slopes=slopes))
                print(name, guidance, seed, [round(v, 2) for v in slopes], flush=True)
    return rows


def part_mixtures(pkg, gm, steps, seeds):
    from dpm_solver_nodes.samplers.sigmas import recommended_sigmas

    schedules = {"shift3": shift3, "recommended": lambda n: recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow"),
                 "linear": linear}
    table = samplers(pkg.samplers)
    rows = []
    for seed in seeds:
        for guidance in (1.0, 5.0, 7.5):
            base = gm.GaussianMixture.random(dim=16, components=8, seed=seed, spread=1.0)
            model = gm.GuidedGaussianMixture(base, [0, 1], scale=guidance).denoiser("flow")
            x = gm.sample_noise(32, (16,), seed=10 + seed)
            ref = gm.reference_solution(model, x, 1.0, 0.0, "flow", rtol=1e-10, atol=1e-10)
            for schedule, make in schedules.items():
                for n in steps:
                    for name, run in table.items():
                        wrapped, calls = counted(model)
                        out = run(wrapped, x, make(n))
                        mse = (out - ref).pow(2).mean(1)
                        rows.append(dict(part="mixtures", seed=seed, guidance=guidance, schedule=schedule, steps=n,
                                         sampler=name, nfe=len(calls), mse=mse.median().item(),
                                         max_abs=out.abs().max().item(), ref_max_abs=ref.abs().max().item()))
                print(seed, guidance, schedule, {r["sampler"]: f"{r['mse']:.3g}" for r in rows[-len(table) * len(
                    steps):][-len(table):]}, flush=True)
    return rows


def part_embedded(pkg, steps):
    from dpm_solver_nodes.embedded.model import load_model
    from dpm_solver_nodes.analytic.gaussian_mixture import sample_noise
    from dpm_solver_nodes.stats.ems import load_ems
    from dpm_solver_nodes.samplers.sigmas import recommended_sigmas

    network = load_model("flow")
    labels = torch.arange(32) % 10
    root = pathlib.Path(pkg.__file__).parent / "embedded"
    schedules = {"shift3": shift3, "recommended": lambda n: recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow"),
                 "linear": linear}
    rows = []
    x = sample_noise(32, (1, 16, 16), seed=100)
    for guidance in (1.0, 5.0):
        model = (lambda w: lambda x, sigma, **_: network(x, sigma, cond=labels, cfg_scale=w))(guidance)
        ems = load_ems(root / f"mnist16_flow_ems_cfg{guidance:g}.safetensors")
        lam = torch.linspace(math.log(0.005 / 0.995), math.log(0.998 / 0.002), 499, dtype=torch.float64)
        fine = torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-lam), torch.zeros(1, dtype=torch.float64)])
        ref = pkg.samplers.sample_dpmpp_3m(model, x, fine, model_kind="flow", solver_type="taylor", guard=False,
                                           disable=True)
        table = samplers(pkg.samplers)
        table.update({f"v3 ems {k}": v for k, v in samplers(pkg.samplers, ems).items() if k.startswith("v3")})
        for schedule, make in schedules.items():
            for n in steps:
                for name, run in table.items():
                    wrapped, calls = counted(model)
                    out = run(wrapped, x, make(n))
                    mse = (out - ref).pow(2).flatten(1).mean(1)
                    rows.append(dict(part="embedded", seed=0, guidance=guidance, schedule=schedule, steps=n,
                                     sampler=name, nfe=len(calls), mse=mse.median().item(),
                                     max_abs=out.abs().max().item(), ref_max_abs=ref.abs().max().item()))
                print(guidance, schedule, n, {r["sampler"]: f"{r['mse']:.3g}" for r in rows[-len(table):]},
                      flush=True)
    return rows


def part_sde(pkg, gm, steps):
    """Strong error at eta = 1 from sigma = 1 to FLOW_SIGMA_MIN, on sub-grids of a fine shift-3 grid (one Brownian
    path), no final denoise."""
    from dpm_solver_nodes.samplers import sde

    fine_n = 1920
    t_min = FLOW_SIGMA_MIN / (3 - 2 * FLOW_SIGMA_MIN)
    t = torch.linspace(1.0, t_min, fine_n + 1, dtype=torch.float64)
    grid = 3 * t / (1 + 2 * t)  # shift 3 from sigma = 1 to FLOW_SIGMA_MIN, no trailing 0
    rows = []
    for seed in (0, 1):
        for guidance in (1.0, 5.0):
            base = gm.GaussianMixture.random(dim=16, components=8, seed=seed, spread=1.0)
            model = gm.GuidedGaussianMixture(base, [0, 1], scale=guidance).denoiser("flow")
            x = gm.sample_noise(64, (16,), seed=seed)
            path = BrownianPath(grid, (64, 16), seed + 10)
            ref = sde.sample_dpmpp_2m_sde(model, x, grid, model_kind="flow", noise_sampler=path, solver_type="heun",
                                          lower_order_final=False, disable=True)
            for n in steps:
                sub = grid[::fine_n // n]
                for name, run in {
                        "dpm_solver_sde_2m": lambda s: sde.sample_dpm_solver_sde_2m(
                            model, x, s, model_kind="flow", noise_sampler=path, disable=True),
                        "dpmpp_2m_sde": lambda s: sde.sample_dpmpp_2m_sde(
                            model, x, s, model_kind="flow", noise_sampler=path, disable=True)}.items():
                    out = run(sub)
                    rows.append(dict(part="sde", seed=seed, guidance=guidance, schedule="shift3", steps=n,
                                     sampler=name, mse=(out - ref).pow(2).mean(1).median().item()))
            print(seed, guidance, [f"{r['sampler']} {r['steps']}: {r['mse']:.3g}" for r in rows[-2 * len(steps):]],
                  flush=True)
    return rows


def report(before_path, after_path):
    before = json.loads(pathlib.Path(before_path).read_text())
    after = json.loads(pathlib.Path(after_path).read_text())
    lines = []
    if after and after[0]["part"] == "order":
        lines += ["| sampler | guidance | slopes before (3 seeds, H -> H/2 -> H/4) | after |", "|---|---|---|---|"]
        for guidance in (1.0, 7.5):
            for name in dict.fromkeys(r["sampler"] for r in after):
                cells = []
                for rows in (before, after):
                    values = [v for r in rows if r["sampler"] == name and r["guidance"] == guidance
                              for v in r["slopes"]]
                    cells.append(f"{min(values):.2f}–{max(values):.2f}" if values else "–")
                lines.append(f"| {name} | {guidance:g} | {cells[0]} | {cells[1]} |")
        return "\n".join(lines)
    groups = {}
    for label, rows in (("before", before), ("after", after)):
        for r in rows:
            key = (r["guidance"], r["schedule"], r["sampler"], r["steps"])
            groups.setdefault(key, {}).setdefault(label, []).append(r)
    steps = sorted({k[3] for k in groups})
    for guidance, schedule in sorted({k[:2] for k in groups}):
        lines += ["", f"**{after[0]['part']}, guidance {guidance:g}, {schedule}**: median per-sample MSE (mean over "
                  "seeds), before / after (NFE where it changed)", "",
                  "| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for name in dict.fromkeys(k[2] for k in groups if k[:2] == (guidance, schedule)):
            cells = []
            for n in steps:
                entry = groups.get((guidance, schedule, name, n), {})
                mean = {label: sum(r["mse"] for r in entry[label]) / len(entry[label]) for label in entry}
                nfe = {label: entry[label][0].get("nfe") for label in entry}
                cell = " / ".join(f"{mean[label]:.3g}" if label in mean else "–" for label in ("before", "after"))
                if nfe.get("before") != nfe.get("after") and None not in nfe.values():
                    cell += f" ({nfe['before']} / {nfe['after']} NFE)"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[1]))
    parser.add_argument("--part", choices=("order", "mixtures", "embedded", "sde"), default="order")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 6, 8, 10, 15, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None)
    parser.add_argument("--report", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.report:
        print(report(*args.report))
        return
    torch.set_num_threads(1)
    pkg = load_package(args.root)
    import dpm_solver_nodes.samplers  # noqa: F401
    import dpm_solver_nodes.analytic.gaussian_mixture as gm
    if os.environ.get("RHO_MAX_EXTRAPOLATION"):  # measurement switch for the step-size rule of the start in rho
        import dpm_solver_nodes.samplers.exponential as exponential
        exponential.RHO_MAX_EXTRAPOLATION = float(os.environ["RHO_MAX_EXTRAPOLATION"])
    if args.part == "order":
        rows = part_order(pkg, gm)
    elif args.part == "mixtures":
        rows = part_mixtures(pkg, gm, args.steps, args.seeds)
    elif args.part == "embedded":
        rows = part_embedded(pkg, args.steps)
    else:
        rows = part_sde(pkg, gm, [n for n in args.steps if 1920 % n == 0])
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
