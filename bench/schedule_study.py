"""Which step schedule our solvers do best on, per model kind (issue 13).  Writes bench/results/schedules.json and
bench/results_schedules.md.

    python -m dpm_solver_nodes.bench.schedule_study [--quick] [--candidates] [--kind flow|eps]

Models: the exact denoiser of random Gaussian mixtures (``analytic.GaussianMixture.random``, 64 samples each,
float64; reference: DOP853 at 1e-12, ``reference_solution``) in two disjoint sets: ``SELECTION`` (seeds 0-3 at
d = 8 with 5 components, seeds 10-14 at other dimensions and component counts), on which the recommended rule's
constants were chosen, and ``HELD_OUT`` (seeds 20-31, d = 2 ... 128, 2 ... 20 components), on which it is reported;
and the embedded trained eps and flow models (64 samples, labels k mod 10, float64; reference: our 3M (Taylor) on
1000 logSNR-uniform steps), with the noise seed used in the selection (1234) and a held-out one (4321).
Metric: the median over samples of the per-sample RMS error of x0 (trajectories near basin boundaries switch
modes, so the mean is noisy; the benchmark's metric).  eps range [0.0292, 14.6] (SD v1), flow from
sigma = 1 with sigma_min 1e-3.  Solvers: our 2M and 3M, PyPI k-diffusion's 2M (what ComfyUI runs).
The ratio tables give, per model, our 2M on ``recommended_sigmas`` against k-diffusion's 2M on the flow hosts'
shift-3 schedule (flow) and against our 2M on Karras' rho = 7 (eps, where our 2M is k-diffusion's), as the worst
and the median over each set.  ``--candidates`` adds the flow variants the recommendation was chosen among (the
rule before this one, and the recommended rule with one of its parts changed) and the eps Karras rho values.
``--kind`` runs one model kind.  ``--candidates`` also measures where the 2M's error comes from, per band of lambda
(``error_contributions``) on the three selection mixtures worst at 20 steps.
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
RATIO_STEPS = (10, 15, 20, 40)  # the comparison
# (seed, dimension, components)
SELECTION = ((0, 8, 5), (1, 8, 5), (2, 8, 5), (3, 8, 5), (10, 4, 3), (11, 16, 10), (12, 32, 5), (13, 64, 20),
             (14, 2, 8))
HELD_OUT = ((20, 8, 5), (21, 8, 5), (22, 4, 2), (23, 4, 10), (24, 16, 5), (25, 16, 20), (26, 32, 3), (27, 32, 10),
            (28, 64, 5), (29, 64, 10), (30, 2, 4), (31, 128, 8))
EMBEDDED_NOISE_SEEDS = {"selection": 1234, "held-out": 4321}
SAMPLES = 64


def schedules(kind, candidates=False):
    """name -> (steps -> n + 1 sigmas)."""
    from ..embedded.model import DiscreteVPSchedule
    from ..samplers.sigmas import make_sigmas, recommended_sigmas, shifted, with_zero

    if kind == "eps":
        lo, hi = EPS_RANGE
        discrete = DiscreteVPSchedule()
        out = {name: (lambda n, name=name: make_sigmas(name, n, "eps", lo, hi, discrete=discrete))
               for name in ("karras", "logsnr_uniform", "time_uniform")}
        out["recommended"] = lambda n: recommended_sigmas(n, lo, hi, "eps")
        if candidates:
            from ..samplers.sigmas import karras
            for rho in (10.0, 25.0):
                out[f"karras rho {rho:g}"] = lambda n, rho=rho: with_zero(karras(n, lo, hi, rho))
        return out
    lo = FLOW_SIGMA_MIN
    out = {"shift3 (hosts)": lambda n: shifted(n, 3.0),
           "time_uniform": lambda n: make_sigmas("time_uniform", n, "flow", lo),
           "karras": lambda n: make_sigmas("karras", n, "flow", lo),
           "logsnr_uniform": lambda n: make_sigmas("logsnr_uniform", n, "flow", lo),
           "recommended": lambda n: recommended_sigmas(n, lo, 1.0, "flow")}
    if candidates:
        out.update(flow_candidates(lo))
    return out


def flow_candidates(sigma_min):
    """The recommended flow rule with one part changed, and the rule it replaced."""
    from ..samplers import sigmas as S

    lam_end = S.flow_lambda(sigma_min)

    def variant(last=S.RECOMMENDED_FLOW_LAST_LAMBDA, **options):
        def build(n):
            if n < 3:
                return S.recommended_sigmas(n, sigma_min, 1.0, "flow")
            return S.flow_shift_mix(n, S.flow_last_lambda(n, lam_end, last=last), **options)
        return build

    return {
        "previous rule (w 0.5, taper 0.25, e^lambda_1 = 0.1 h, to sigma_min)":
            variant(last=(lam_end, 0.0), weight=0.5, taper=0.25, first_step=0.1),
        "recommended, to sigma_min": variant(last=(lam_end, 0.0)),
        "recommended, lambda_L = 0.58 + log n": variant(last=(0.58, 1.0)),
        "recommended, lambda_L = 0.58 + 1.5 log n": variant(last=(0.58, 1.5)),
        "recommended, w 0 (uniform lambda)": variant(weight=0.0),
        "recommended, w 0.25": variant(weight=0.25),
        "recommended, w 0.5": variant(weight=0.5),
        "recommended, taper 0 (w constant)": variant(taper=0.0),
        "recommended, e^lambda_1 = 0.08 h": variant(first_step=0.08),
        "recommended, e^lambda_1 = 0.32 h": variant(first_step=0.32),
    }


class Problem:
    def __init__(self, name, kind, model, x, reference, group, extra_args=None):
        self.name, self.kind, self.model, self.x, self.reference = name, kind, model, x, reference
        self.group = group
        self.extra_args = extra_args or {}

    def error(self, sampler, sigmas, **options):
        start = self.x if self.kind == "flow" else self.x * sigmas[0]
        out = sampler(self.model, start, sigmas.to(self.x.dtype), extra_args=self.extra_args, disable=True,
                      **options)
        return float((out.double() - self.reference.double()).pow(2).flatten(1).mean(1).sqrt().median())


def mixture_problems(kind, configurations, group):
    from ..analytic.gaussian_mixture import GaussianMixture, reference_solution, sample_noise

    for seed, dim, components in configurations:
        model = GaussianMixture.random(dim=dim, components=components, seed=seed).denoiser(kind)
        x = sample_noise(SAMPLES, (dim,), seed=100 + seed)
        start = x if kind == "flow" else x * EPS_RANGE[1]
        sigma_start = 1.0 if kind == "flow" else EPS_RANGE[1]
        yield Problem(f"mixture seed {seed} d {dim} k {components}", kind, model, x,
                      reference_solution(model, start, sigma_start, 0.0, kind), group)


def embedded_problem(kind, group, noise_seed, reference_steps=1000):
    from ..embedded import load_model
    from ..embedded.make_ems import LabelledByRow
    from ..samplers import sample_dpmpp_3m
    from ..samplers.sigmas import make_sigmas

    base = load_model(kind)
    model = LabelledByRow(base, 1.0)
    x = torch.randn((SAMPLES,) + tuple(base.shape), generator=torch.Generator().manual_seed(noise_seed),
                    dtype=torch.float64)
    sigmas = (make_sigmas("logsnr_uniform", reference_steps, kind, FLOW_SIGMA_MIN) if kind == "flow"
              else make_sigmas("logsnr_uniform", reference_steps, kind, *EPS_RANGE))
    start = x if kind == "flow" else x * sigmas[0]
    reference = sample_dpmpp_3m(model, start, sigmas, disable=True, model_kind=kind, solver_type="taylor")
    return Problem(f"embedded noise seed {noise_seed}", kind, model, x, reference, group)


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
        selection, held_out = (SELECTION[:2], HELD_OUT[:2]) if quick else (SELECTION, HELD_OUT)
        problems = list(mixture_problems(kind, selection, "mixtures (selection)"))
        problems += list(mixture_problems(kind, held_out, "mixtures (held-out)"))
        for group, seed in EMBEDDED_NOISE_SEEDS.items():
            problems.append(embedded_problem(kind, f"embedded ({group})", seed, 300 if quick else 1000))
        for problem in problems:
            for schedule, build in schedules(kind, candidates).items():
                for solver, fn in solvers().items():
                    errors = [float(f"{problem.error(lambda m, x, s, **kw: fn(m, x, s, kind, **kw), build(n)):.5g}")
                              for n in steps]
                    rows.append(dict(kind=kind, group=problem.group, model=problem.name, schedule=schedule,
                                     solver=solver, steps=list(steps), errors=errors,
                                     order=round(measured_order(errors, steps), 4)))
                    print(kind, problem.name, schedule, solver, " ".join(f"{e:.2e}" for e in errors),
                          f"order {rows[-1]['order']:.2f}", flush=True)
    return {"steps": list(steps), "rows": rows}


GROUPS = ("mixtures (selection)", "mixtures (held-out)", "embedded (selection)", "embedded (held-out)")
BASELINES = {"flow": ("shift3 (hosts)", "k-diffusion 2M"), "eps": ("karras", "ours 2M")}


def ratios(data, kind):
    """model -> (group, [our 2M on recommended / the baseline at each of RATIO_STEPS], our 2M's order)."""
    steps = data["steps"]
    index = [steps.index(n) for n in RATIO_STEPS if n in steps]
    rows = {(r["model"], r["schedule"], r["solver"]): r for r in data["rows"] if r["kind"] == kind}
    out = {}
    for (model, schedule, solver), r in rows.items():
        if schedule != "recommended" or solver != "ours 2M":
            continue
        base = rows[(model,) + BASELINES[kind]]
        out[model] = (r["group"], [r["errors"][i] / base["errors"][i] for i in index], r["order"])
    return out


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


CONTRIBUTION_MODELS = ((2, 8, 5), (10, 4, 3), (13, 64, 20))  # the selection mixtures worst at 20 steps / in order
CONTRIBUTION_STEPS = 20
BANDS = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0)  # lambda band edges of a step's start


