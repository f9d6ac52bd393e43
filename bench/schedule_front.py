"""Issue 13, flow: the ratio / order front of our 2M's schedules against the issue's target.  Writes
bench/results_schedule_front.md.

    python -m dpm_solver_nodes.bench.schedule_front

The target: our 2M (``sample_dpmpp_2m``, model_kind="flow") on a schedule <= 0.5x k-diffusion's 2M on the hosts'
shift-3 schedule at 10, 15, 20 and 40 steps, and our 2M's order log2(err20 / err40) >= 1.8, on every model.
Models and metric as in ``schedule_study`` (median over 64 samples of the per-sample RMS error of x0): its
``SELECTION`` and ``HELD_OUT`` mixtures, a third set ``FRESH`` (seeds 40-59, d and component count drawn at random
in 2..128 and 2..20 by ``random.Random(4059)``; never used to choose anything), and the embedded flow model with
both noise seeds.  Candidates (all 1, then lambdas, then 0; ``flow_shift_mix`` is the recommended rule's mix of
the shift-3 lambdas and uniform-lambda points):
  recommended                  ``recommended_sigmas`` (w_k = 0.38 (1 - (k - 1) / (n - 2))^0.12, last point at
                               lambda_L = 0.58 + 1.2 log n)
  constant w                   the same mix with w_k = 0.38 to the end (taper 0): no long last step, so the last
                               point sits below lambda_L
  constant w, last w 0.19      constant w, the last point alone mixed with w = 0.19 (between the two above)
  constant-w mix to a + b log n  w_k = w for every point, the uniform part stretched so that the last point is
                               lambda = a + b log n, e^{lambda_1} = c h
Then ``bisection_check``: the recommended 20-step schedule refined to 38 steps by bisecting its lambda steps
(ends kept) against ``recommended_sigmas(38)``.  Then ``order_ceiling``: over a grid of 108 schedules (``grid``:
the recommended mix with other weights, tapers,
first steps and lambda_L slopes, and constant-w mixes to a + b log n with several w, first steps and ends), per
model the least error at 20 steps and the least at 40 steps (each schedule free to differ between the two) and
log2(least err20 / least err40): the order a rule would measure if it were the grid's best at both step counts.
Not a test and not part of ``schedule_study``'s tables; about three minutes at one thread.

Findings: bench/results_schedule_front.md (the measured numbers live there, not here).
"""
from __future__ import annotations

import math
import pathlib
import random

import torch

from .schedule_study import EMBEDDED_NOISE_SEEDS, FLOW_SIGMA_MIN, HELD_OUT, SELECTION, embedded_problem, \
    mixture_problems

HERE = pathlib.Path(__file__).resolve().parent
STEPS = (10, 15, 20, 40)
_rng = random.Random(4059)
FRESH = tuple((seed, _rng.randint(2, 128), _rng.randint(2, 20)) for seed in range(40, 60))


def constant_weight(weight=0.38, last_weight=None, first_step=0.16):
    """The recommended mix with w_k = weight for every point (the last one: last_weight, default weight)."""
    from ..samplers import sigmas as S

    lam_end = S.flow_lambda(FLOW_SIGMA_MIN)

    def build(n):
        lam_last = S.flow_last_lambda(n, lam_end)
        sigmas = S.flow_shift_mix(n, lam_last, weight=weight, taper=0.0, first_step=first_step)
        if last_weight is not None:
            lam = -torch.logit(sigmas[1:-1])
            host_last = min(float(-torch.logit(S.shifted(n, 3.0)[-2])), lam_last)
            lam[-1] = last_weight * host_last + (1 - last_weight) * lam_last
            assert bool((lam[1:] > lam[:-1]).all())
            sigmas[1:-1] = torch.sigmoid(-lam)
        return sigmas
    return build


