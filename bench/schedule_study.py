"""Which step schedule our solvers do best on, per model kind (issue 13).  Writes bench/results/schedules.json and
bench/results_schedules.md.

    python -m dpm_solver_nodes.bench.schedule_study [--quick] [--candidates] [--kind flow|eps]

Models: the exact denoiser of random Gaussian mixtures (``analytic.GaussianMixture.random``, d = 8, 5 components,
seeds 0-3, 64 samples each, float64; reference: DOP853 at 1e-12, ``reference_solution``) and the embedded trained
eps and flow models (64 samples, labels k mod 10, float64; reference: our 3M (Taylor) on 1000 logSNR-uniform steps).
Metric: the median over samples of the per-sample RMS error of x0 (trajectories near basin boundaries switch
modes, so the mean is noisy; the benchmark's metric).  eps range [0.0292, 14.6] (SD v1), flow from
sigma = 1 with sigma_min 1e-3.  Solvers: our 2M and 3M, PyPI k-diffusion's 2M (what ComfyUI runs).
``--candidates`` adds the flow variants the recommendation was chosen from ("1, then lambda log(0.1 h)..end" is
the flow rule recommended before the flow solvers kept the sigma = 1 output in their history; "mix ..." are
``flow_shift_mix`` variants around the recommended shift 3, w 0.5, taper 0.25).  ``--kind`` runs one model kind.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib

import torch

HERE = pathlib.Path(__file__).resolve().parent
EPS_RANGE = (0.0292, 14.6)
FLOW_SIGMA_MIN = 1e-3
STEPS = (6, 8, 10, 15, 20, 40)
MIXTURE_SEEDS = (0, 1, 2, 3)
SAMPLES = 64


def schedules(kind, candidates=False):
    """name -> (steps -> n + 1 sigmas)."""
    from ..embedded.model import DiscreteVPSchedule
    from ..samplers.sigmas import flow_lambda, flow_logsnr_uniform, flow_shift_mix, make_sigmas, \
        recommended_sigmas, shifted, with_zero

    if kind == "eps":
        lo, hi = EPS_RANGE
        discrete = DiscreteVPSchedule()
        out = {name: (lambda n, name=name: make_sigmas(name, n, "eps", lo, hi, discrete=discrete))
               for name in ("karras", "logsnr_uniform", "time_uniform")}
        out["recommended"] = lambda n: recommended_sigmas(n, lo, hi, "eps")
        if candidates:
            from ..samplers.sigmas import karras
            for rho in (10.0, 15.0, 25.0):
                out[f"karras rho {rho:g}"] = lambda n, rho=rho: with_zero(karras(n, lo, hi, rho))
        return out
    lo = FLOW_SIGMA_MIN
    out = {"shift3 (hosts)": lambda n: shifted(n, 3.0),
           "time_uniform": lambda n: make_sigmas("time_uniform", n, "flow", lo),
           "karras": lambda n: make_sigmas("karras", n, "flow", lo),
           "logsnr_uniform": lambda n: make_sigmas("logsnr_uniform", n, "flow", lo),
           "recommended": lambda n: recommended_sigmas(n, lo, 1.0, "flow")}
    if candidates:
        lam_end = flow_lambda(lo)
        for start in (-4.0, -3.0):
            out[f"1, then lambda {start:g}..end"] = (
                lambda n, start=start: with_zero(torch.cat([torch.ones(1, dtype=torch.float64),
                                                            flow_logsnr_uniform(n - 1, start, lam_end)])))
        for c in (0.02, 0.05, 0.1, 0.2, 0.5):
            out[f"1, then lambda log({c:g} h)..end"] = lambda n, c=c: first_step_family(n, lo, c)
        for shift in (2.0, 3.0, 4.0):
            out[f"shift {shift:g} to sigma_min"] = lambda n, shift=shift: shifted_to(n, lo, shift)
        for shift, w, taper in ((3.0, 0.5, 0.0), (3.0, 0.5, 1.0), (3.0, 0.3, 0.25), (3.0, 0.7, 0.25),
                                (2.0, 0.5, 0.25)):
            out[f"mix shift {shift:g} w {w:g} taper {taper:g}"] = (
                lambda n, shift=shift, w=w, taper=taper: recommended_sigmas(n, lo, 1.0, "flow") if n < 3
                else flow_shift_mix(n, lo, shift, w, taper))
        for shift, w in ((3.0, 1.0), (3.0, 0.7), (3.0, 0.5), (1.0, 0.5)):
            out[f"blend shift {shift:g} w {w:g}"] = lambda n, shift=shift, w=w: blend(n, lo, shift, w)
    return out


def first_step_family(n, sigma_min, c):
    """sigma = 1, then uniform in lambda from lambda_1 to lambda(sigma_min) with e^lambda_1 = c h (fixed point)."""
    from ..samplers.sigmas import flow_lambda, flow_logsnr_uniform, with_zero

    lam_end = flow_lambda(sigma_min)
    if n <= 2:
        return with_zero(torch.cat([torch.ones(1, dtype=torch.float64), flow_logsnr_uniform(n - 1, -lam_end, lam_end)]))
    lam_1 = -lam_end
    for _ in range(50):
        lam_1 = math.log(c * (lam_end - lam_1) / (n - 2))
    return with_zero(torch.cat([torch.ones(1, dtype=torch.float64), flow_logsnr_uniform(n - 1, lam_1, lam_end)]))


def shifted_to(n, sigma_min, shift):
    """The hosts' rule ending at sigma_min: t uniform on [1, t_min] (n sigmas), sigma = shift t / (1 + (shift - 1) t),
    then 0."""
    from ..samplers.sigmas import with_zero

    t_min = sigma_min / (shift - (shift - 1) * sigma_min)
    t = torch.linspace(1.0, t_min, n, dtype=torch.float64)
    return with_zero(shift * t / (1 + (shift - 1) * t))


def blend(n, sigma_min, shift, w):
    """sigma = 1, then n - 1 sigmas at equal quantiles of a step density in lambda: w parts the shifted time
    schedule's logistic density (t uniform, sigma = shift t / (1 + (shift - 1) t)) and 1 - w parts uniform on
    [-log shift, lambda(sigma_min)], cut at lambda(sigma_min)."""
    from ..samplers.sigmas import flow_lambda, with_zero

    lam_end = flow_lambda(sigma_min)
    centre = -math.log(shift)

    def cdf(lam):
        logistic = torch.sigmoid(lam - centre)
        uniform = ((lam - centre) / (lam_end - centre)).clamp(0, 1)
        return w * logistic + (1 - w) * uniform

    total = float(cdf(torch.tensor(lam_end, dtype=torch.float64)))
    target = torch.linspace(0, total, n, dtype=torch.float64)[1:]
    lo_, hi_ = torch.full_like(target, -60.0), torch.full_like(target, lam_end)
    for _ in range(100):
        mid = (lo_ + hi_) / 2
        below = cdf(mid) < target
        lo_, hi_ = torch.where(below, mid, lo_), torch.where(below, hi_, mid)
    lam = (lo_ + hi_) / 2
    return with_zero(torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-lam)]))


class Problem:
    def __init__(self, name, kind, model, x, reference, extra_args=None):
        self.name, self.kind, self.model, self.x, self.reference = name, kind, model, x, reference
        self.extra_args = extra_args or {}

    def error(self, sampler, sigmas, **options):
        start = self.x if self.kind == "flow" else self.x * sigmas[0]
        out = sampler(self.model, start, sigmas.to(self.x.dtype), extra_args=self.extra_args, disable=True,
                      **options)
        return float((out.double() - self.reference.double()).pow(2).flatten(1).mean(1).sqrt().median())


def mixture_problems(kind, seeds):
    from ..analytic.gaussian_mixture import GaussianMixture, reference_solution, sample_noise

    for seed in seeds:
        model = GaussianMixture.random(dim=8, components=5, seed=seed).denoiser(kind)
        x = sample_noise(SAMPLES, (1, 2, 4), seed=100 + seed)
        start = x if kind == "flow" else x * EPS_RANGE[1]
        sigma_start = 1.0 if kind == "flow" else EPS_RANGE[1]
        yield Problem(f"mixture seed {seed}", kind, model, x, reference_solution(model, start, sigma_start, 0.0, kind))


def embedded_problem(kind, reference_steps=1000):
    from ..embedded import load_model
    from ..embedded.make_ems import LabelledByRow
    from ..samplers import sample_dpmpp_3m
    from ..samplers.sigmas import make_sigmas

    base = load_model(kind)
    model = LabelledByRow(base, 1.0)
    x = torch.randn((SAMPLES,) + tuple(base.shape), generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    sigmas = (make_sigmas("logsnr_uniform", reference_steps, kind, FLOW_SIGMA_MIN) if kind == "flow"
              else make_sigmas("logsnr_uniform", reference_steps, kind, *EPS_RANGE))
    start = x if kind == "flow" else x * sigmas[0]
    reference = sample_dpmpp_3m(model, start, sigmas, disable=True, model_kind=kind, solver_type="taylor")
    return Problem("embedded", kind, model, x, reference)


def solvers():
    from ..samplers import sample_dpmpp_2m, sample_dpmpp_3m
    from ..peers import Unavailable, load_kdiffusion

    out = {"ours 2M": lambda m, x, s, kind, **kw: sample_dpmpp_2m(m, x, s, model_kind=kind, **kw),
           "ours 3M": lambda m, x, s, kind, **kw: sample_dpmpp_3m(m, x, s, model_kind=kind, **kw)}
    try:
        k = load_kdiffusion()
        out["k-diffusion 2M"] = lambda m, x, s, kind, **kw: k.sample_dpmpp_2m(m, x, s, **kw)
    except Unavailable:
        pass
    return out


def measured_order(errors, steps):
    """The slope of log error against log steps between the two largest step counts."""
    (n1, e1), (n2, e2) = sorted(zip(steps, errors))[-2:]
    return math.log(e1 / e2) / math.log(n2 / n1)


def run(quick=False, candidates=False, kinds=("flow", "eps")):
    torch.set_num_threads(1)
    steps = (10, 20, 40) if quick else STEPS
    rows = []
    for kind in kinds:
        problems = list(mixture_problems(kind, MIXTURE_SEEDS[:2] if quick else MIXTURE_SEEDS))
        problems.append(embedded_problem(kind, 300 if quick else 1000))
        for problem in problems:
            for schedule, build in schedules(kind, candidates).items():
                for solver, fn in solvers().items():
                    errors = [problem.error(lambda m, x, s, **kw: fn(m, x, s, kind, **kw), build(n)) for n in steps]
                    rows.append(dict(kind=kind, model=problem.name, schedule=schedule, solver=solver,
                                     steps=list(steps), errors=errors, order=measured_order(errors, steps)))
                    print(kind, problem.name, schedule, solver, " ".join(f"{e:.2e}" for e in errors),
                          f"order {rows[-1]['order']:.2f}", flush=True)
    return {"steps": list(steps), "rows": rows}


def markdown(data):
    steps = data["steps"]
    lines = ["# Step schedules: error of x0 per schedule and model kind", "",
             "Generated by `python -m dpm_solver_nodes.bench.schedule_study` (see its docstring for the set-up).  "
             "Median over samples of the per-sample RMS error against the reference; mixture rows are the geometric mean over the seeds; "
             "order: slope between the two largest step counts.", ""]
    for kind in ("flow", "eps"):
        rows = [r for r in data["rows"] if r["kind"] == kind]
        if not rows:
            continue
        lines += [f"## {kind}", "", "| model | schedule | solver | " + " | ".join(map(str, steps)) + " | order |",
                  "|---|---|---|" + "---|" * (len(steps) + 1)]
        groups = {}
        for r in rows:
            model = "mixtures" if r["model"].startswith("mixture") else r["model"]
            groups.setdefault((model, r["schedule"], r["solver"]), []).append(r["errors"])
        for (model, schedule, solver), errs in groups.items():
            mean = [math.exp(sum(math.log(e[i]) for e in errs) / len(errs)) for i in range(len(steps))]
            lines.append(f"| {model} | {schedule} | {solver} | " + " | ".join(f"{e:.2e}" for e in mean) +
                         f" | {measured_order(mean, steps):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--candidates", action="store_true")
    parser.add_argument("--kind", choices=("flow", "eps"), help="only this model kind (default: both)")
    parser.add_argument("--out", default=str(HERE / "results" / "schedules.json"))
    args = parser.parse_args(argv)
    data = run(args.quick, args.candidates, (args.kind,) if args.kind else ("flow", "eps"))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    (HERE / "results_schedules.md").write_text(markdown(data) + "\n")


if __name__ == "__main__":
    main()
