"""Issue 15, the 3M guard chosen by measurement (bench/results_flow_guidance.md): the error of the ODE 3M under
candidate guard rules and second-order step forms, divided by the (midpoint) 2M's, on many random Gaussian mixtures.

    python bench/flow_guidance_guard.py --seeds 0 1 2 --out train.json            # the mixtures the rule was chosen on
    python bench/flow_guidance_guard.py --seeds 3 4 5 --steps 8 10 12 15 20 --out held_out.json
    python bench/flow_guidance_guard.py --report train.json                      # worst / median / geometric mean

The 3M loop below is ``samplers.dpmpp.sample_dpmpp_3m`` with the guard and the second-order steps made switchable
(``--check`` verifies that the rule "ratio:0.25:0.003:1.5:0.005" with midpoint second-order steps reproduces the
package's 3M bit for bit, both forms).  A rule "ratio:R:N:T:S" keeps a sample's third-order result x3 where
|x3 - x2| <= R |x2 - x1|, or |x3 - x2| <= N |x2|, or (official form, a fourth output) |x3 - x2| <= S |x2| and
|x4 - x3t| <= T |x3t - x2| (x3t, x4: the Taylor steps through three and four outputs); "unit:R:N:T:S" scales R per
unit of the official D'' weight (the Taylor form gets 2R: the rule before this change); "none" keeps every
third-order step.  Steps with h < 0.2 are never guarded.  Error: median over 32 samples
of the per-sample MSE against DOP853 (rtol = atol = 1e-10).  Mixture families: "test" (16-d, 8 components, means
spread 1, guidance on components 0-1, as tests/test_flow_guidance.py) and "tuning" (8-d, 6 components, spread 2,
guidance on components 0-2, as tests/test_tuning.py); guidance 1, 5, 7.5; eps (Karras rho 7 14.6 -> 0.03,
logSNR-uniform 80 -> 0.002, recommended) and flow (shift 3, 1 -> 0.995 -> logSNR-uniform -> 0.002, uniform in sigma,
recommended) schedules.
"""
import argparse
import collections
import itertools
import json
import math
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from flow_guidance import load_package  # noqa: E402

GUARD_MIN_STEP = 0.2


def norm(value):
    return value.square().flatten(1).sum(1).sqrt()


def keep_third(rule, x1, x2, x3, x3t, x4t, h, scales):
    """The per-sample mask of the samples that keep x3 under ``rule``."""
    if rule == "none" or h < GUARD_MIN_STEP:
        return torch.ones(x1.shape[0], dtype=torch.bool)
    kind, *values = rule.split(":")
    ratio, negligible, next_term, next_small = map(float, values)
    limit = ratio * (scales[2] if scales else 1.0) / 0.5 if kind == "unit" else ratio
    keep = (norm(x3 - x2) <= limit * norm(x2 - x1)) | (norm(x3 - x2) <= negligible * norm(x2))
    if x4t is not None and next_term > 0 and scales:
        keep |= (norm(x4t - x3t) <= next_term * norm(x3t - x2)) & (norm(x3 - x2) <= next_small * norm(x2))
    return keep


def sample_3m(pkg, model, x, sigmas, kind, solver_type, rule, second_form):
    """``sample_dpmpp_3m`` (defaults, final step "auto") with the guard ``rule`` and second-order steps
    ``second_form`` ("midpoint": the paper's 2M, "taylor": Taylor weight psi_2)."""
    from dpm_solver_nodes.samplers.common import SamplerRun
    from dpm_solver_nodes.samplers.dpmpp import OFFICIAL_3M_SCALES, _midpoint_2m_step, _resolve_final_step
    from dpm_solver_nodes.samplers.exponential import data_prediction_step as step, extrapolated_denoised

    scales = OFFICIAL_3M_SCALES if solver_type == "official" else None
    run = SamplerRun(model, x, sigmas, None, None, True, model_kind=kind, final_step="denoise")
    lower_order_final = run.default_lower_order_final(None)
    t = run.table
    final = _resolve_final_step("auto", t, kind)
    x = run.start(x)

    def second(x, i, lams, outputs):
        if second_form == "midpoint" and math.isfinite(lams[1]):
            return _midpoint_2m_step(x, t, i, outputs[0], lams[1], outputs[1])
        return step(x, t, i, history=(lams[:2], outputs[:2]))

    lams, outputs = [], []
    for i in range(t.steps):
        denoised = run.denoise(x, i)
        lams, outputs = [t.lam[i]] + lams[:3], [denoised] + outputs[:3]
        order = run.order(i, 3, lower_order_final, min(len(lams), 3))
        if t.sigma[i + 1] == 0 and final == "extrapolate":
            x = extrapolated_denoised(lams, outputs)
        elif order == 1:
            x = step(x, t, i, [denoised])
        elif order == 2:
            x = second(x, i, lams, outputs)
        else:
            x3 = step(x, t, i, history=(lams[:3], outputs[:3]), scales=scales)
            if t.sigma[i + 1] == 0 or rule == "none":
                x = x3
                continue
            x2, x1 = second(x, i, lams, outputs), step(x, t, i, [denoised])
            x3t = x3 if scales is None else step(x, t, i, history=(lams[:3], outputs[:3]))
            x4t = step(x, t, i, history=(lams, outputs)) if len(lams) == 4 and all(map(math.isfinite, lams)) else None
            keep = keep_third(rule, x1, x2, x3, x3t, x4t, t.h[i], scales)
            x = torch.where(keep.reshape(-1, *[1] * (x.ndim - 1)), x3, x2)
    return run.finish(x)