def constant_weight_to(a, b, weight=0.38, first_step=0.16):
    """w_k = weight for every point; the uniform part ends at U with weight * (shift-3's last lambda) +
    (1 - weight) U = a + b log n, so the last point is there; e^{lambda_1} = first_step h."""
    from ..samplers import sigmas as S

    lam_end = S.flow_lambda(FLOW_SIGMA_MIN)

    def build(n):
        last = min(lam_end, a + b * math.log(n))
        host = -torch.logit(S.shifted(n, 3.0)[1:-1])
        end = (last - weight * float(host[-1])) / (1 - weight)
        uniform = torch.linspace(S.flow_first_lambda(n, end, first_step), end, n - 1, dtype=torch.float64)
        lam = weight * host.minimum(uniform) + (1 - weight) * uniform
        return S.with_zero(torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-lam)]))
    return build


def candidates():
    from ..samplers.sigmas import recommended_sigmas

    return {"recommended": lambda n: recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow"),
            "constant w 0.38": constant_weight(),
            "constant w 0.38, last w 0.19": constant_weight(last_weight=0.19),
            "constant w 0.38 to -1 + 1.6 log n": constant_weight_to(-1.0, 1.6),
            "constant w 0.6 to -0.5 + 1.4 log n, e^lambda_1 = 0.08 h": constant_weight_to(-0.5, 1.4, 0.6, 0.08)}


def grid():
    """name -> schedule: the 108 schedules ``order_ceiling`` takes the best of."""
    import itertools

    from ..samplers import sigmas as S

    lam_end = S.flow_lambda(FLOW_SIGMA_MIN)
    out = {}
    for weight, taper, first, slope in itertools.product((0.25, 0.38, 0.5), (0.0, 0.06, 0.12, 0.25), (0.16, 0.32),
                                                         (1.0, 1.2)):
        out[f"mix w {weight} taper {taper} c {first} lambda_L 0.58 + {slope} log n"] = (
            lambda n, w=weight, t=taper, c=first, b=slope:
            S.flow_shift_mix(n, S.flow_last_lambda(n, lam_end, last=(0.58, b)), weight=w, taper=t, first_step=c))
    for weight, first, (a, b) in itertools.product((0.38, 0.5, 0.6, 0.7, 0.8), (0.04, 0.08, 0.16),
                                                   ((-1.0, 1.6), (-0.5, 1.4), (0.58, 1.2), (0.0, 1.5))):
        out[f"constant w {weight} to {a} + {b} log n, c {first}"] = constant_weight_to(a, b, weight, first)
    return out


def order_ceiling(models):
    from ..samplers import sample_dpmpp_2m

    schedules = grid()
    best = {p.name: [math.inf, math.inf] for p in models}
    for build in schedules.values():
        for i, n in enumerate((20, 40)):
            sigmas = build(n)
            for p in models:
                e = p.error(lambda m, x, s, **kw: sample_dpmpp_2m(m, x, s, model_kind="flow", **kw), sigmas)
                best[p.name][i] = min(best[p.name][i], e)
    lines = ["", "## The order ceiling of the grid", "",
             f"`order_ceiling`: per model, the least error of our 2M over {len(schedules)} schedules at 20 and at 40 "
             "steps (the schedule may differ between the two), as ratios to k-diffusion's 2M on shift 3, and "
             "log2(least err20 / least err40).", "",
             "| set | model | least 20 | least 40 | log2(least20 / least40) |", "|---|---|---|---|---|"]
    for p in models:
        e20, e40 = best[p.name]
        lines.append(f"| {p.group} | {p.name} | {e20 / p.peer[2]:.2f} | {e40 / p.peer[3]:.2f} | "
                     f"{math.log2(e20 / e40):.2f} |")
    groups = list(dict.fromkeys(p.group for p in models))
    lines += ["", "| set | models | log2(least20 / least40) min / median | models below 1.8 |", "|---|---|---|---|"]
    for g in groups:
        values = [math.log2(best[p.name][0] / best[p.name][1]) for p in models if p.group == g]
        lines.append(f"| {g} | {len(values)} | {min(values):.2f} / {_median(values):.2f} | "
                     f"{sum(v < 1.8 for v in values)} |")
    print("\n".join(lines[-len(groups) - 2:]), flush=True)
    return lines


