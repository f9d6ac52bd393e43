"""Issue 15 measurements: flow starts at sigma = 1 and 3M stability with guidance, on exact Gaussian-mixture models.

Error = median over the batch of the per-sample MSE against a DOP853 solve (rtol = atol = 1e-10) from the same noise;
"max |x|" = the largest |value| of any output (data range: the mixture's means and spreads).  Run as a script:

    python bench/flow_guidance.py [--root CHECKOUT] [--out results.json] [--kind flow|eps] [--steps 5 6 8 10 12]

``--root`` loads another checkout as ``dpm_solver_nodes`` (the "before" numbers come from the parent commit).
"""
import argparse
import importlib.util
import json
import math
import os
import pathlib
import sys

import torch


def load_package(root):
    spec = importlib.util.spec_from_file_location("dpm_solver_nodes", pathlib.Path(root) / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dpm_solver_nodes"] = module
    spec.loader.exec_module(module)
    return module


def shift3_sigmas(n):
    """The hosts' default flow schedule: time-uniform t with shift 3, sigma = 3t / (1 + 2t), trailing 0."""
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    return 3 * t / (1 + 2 * t)


def logsnr_flow_sigmas(n):
    """1 -> 0.995, uniform in lambda down to 0.002, then 0 (issue 13's flow schedule)."""
    lo, hi = math.log(0.995 / 0.005), math.log(0.998 / 0.002)
    lam = torch.linspace(-lo, hi, n - 1, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-lam), torch.zeros(1, dtype=torch.float64)])