def error_contributions(configurations=CONTRIBUTION_MODELS, n=CONTRIBUTION_STEPS):
    """Where the 2M's error comes from, per band of lambda: step k's local error carried to the end is
    c_k = out(states before k reset to the exact ODE solution) - out(states up to k reset), where a reset sets x and
    the denoised output (the multistep history) at a step to their exact-trajectory values (DOP853).  The c_k sum to
    the final error; per band, the median over samples of the per-sample RMS of the band's summed c_k, and its share
    (projection on the total error, summed over samples; shares add up to 1, opposite signs cancel)."""
    from ..analytic.gaussian_mixture import GaussianMixture, reference_solution, sample_noise
    from ..samplers import sample_dpmpp_2m
    from ..samplers.sigmas import recommended_sigmas, shifted
    from ..peers import load_kdiffusion

    kd = load_kdiffusion()
    runs = {"recommended, ours 2M": (lambda: recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow"),
                                     lambda m, x, s, cb: sample_dpmpp_2m(m, x, s, disable=True, callback=cb,
                                                                         model_kind="flow")),
            "shift3 (hosts), k-diffusion 2M": (lambda: shifted(n, 3.0),
                                               lambda m, x, s, cb: kd.sample_dpmpp_2m(m, x, s, disable=True,
                                                                                      callback=cb))}
    rows = []
    for seed, dim, components in configurations:
        model = GaussianMixture.random(dim=dim, components=components, seed=seed).denoiser("flow")
        x = sample_noise(SAMPLES, (dim,), seed=100 + seed)
        reference = reference_solution(model, x, 1.0, 0.0, "flow")
        for name, (build, sampler) in runs.items():
            sigmas = build()
            states, prev = [x], 1.0
            for s in sigmas[1:-1].tolist():
                states.append(reference_solution(model, states[-1], prev, s, "flow"))
                prev = s

            def run(k):
                def reset(d):
                    if d["i"] < k:
                        d["x"].copy_(states[d["i"]])
                        d["denoised"].copy_(model(states[d["i"]], sigmas[d["i"]] * x.new_ones(len(x))))
                return sampler(model, x.clone(), sigmas, reset)

            # run(k) resets the states 0 .. k - 1 (run(1) is the plain run: state 0 is the start), so
            # run(k) - run(k + 1) is step k - 1's error (from lam[k - 1]); run(n) - reference the step into sigma = 0
            outs = {k: run(k) for k in range(1, n + 1)}
            total = outs[1] - reference
            lam = (-torch.logit(sigmas[:-1])).tolist()
            steps = [(lam[k - 1], outs[k] - outs[k + 1]) for k in range(1, n)]
            final = outs[n] - reference
            bands = {}
            for start, c in steps:
                label = band_label(start)
                bands[label] = bands.get(label, 0) + c
            bands["into sigma = 0"] = final
            norm = float(total.pow(2).sum())
            # the contributions telescope to the total error
            assert abs(sum(float((c * total).sum()) for c in bands.values()) / norm - 1) < 1e-6
            rows.append(dict(model=f"mixture seed {seed} d {dim} k {components}", run=name,
                             total=float(total.pow(2).mean(1).sqrt().median()),
                             bands={b: [float(c.pow(2).mean(1).sqrt().median()), float((c * total).sum()) / norm]
                                    for b, c in bands.items()}))
    return rows