def schedules(kind):
    from dpm_solver_nodes.samplers.sigmas import (exponential, flow_logsnr_uniform, karras, recommended_sigmas,
                                                  shifted, with_zero)

    if kind == "eps":
        return {"karras": lambda n: with_zero(karras(n, 0.03, 14.6, 7.0)),
                "logsnr": lambda n: with_zero(exponential(n, 0.002, 80.0)),
                "recommended": lambda n: recommended_sigmas(n, 0.03, 14.6, "eps")}
    return {"shift3": lambda n: shifted(n, 3.0),
            "logsnr": lambda n: with_zero(torch.cat([torch.ones(1, dtype=torch.float64), flow_logsnr_uniform(
                n - 1, -math.log(0.995 / 0.005), math.log(0.998 / 0.002))])),
            "linear": lambda n: torch.cat([torch.linspace(1.0, 0.002, n, dtype=torch.float64),
                                           torch.zeros(1, dtype=torch.float64)]),
            "recommended": lambda n: recommended_sigmas(n, 0.0029, 1.0, "flow")}


def mixture(gm, family, seed):
    if family == "test":
        return gm.GaussianMixture.random(dim=16, components=8, seed=seed, spread=1.0), [0, 1]
    return gm.GaussianMixture.random(dim=8, components=6, seed=seed), [0, 1, 2]


def report(path):
    rows = json.loads(pathlib.Path(path).read_text())
    lines = []
    for steps in ({8, 10, 12}, {15, 20}):
        groups = collections.defaultdict(list)
        for r in rows:
            if r["steps"] in steps:
                groups[(r["type"], r["second"], r["rule"])].append(r)
        if not groups:
            continue
        lines += ["", f"3M / 2M error at {min(steps)}-{max(steps)} steps ({len(next(iter(groups.values())))} cases "
                  "per row)", "", "| form | second-order steps | rule | worst | median | geometric mean | < 0.5 | "
                  "> 1.5 | worst case |", "|---|---|---|---|---|---|---|---|---|"]
        for key in sorted(groups):
            ratios = [r["e3"] / r["e2"] for r in groups[key]]
            w = max(groups[key], key=lambda r: r["e3"] / r["e2"])
            lines.append("| %s | %s | %s | %.3g | %.3g | %.3g | %d | %d | %s %s %s g%g %s %d |" % (
                *key, max(ratios), statistics.median(ratios), math.exp(statistics.mean(map(math.log, ratios))),
                sum(q < 0.5 for q in ratios), sum(q > 1.5 for q in ratios), w["family"], w["seed"], w["kind"],
                w["guidance"], w["schedule"], w["steps"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[1]))
    parser.add_argument("--rules", nargs="+", default=["none", "unit:0.25:0.003:0:0", "ratio:0.25:0.003:0:0",
                                                        "ratio:0.25:0.003:1.5:0.005"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=["test", "tuning"])
    parser.add_argument("--kinds", nargs="+", default=["eps", "flow"])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 10, 12])
    parser.add_argument("--types", nargs="+", default=["official", "taylor"])
    parser.add_argument("--second", nargs="+", default=["midpoint"])
    parser.add_argument("--out")
    parser.add_argument("--report")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    torch.set_num_threads(1)
    pkg = load_package(args.root)
    import dpm_solver_nodes.samplers  # noqa: F401
    import dpm_solver_nodes.analytic.gaussian_mixture as gm
    if args.check:
        worst = 0.0
        for kind, g in itertools.product(("eps", "flow"), (1.0, 7.5)):
            base, classes = mixture(gm, "test", 0)
            model = gm.GuidedGaussianMixture(base, classes, scale=g).denoiser(kind)
            for name, make in schedules(kind).items():
                for n, solver_type in itertools.product((8, 12, 20), ("official", "taylor")):
                    sigmas = make(n)
                    x = gm.sample_noise(8, (base.dim,), seed=1) * float(sigmas[0])
                    ours = sample_3m(pkg, model, x, sigmas, kind, solver_type, "ratio:0.25:0.003:1.5:0.005",
                                     "midpoint")
                    theirs = pkg.samplers.sample_dpmpp_3m(model, x, sigmas, model_kind=kind, solver_type=solver_type,
                                                          disable=True)
                    worst = max(worst, (ours - theirs).abs().max().item())
        print("largest difference to the package's 3M:", worst)
        return
    rows = []
    for family, seed, kind, g in itertools.product(args.families, args.seeds, args.kinds, (1.0, 5.0, 7.5)):
        base, classes = mixture(gm, family, seed)
        model = gm.GuidedGaussianMixture(base, classes, scale=g).denoiser(kind)
        for name, make in schedules(kind).items():
            start = 1.0 if kind == "flow" else float(make(8)[0])
            x = gm.sample_noise(32, (base.dim,), seed=10 + seed) * start
            ref = gm.reference_solution(model, x, start, 0.0, kind, rtol=1e-10, atol=1e-10)
            for n in args.steps:
                sigmas = make(n)
                two = pkg.samplers.sample_dpmpp_2m(model, x, sigmas, model_kind=kind, disable=True)
                e2 = (two - ref).pow(2).flatten(1).mean(1).median().item()
                for solver_type, second, rule in itertools.product(args.types, args.second, args.rules):
                    out = sample_3m(pkg, model, x, sigmas, kind, solver_type, rule, second)
                    rows.append(dict(family=family, seed=seed, kind=kind, guidance=g, schedule=name, steps=n,
                                     type=solver_type, second=second, rule=rule, e2=e2,
                                     e3=(out - ref).pow(2).flatten(1).mean(1).median().item()))
        print(family, seed, kind, g, flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