def karras_sigmas(n, sigma_min=0.03, sigma_max=14.6, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def logsnr_eps_sigmas(n, sigma_min=0.002, sigma_max=80.0):
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([s, s.new_zeros(1)])


SCHEDULES = {"flow": {"shift3": shift3_sigmas, "logsnr": logsnr_flow_sigmas},
             "eps": {"karras": karras_sigmas, "logsnr": logsnr_eps_sigmas}}


def samplers(pkg, kind, kdiff):
    s = pkg.samplers
    out = {
        "2m": lambda m, x, sig: s.sample_dpmpp_2m(m, x, sig, model_kind=kind, disable=True),
        "3m": lambda m, x, sig: s.sample_dpmpp_3m(m, x, sig, model_kind=kind, disable=True),
        "3m-taylor": lambda m, x, sig: s.sample_dpmpp_3m(m, x, sig, model_kind=kind, solver_type="taylor",
                                                         disable=True),
        "ddim": lambda m, x, sig: s.sample_ddim(m, x, sig, model_kind=kind, disable=True),
        "v3(ems=None)": lambda m, x, sig: s.sample_dpm_solver_v3(m, x, sig, model_kind=kind, disable=True),
        "2m-sde(eta=0)": lambda m, x, sig: s.sample_dpmpp_2m_sde(m, x, sig, model_kind=kind, eta=0.0,
                                                                 disable=True),
        "3m-sde(eta=0)": lambda m, x, sig: s.sample_dpmpp_3m_sde(m, x, sig, model_kind=kind, eta=0.0,
                                                                 disable=True),
    }
    if kdiff is not None:
        out["kdiff:2m"] = lambda m, x, sig: kdiff.sample_dpmpp_2m(m, x, sig.to(x.dtype), disable=True)
    return out


def report(before_path, after_path, title):
    """Markdown tables from two result files: mean over seeds of the median per-sample MSE, before -> after."""
    tables = {}
    for label, path in (("before", before_path), ("after", after_path)):
        for row in json.loads(pathlib.Path(path).read_text()):
            if "mse" in row:
                key = (row["guidance"], row["schedule"], row["sampler"], row["steps"])
                tables.setdefault(key, {}).setdefault(label, []).append((row["mse"], row["max_abs"],
                                                                           row["ref_max_abs"]))
    steps = sorted({k[3] for k in tables})
    lines = []
    for w, schedule in sorted({(k[0], k[1]) for k in tables}):
        lines += ["", f"**{title}, guidance {w:g}, {schedule}**: median per-sample MSE (mean over seeds), "
                  "before / after", "", "| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |",
                  "|---" * (len(steps) + 1) + "|"]
        for sampler in sorted({k[2] for k in tables if k[:2] == (w, schedule)}):
            cells = []
            for n in steps:
                entry = tables.get((w, schedule, sampler, n), {})
                values = [sum(v[0] for v in entry[label]) / len(entry[label]) if label in entry else float("nan")
                          for label in ("before", "after")]
                cells.append(f"{values[0]:.3g} / {values[1]:.3g}" if "kdiff" not in sampler else f"{values[1]:.3g}")
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
        ours, theirs = "2m", "kdiff:2m"
        if any(k[2] == theirs for k in tables if k[:2] == (w, schedule)):
            ratios = []
            for n in steps:
                a = tables[(w, schedule, ours, n)]
                k = tables[(w, schedule, theirs, n)]["after"]
                mean_k = sum(v[0] for v in k) / len(k)
                ratios.append(" / ".join(f"{sum(v[0] for v in a[label]) / len(a[label]) / mean_k:.2f}"
                                         for label in ("before", "after")))
            lines.append("| our 2M / k-diffusion 2M | " + " | ".join(ratios) + " |")
        peak = {label: max(v[1] for k2, e in tables.items() if k2[:2] == (w, schedule) and k2[2] == "3m"
                           for v in e.get(label, [])) for label in ("before", "after")}
        exact = max(v[2] for k2, e in tables.items() if k2[:2] == (w, schedule) for v in e["after"])
        lines.append(f"\nlargest |output| of the official 3M over these step counts: before {peak['before']:.3g}, "
                     f"after {peak['after']:.3g} (exact solution: {exact:.3g})")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[1]))
    parser.add_argument("--out", default=None)
    parser.add_argument("--kind", default="flow", choices=("flow", "eps"))
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 6, 7, 8, 10, 12, 15, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0, 7.5])
    parser.add_argument("--samplers", nargs="+", default=None)
    parser.add_argument("--model", default="mixture", choices=("mixture", "embedded"),
                        help="exact Gaussian mixtures (one per seed) or the embedded MNIST model "
                             "(--seeds = noise seeds)")
    parser.add_argument("--spread", type=float, default=1.0, help="spread of the mixture's means")
    parser.add_argument("--variance", type=float, nargs=2, default=[0.05, 0.5], help="range of component variances")
    parser.add_argument("--report", nargs=2, metavar=("BEFORE", "AFTER"), help="print tables from two --out files")
    parser.add_argument("--title", default="Gaussian mixtures")
    args = parser.parse_args(argv)
    if args.report:
        print(report(*args.report, args.title))
        return
    torch.set_num_threads(1)
    load_package(args.root)
    import dpm_solver_nodes.samplers as pkg_samplers  # noqa: F401
    pkg = sys.modules["dpm_solver_nodes"]
    from dpm_solver_nodes.analytic.gaussian_mixture import (GaussianMixture, GuidedGaussianMixture,
                                                             reference_solution, sample_noise)
    try:
        try:
            from dpm_solver_nodes.peers import load_kdiffusion
        except ImportError:  # checkouts before the registry moved out of bench/
            from dpm_solver_nodes.bench.peers import load_kdiffusion
        kdiff = load_kdiffusion()
    except Exception:  # noqa: BLE001 - the peer is optional
        kdiff = None
    if os.environ.get("GUARD_RATIO"):  # measurement switch for the 3M guard
        import dpm_solver_nodes.samplers.exponential as exponential
        value = os.environ["GUARD_RATIO"]
        exponential.GUARD_RATIO = None if value == "none" else float(value)
    for name in ("GUARD_MIN_STEP", "GUARD_NEGLIGIBLE", "GUARD_NEXT_SMALL", "GUARD_NEXT_TERM"):  # the guard's others
        if os.environ.get(name):
            import dpm_solver_nodes.samplers.exponential as exponential
            setattr(exponential, name, float(os.environ[name]))
    table = samplers(pkg, args.kind, kdiff)
    names = args.samplers or list(table)
    results = []
    for seed in args.seeds:
        if args.model == "mixture":
            mixture = GaussianMixture.random(dim=4 * 16 * 16, components=8, seed=seed, spread=args.spread,
                                             variance_range=tuple(args.variance))
        else:
            from dpm_solver_nodes.embedded.model import load_model
            network = load_model(args.kind)
        for w in args.guidance:
            if args.model == "mixture":
                model = GuidedGaussianMixture(mixture, [0, 1], scale=w).denoiser(args.kind)
            else:
                labels = torch.arange(32) % 10
                model = (lambda w: lambda x, sigma, **_: network(x, sigma, cond=labels, cfg_scale=w))(w)
            for sched_name, make in SCHEDULES[args.kind].items():
                start = float(make(5)[0])
                if args.model == "mixture":
                    x = sample_noise(16, (4, 16, 16), seed=100 + seed) * start
                    ref = reference_solution(model, x, start, 0.0, args.kind, rtol=1e-10, atol=1e-10)
                else:  # the demo's converged reference: Taylor-form 3M, 500 logSNR-uniform steps, float64
                    x = sample_noise(32, (1, 16, 16), seed=100 + seed) * start
                    fine = SCHEDULES[args.kind]["logsnr"](500)
                    ref = pkg.samplers.sample_dpmpp_3m(model, x, fine, model_kind=args.kind, solver_type="taylor",
                                                       guard=False, disable=True) if "guard" in \
                        pkg.samplers.sample_dpmpp_3m.__code__.co_varnames else pkg.samplers.sample_dpmpp_3m(
                            model, x, fine, model_kind=args.kind, solver_type="taylor", disable=True)
                for n in args.steps:
                    sigmas = make(n)
                    for name in names:
                        try:
                            out = table[name](model, x, sigmas)
                        except Exception as error:  # noqa: BLE001 - report, keep measuring
                            results.append(dict(seed=seed, guidance=w, schedule=sched_name, steps=n, sampler=name,
                                                error=repr(error)))
                            continue
                        mse = ((out - ref) ** 2).flatten(1).mean(1)
                        results.append(dict(seed=seed, guidance=w, schedule=sched_name, steps=n, sampler=name,
                                            mse=mse.median().item(), max_mse=mse.max().item(),
                                            max_abs=out.abs().max().item(), ref_max_abs=ref.abs().max().item()))
                    print(seed, w, sched_name, n, {r["sampler"]: f"{r.get('mse', float('nan')):.3g}"
                                                   for r in results[-len(names):]}, flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