def band_label(start):
    if start < BANDS[0]:
        return f"< {BANDS[0]:g}"
    for lo, hi in zip(BANDS, BANDS[1:]):
        if start < hi:
            return f"{lo:g} to {hi:g}"
    return f">= {BANDS[-1]:g}"


def contributions_markdown(rows):
    labels = [band_label(b - 0.5) for b in BANDS] + [band_label(BANDS[-1]), "into sigma = 0"]
    lines = ["## flow: where the 2M's error comes from", "",
             f"`error_contributions`: {CONTRIBUTION_STEPS} steps; step k's local error carried to the end (the "
             "run with the states before k reset to the exact solution minus the run with those up to k reset), "
             "summed per band of the step's starting lambda: median per-sample RMS, then its share of the total "
             "error (opposite signs cancel; the shares add up to 1).  Total: the run's error (median per-sample RMS).",
             "", "| model | run | total | " + " | ".join(f"lambda {b}" if b != "into sigma = 0" else b for b in labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for r in rows:
        cells = [f"{r['bands'][b][0]:.1e} ({r['bands'][b][1]:+.2f})" if b in r["bands"] else "-" for b in labels]
        lines.append(f"| {r['model']} | {r['run']} | {r['total']:.2e} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(data):
    steps = data["steps"]
    ratio_steps = [n for n in RATIO_STEPS if n in steps]
    lines = ["# Step schedules: error of x0 per schedule and model kind", "",
             "Generated by `python -m dpm_solver_nodes.bench.schedule_study` (see its docstring for the set-up).  "
             "Median over samples of the per-sample RMS error against the reference; mixture rows are the "
             "geometric mean over the set's models; order: slope between the two largest step counts.  The "
             "recommended rule's constants were chosen on the selection mixtures and the embedded models' "
             "selection noise; the held-out rows are the report.", ""]
    for kind in ("flow", "eps"):
        rows = [r for r in data["rows"] if r["kind"] == kind]
        if not rows:
            continue
        baseline = "k-diffusion's 2M on the shift-3 schedule" if kind == "flow" else "our 2M on Karras (rho 7)"
        lines += [f"## {kind}", "", f"Our 2M on `recommended_sigmas` / {baseline}, per model: worst and median "
                  "over the set; our 2M's order on `recommended_sigmas` (min / median).", "",
                  "| set | models | " + " | ".join(f"{n} steps worst / median" for n in ratio_steps) +
                  " | order min / median |", "|---|---|" + "---|" * (len(ratio_steps) + 1)]
        table = ratios(data, kind)
        for group in GROUPS:
            members = [v for v in table.values() if v[0] == group]
            if not members:
                continue
            cells = []
            for i in range(len(ratio_steps)):
                values = [m[1][i] for m in members]
                cells.append(f"{max(values):.2f} / {_median(values):.2f}")
            orders = [m[2] for m in members]
            lines.append(f"| {group} | {len(members)} | " + " | ".join(cells) +
                         f" | {min(orders):.2f} / {_median(orders):.2f} |")
        lines += ["", "Per model:", "", "| model | set | " + " | ".join(map(str, ratio_steps)) + " | order |",
                  "|---|---|" + "---|" * (len(ratio_steps) + 1)]
        for model, (group, values, order) in table.items():
            lines.append(f"| {model} | {group} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {order:.2f} |")
        lines += ["", "Errors:", "", "| models | schedule | solver | " + " | ".join(map(str, steps)) + " | order |",
                  "|---|---|---|" + "---|" * (len(steps) + 1)]
        groups = {}
        for r in rows:
            groups.setdefault((r["group"], r["schedule"], r["solver"]), []).append(r["errors"])
        for (group, schedule, solver), errs in sorted(groups.items(), key=lambda item: GROUPS.index(item[0][0])):
            mean = [math.exp(sum(math.log(e[i]) for e in errs) / len(errs)) for i in range(len(steps))]
            lines.append(f"| {group} | {schedule} | {solver} | " + " | ".join(f"{e:.2e}" for e in mean) +
                         f" | {measured_order(mean, steps):.2f} |")
        lines.append("")
        if kind == "flow" and data.get("contributions"):
            lines += contributions_markdown(data["contributions"])
    return "\n".join(lines)


def dumps(data):
    """JSON with one row per line (diffable, a third of indent=1's size)."""
    rows = ",\n".join(json.dumps(row) for row in data["rows"])
    extra = "".join(f', "{k}": [\n' + ",\n".join(json.dumps(r) for r in v) + "\n]"
                    for k, v in data.items() if k not in ("steps", "rows"))
    return f'{{"steps": {json.dumps(data["steps"])}, "rows": [\n{rows}\n]{extra}}}\n'


def free_schedule_bound(n, maxfev=6000):
    """How far any n-step flow schedule can go for our 2M on the selection mixtures: the n - 1 lambdas after sigma = 1
    (lambda_1, then log step sizes) optimised by Powell's method for the worst ratio to k-diffusion's 2M on shift 3
    over the selection mixtures, from ``recommended_sigmas``; prints the schedule and its ratios on both mixture
    sets and on the embedded model (selection noise).  Minutes per n at one thread; not part of the tables."""
    import numpy as np
    from scipy.optimize import minimize

    from ..samplers import sample_dpmpp_2m
    from ..samplers.sigmas import recommended_sigmas, shifted, with_zero
    from ..peers import load_kdiffusion

    torch.set_num_threads(1)
    kd = load_kdiffusion()
    problems = list(mixture_problems("flow", SELECTION, "mixtures (selection)"))
    problems += list(mixture_problems("flow", HELD_OUT, "mixtures (held-out)"))
    problems.append(embedded_problem("flow", "embedded (selection)", EMBEDDED_NOISE_SEEDS["selection"]))
    for p in problems:
        p.peer = p.error(lambda m, x, s, **kw: kd.sample_dpmpp_2m(m, x, s, **kw), shifted(n, 3.0))

    def ours(p, sigmas):
        return p.error(lambda m, x, s, **kw: sample_dpmpp_2m(m, x, s, model_kind="flow", **kw), sigmas) / p.peer

    def sigmas_of(v):
        lam = np.concatenate([v[:1], v[0] + np.cumsum(np.exp(v[1:]))])
        return with_zero(torch.cat([torch.ones(1, dtype=torch.float64),
                                    torch.sigmoid(-torch.tensor(lam, dtype=torch.float64))]))

    def worst(v):
        try:
            return max(ours(p, sigmas_of(v)) for p in problems if p.group == "mixtures (selection)")
        except ValueError:  # sigmas no longer strictly decreasing in float64
            return math.inf

    lam = (-torch.logit(recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow")[1:-1])).numpy()
    start = np.concatenate([lam[:1], np.log(np.diff(lam))])
    result = minimize(worst, start, method="Powell", options=dict(maxfev=maxfev, xtol=1e-3, ftol=1e-4))
    sigmas = sigmas_of(result.x)
    print(f"{n} steps, lambdas:", " ".join(f"{v:.2f}" for v in (-torch.logit(sigmas[1:-1])).tolist()))
    for group in GROUPS[:3]:
        for label, build in (("recommended", lambda: recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow")),
                             ("optimised", lambda: sigmas)):
            values = [ours(p, build()) for p in problems if p.group == group]
            print(f"  {group}, {label}: worst {max(values):.2f}, median {_median(values):.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--candidates", action="store_true")
    parser.add_argument("--kind", choices=("flow", "eps"), help="only this model kind (default: both)")
    parser.add_argument("--out", default=str(HERE / "results" / "schedules.json"))
    parser.add_argument("--bound", type=int, metavar="N", help="only free_schedule_bound(N) (prints)")
    parser.add_argument("--bound-evals", type=int, default=6000, help="Powell's evaluation budget for --bound")
    args = parser.parse_args(argv)
    if args.bound:
        free_schedule_bound(args.bound, args.bound_evals)
        return
    data = run(args.quick, args.candidates, (args.kind,) if args.kind else ("flow", "eps"))
    if args.candidates and args.kind != "eps":
        data["contributions"] = error_contributions()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(data))
    (HERE / "results_schedules.md").write_text(markdown(data) + "\n")


if __name__ == "__main__":
    main()