def bisection_check(models, n=20):
    """Our 2M on ``recommended_sigmas(n)`` refined two ways to 2n - 2 steps: ``recommended_sigmas(2n - 2)`` (its
    ends move out: lambda_1 down, lambda_L up) and the n-step lambdas bisected (ends kept), as orders from n steps."""
    from ..samplers import sample_dpmpp_2m
    from ..samplers.sigmas import recommended_sigmas, with_zero

    coarse = recommended_sigmas(n, FLOW_SIGMA_MIN, 1.0, "flow")
    lam = -torch.logit(coarse[1:-1])
    fine = torch.cat([torch.stack([lam[:-1], (lam[1:] + lam[:-1]) / 2], 1).flatten(), lam[-1:]])
    bisected = with_zero(torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-fine)]))
    m = len(bisected) - 1
    lines = ["", "## Refining by bisection", "",
             f"`bisection_check`: our 2M's order from `recommended_sigmas({n})` to {m} steps, log(err{n} / err{m}) / "
             f"log({m} / {n}), with `recommended_sigmas({m})` and with the {n}-step lambdas bisected (the first "
             "and last lambda kept), and the bisected schedule's error / the recommended one's.", "",
             "| set | model | order, recommended | order, bisected | bisected / recommended |", "|---|---|---|---|---|"]
    for p in models:
        def error(sigmas):
            return p.error(lambda md, x, s, **kw: sample_dpmpp_2m(md, x, s, model_kind="flow", **kw), sigmas)
        e_n, e_rec, e_bis = error(coarse), error(recommended_sigmas(m, FLOW_SIGMA_MIN, 1.0, "flow")), error(bisected)
        lines.append(f"| {p.group} | {p.name} | {math.log(e_n / e_rec) / math.log(m / n):.2f} | "
                     f"{math.log(e_n / e_bis) / math.log(m / n):.2f} | {e_bis / e_rec:.2f} |")
    return lines


def problems():
    from ..peers import load_kdiffusion
    from ..samplers.sigmas import shifted

    kd = load_kdiffusion()
    out = list(mixture_problems("flow", SELECTION, "selection mixtures"))
    out += list(mixture_problems("flow", HELD_OUT, "held-out mixtures"))
    out += list(mixture_problems("flow", FRESH, "fresh mixtures"))
    for group, seed in EMBEDDED_NOISE_SEEDS.items():
        out.append(embedded_problem("flow", f"embedded ({group} noise)", seed))
    for p in out:
        p.peer = [p.error(lambda m, x, s, **kw: kd.sample_dpmpp_2m(m, x, s, **kw), shifted(n, 3.0)) for n in STEPS]
    return out


def measure(problem, build):
    from ..samplers import sample_dpmpp_2m

    errors = [problem.error(lambda m, x, s, **kw: sample_dpmpp_2m(m, x, s, model_kind="flow", **kw), build(n))
              for n in STEPS]
    return [e / b for e, b in zip(errors, problem.peer)], math.log2(errors[2] / errors[3])


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def run():
    torch.set_num_threads(1)
    models = problems()
    groups = list(dict.fromkeys(p.group for p in models))
    lines = ["# Flow schedules: the ratio / order front (issue 13)", "",
             "Generated by `python -m dpm_solver_nodes.bench.schedule_front` (see its docstring).  Our 2M on the "
             "candidate / k-diffusion's 2M on shift 3, worst / median over the set at 10, 15, 20, 40 steps; our "
             "2M's order log2(err20 / err40), min / median; fails: models missing <= 0.5x at some step count or "
             "order >= 1.8.", "",
             "| candidate | set | models | 10 | 15 | 20 | 40 | order | fails |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, build in candidates().items():
        results = {g: [] for g in groups}
        for p in models:
            results[p.group].append(measure(p, build))
        for g in groups:
            rows = results[g]
            cells = [f"{max(r[0][i] for r in rows):.2f} / {_median([r[0][i] for r in rows]):.2f}"
                     for i in range(len(STEPS))]
            orders = [r[1] for r in rows]
            fails = sum(max(r[0]) > 0.5 or r[1] < 1.8 for r in rows)
            lines.append(f"| {name} | {g} | {len(rows)} | " + " | ".join(cells) +
                         f" | {min(orders):.2f} / {_median(orders):.2f} | {fails} |")
            print(lines[-1], flush=True)
    return lines + bisection_check(models) + order_ceiling(models)


def main():
    lines = run()
    (HERE / "results_schedule_front.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
