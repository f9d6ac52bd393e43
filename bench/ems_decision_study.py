"""Issue 12 follow-up (guided12b): how many tuning samples the per-NFE decision needs, measured by replay.

    python -m dpm_solver_nodes.bench.ems_decision_study collect SET [--out DIR]   # SET: study | held
    python -m dpm_solver_nodes.bench.ems_decision_study replay SET [SET ...] [--out DIR] [--eval 512]
    python -m dpm_solver_nodes.bench.ems_decision_study reference
    python -m dpm_solver_nodes.bench.ems_decision_study defaults study held   # after collect --eval 512 [--N 200]

``reference``: the tuning's reference (our 3M Taylor at 100 steps on ``sampling_sigmas``, as
``stats.tuning.reference_jobs``) against the exact ODE solution (mixtures) or 3M at 500 steps (embedded eps) on 20
samples of the study's evaluation noise, next to the candidates' errors at 5-20 NFE against each, on the cells
bench/results_ems_tuning.md lists as violations (s606 flow, s202 eps, embedded eps; cfg 7.5).

``collect``: for every case (a random Gaussian mixture, eps or flow, guidance 1 and 7.5; the analytic model makes the
exact ODE solution cheap) the default-path EMS (``estimate_ems``, K = 32: its fit is the one the tuning chose), then
per-sample errors against the exact ODE solution (DOP853, rtol 1e-12) of every decision candidate (v3 of that fit,
with / without corrector, order 2 and (unguided) 3, ``fallback=False``; our 2M, 3M (guarded default), UniPC bh2) at
5-20 NFE on ``POOL`` samples of tuning-like noise (seed 9001) and on the study's evaluation noise (seed 4242, 64).
The tuning's own reference (3M Taylor, 100 steps) moves the candidates' errors against the exact solution by at
most 1 % at 5-10 NFE on the violating cells (``reference``; bench/results_ems_decision.md), so exact references
stand in for it here.

``defaults``: both rules at the default S per model of N = 100 and N = 200 (``collect --N 200``: the estimation,
its fit choice and its EMS at that N), 512 evaluation samples.

``replay``: draws ``DRAWS`` disjoint (selection, report) pairs of S samples from the pool for S = 7, 14, 28, 56, applies
a decision rule (``decide``: the code's, stats.tuning, and variants) and scores its decision on the evaluation noise:
mean over draws of the issue 12 criterion violations at 5-10 NFE (a v3 cell above 0.9 at guidance 1, any decided cell
above 1.00 of the best of 2M / 3M / UniPC, both as rounded to two digits) and of the mean log ratio over all cells.
The fit is not re-chosen per draw (it is the default path's, chosen on its own 6-7 samples).
Sets: ``study`` (bench/ems_tuning_study.MIXTURES) and ``held`` (mixtures with seeds 5151-5656 that no earlier study
used).  The pooled rule was fixed before this study (guided12-archive, chosen on ``study``); ``held`` checks it.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import pickle
import time

import torch

from . import ems_tuning_study as st

NFES = (5, 6, 8, 10, 15, 20)
POOL = 128
DRAWS = 300
HELD = [(5151, 8, 5, "eps"), (5252, 11, 7, "flow"), (5353, 13, 4, "eps"), (5454, 9, 6, "flow"),
        (5555, 6, 8, "eps"), (5656, 14, 5, "flow")]
PACK_ALL = ("dpmpp_2m", "dpmpp_3m", "unipc")


def cases_of(which):
    mixtures = st.MIXTURES if which == "study" else HELD
    return [(m, g) for m in mixtures for g in st.GUIDANCES]


def _per(out, ref):
    return (out.double() - ref.double()).pow(2).flatten(1).mean(1).sqrt()


def collect_case(mixture, cfg, evaluation=None, N=None):
    from ..samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_3m
    from ..samplers.unipc import sample_unipc
    from ..samplers.v3 import sample_dpm_solver_v3
    from ..stats.estimate import estimate_ems, generate_x0
    from ..stats.tuning import sampling_sigmas

    case = st.mixture_case(*mixture, cfg)
    model, kind, shape, dtype = case["model"], case["kind"], case["shape"], case["dtype"]
    with torch.no_grad():
        x0 = generate_x0(model, shape, 32, case["sigma_max"], case["sigma_min"], kind, steps=100, seed=0,
                         batch_size=32, dtype=dtype)
    ems = estimate_ems(model, x0, case["sigma_min"], case["sigma_max"], model_kind=kind, K=32,
                       metadata={"cfg": repr(cfg)}, **({} if N is None else {"N": N}))
    pool = torch.randn((POOL,) + shape, generator=torch.Generator().manual_seed(9001), dtype=dtype)
    held = torch.randn((evaluation or st.EVAL,) + shape, generator=torch.Generator().manual_seed(4242), dtype=dtype)
    noise = torch.cat([pool, held])
    ref = case["reference"](noise)
    guided = cfg != 1.0
    options = [(c, o) for c in (True, False) for o in ((2,) if guided else (2, 3))]
    errors = {}
    for nfe in NFES:
        sig = sampling_sigmas(nfe, case["sigma_min"], case["sigma_max"], kind).to(dtype)
        x = noise * sig[0]
        e = {}
        with torch.no_grad():
            e["dpmpp_2m"] = _per(sample_dpmpp_2m(model, x, sig, model_kind=kind, disable=True), ref)
            e["dpmpp_3m"] = _per(sample_dpmpp_3m(model, x, sig, model_kind=kind, disable=True), ref)
            e["unipc"] = _per(sample_unipc(model, x, sig, model_kind=kind, disable=True), ref)
            for c, o in options:
                e[("v3", c, o)] = _per(sample_dpm_solver_v3(model, x, sig, ems=ems, model_kind=kind, disable=True,
                                                            use_corrector=c, order=o, fallback=False), ref)
        errors[nfe] = {k: torch.nan_to_num(v, nan=math.inf) for k, v in e.items()}
    decisions = {n: ems.decision_for(n) for n in NFES}
    return dict(name=case["name"], cfg=cfg, kind=kind, guided=guided, errors=errors,
                decisions={n: (d.solver, d.corrector, d.order) for n, d in decisions.items()})


def collect(which, out_dir, evaluation=None, N=None):
    out = []
    for mixture, cfg in cases_of(which):
        started = time.process_time()
        out.append(collect_case(mixture, cfg, evaluation, N))
        print(out[-1]["name"], cfg, f"{time.process_time() - started:.0f} s", flush=True)
        pickle.dump(out, open(pathlib.Path(out_dir) / f"decision_{which}{evaluation or ''}{f'_N{N}' if N else ''}.pkl", "wb"))


def _logs(a, b):
    return torch.log(a.clamp(min=1e-300) / b.clamp(min=1e-300))


def clearly_better(a, b, k=1.0):
    if not torch.isfinite(a).all():
        return False
    if not torch.isfinite(b).all():
        return True
    logs = _logs(a, b)
    return float(logs.mean()) + k * float(logs.std()) / math.sqrt(len(logs)) < 0


UNIPC_FROM = {"eps": 10, "flow": 15}


def decide(r, nfe, sel, rep, rule):
    """The decided solver key at ``nfe`` from selection rows ``sel`` and report rows ``rep`` of the pool."""
    e = r["errors"][nfe]
    guided, kind = r["guided"], r["kind"]
    v3opts = [k for k in e if isinstance(k, tuple)]
    o2 = [k for k in v3opts if k[2] == 2]
    best = min(o2, key=lambda k: float(e[k][sel].mean()))
    o3 = [k for k in v3opts if k[2] == 3]
    if o3:
        b3 = min(o3, key=lambda k: float(e[k][sel].mean()))
        if clearly_better(e[b3][sel], e[best][sel]):
            best = b3
    cands = ("dpmpp_2m", "unipc") if guided or kind == "eps" else ("dpmpp_2m", "dpmpp_3m")
    if guided and rule.get("guided_flow_3m") and kind == "flow":
        cands = ("dpmpp_2m", "dpmpp_3m")
    if guided and not rule.get("guided_both"):
        ran = ("unipc",) if nfe >= UNIPC_FROM[kind] and "unipc" in cands else ("dpmpp_2m",)
    else:
        ran = cands
    fb = ran[0]
    if len(ran) > 1 and clearly_better(e[ran[1]][sel], e[ran[0]][sel]):
        fb = ran[1]
    if guided and rule.get("report_fallback"):
        # the report set runs both candidates: switch where it finds the other clearly better
        other = [c for c in cands if c != fb][0]
        if clearly_better(e[other][rep], e[fb][rep], rule.get("report_fallback_k", 1.0)):
            fb = other
    wins = clearly_better(e[best][sel], e[fb][sel])
    if rule.get("pooled") and nfe <= 10:
        both = torch.cat([sel, rep])
        wins = clearly_better(e[best][both], e[fb][both])
    wins = wins and float(e[best][rep].mean()) < float(e[fb][rep].mean())
    return best if wins else fb


def score(r, nfe, key):
    e = r["errors"][nfe]
    held = slice(POOL, None)
    best = min(float(e[k][held].mean()) for k in PACK_ALL)
    ratio = float(e[key][held].mean()) / best
    limit = 0.9 if (not r["guided"] and isinstance(key, tuple)) else 1.0
    violation = nfe <= 10 and round(ratio, 2) > limit
    return ratio, violation


RULES = {
    "code (selection 1 SE, report mean veto, fixed guided fallback)": {},
    "+ guided fallback from the report set (1 SE)": {"report_fallback": True},
    "+ guided selection runs both pack solvers": {"guided_both": True},
    "+ pooled 2S 1 SE up to 10 NFE, report veto": {"pooled": True},
    "+ guided fallback from the report set + pooled": {"report_fallback": True, "pooled": True},
}


def replay_cell(records, rule, size_of, seed):
    """"violations / mean log ratio" of ``rule`` over ``DRAWS`` disjoint (selection, report) draws of ``size_of(record)``
    samples each from the pool: mean count per draw of criterion violations at 5-10 NFE, mean log(decided / best)."""
    g = torch.Generator().manual_seed(seed)
    violations, logsum, count = 0.0, 0.0, 0
    for _ in range(DRAWS):
        perm = torch.randperm(POOL, generator=g)
        for r in records:
            size = size_of(r)
            for nfe in NFES:
                ratio, bad = score(r, nfe, decide(r, nfe, perm[:size], perm[size:2 * size], rule))
                violations += bad
                logsum += math.log(min(ratio, 1e6))
                count += 1
    return f"{violations / DRAWS:.2f} / {logsum / count:+.3f}"


def replay(sets, out_dir, sizes=(7, 14, 28, 56), evaluation=None):
    lines = []
    for which in sets:
        records = pickle.load(open(pathlib.Path(out_dir) / f"decision_{which}{evaluation or ''}.pkl", "rb"))
        held = len(next(iter(records[0]["errors"][5].values()))) - POOL
        lines += [f"### {which}: {len(records)} cases, evaluation on {held} samples", "",
                  "| rule | " + " | ".join(f"S = {s}" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name, rule in RULES.items():
            cells = []
            for size in sizes:
                cells.append(replay_cell(records, rule, lambda r, size=size: size, seed=size))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        lines.append("")
    return lines


def replay_defaults(sets, out_dir, evaluation=512):
    """Both rules at each N's default S per model (``tuning.tuning_plan`` of that N's estimation rows: 6 / 7 at
    N = 100, 12 / 15 at N = 200), on the records of ``collect --eval 512`` and ``collect --eval 512 --N 200``."""
    rules = {"code before": {}, "pooled (the code now)": {"pooled": True}}
    lines = ["| N | default S (unguided / guided) | rule | " + " | ".join(sets) + " |", "|---|---|---|" + "---|" * len(sets)]
    for N, sizes in ((100, (6, 7)), (200, (12, 15))):
        for name, rule in rules.items():
            cells = []
            for which in sets:
                path = pathlib.Path(out_dir) / f"decision_{which}{evaluation}{'' if N == 100 else f'_N{N}'}.pkl"
                records = pickle.load(open(path, "rb"))
                cells.append(replay_cell(records, rule, lambda r, sizes=sizes: sizes[1] if r["guided"] else sizes[0],
                                         seed=1))
            lines.append(f"| {N} | {sizes[0]} / {sizes[1]} | {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


def reference_check():
    from ..samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_3m
    from ..samplers.unipc import sample_unipc
    from ..samplers.v3 import sample_dpm_solver_v3
    from ..stats.estimate import estimate_ems, generate_x0
    from ..stats.tuning import REFERENCE_FACTOR, sampling_sigmas

    for case in (st.mixture_case(*st.MIXTURES[5], 7.5), st.mixture_case(*st.MIXTURES[1], 7.5),
                 st.embedded_case("eps", 7.5)):
        model, kind, shape, dtype = case["model"], case["kind"], case["shape"], case["dtype"]
        with torch.no_grad():
            x0 = generate_x0(model, shape, 32, case["sigma_max"], case["sigma_min"], kind, steps=100, seed=0,
                             batch_size=32, dtype=dtype)
        ems = estimate_ems(model, x0, case["sigma_min"], case["sigma_max"], model_kind=kind, K=32,
                           metadata={"cfg": "7.5"})
        noise = torch.randn((20,) + shape, generator=torch.Generator().manual_seed(4242), dtype=dtype)
        exact = case["reference"](noise)
        sig = sampling_sigmas(REFERENCE_FACTOR * max(NFES), case["sigma_min"], case["sigma_max"], kind).to(dtype)
        with torch.no_grad():
            tuned = sample_dpmpp_3m(model, noise * sig[0], sig, disable=True, model_kind=kind, solver_type="taylor",
                                    guard=False)
        print(f"{case['name']} cfg 7.5: tuning reference vs exact {float(_per(tuned, exact).mean()):.2e}")
        for nfe in NFES:
            sig = sampling_sigmas(nfe, case["sigma_min"], case["sigma_max"], kind).to(dtype)
            x = noise * sig[0]
            with torch.no_grad():
                outs = {"2M": sample_dpmpp_2m(model, x, sig, model_kind=kind, disable=True),
                        "3M": sample_dpmpp_3m(model, x, sig, model_kind=kind, disable=True),
                        "UniPC": sample_unipc(model, x, sig, model_kind=kind, disable=True),
                        "v3": sample_dpm_solver_v3(model, x, sig, ems=ems, model_kind=kind, disable=True,
                                                   fallback=False),
                        "v3-nc": sample_dpm_solver_v3(model, x, sig, ems=ems, model_kind=kind, disable=True,
                                                      fallback=False, use_corrector=False)}
            print(f"  {nfe} NFE, error vs exact / vs the tuning's reference: " + ", ".join(
                f"{k} {float(_per(o, exact).mean()):.3e} / {float(_per(o, tuned).mean()):.3e}" for k, o in outs.items()),
                flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("collect", "replay", "reference", "defaults"))
    parser.add_argument("sets", nargs="*", choices=("study", "held"))
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--N", type=int, default=None, help="estimate_ems's N (default its own)")
    parser.add_argument("--eval", type=int, default=None,
                        help="evaluation samples (seed 4242; default the study's 64, whose first rows they extend)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "reference":
        reference_check()
    elif args.command == "defaults":
        print("\n".join(replay_defaults(args.sets, args.out)))
    elif args.command == "collect":
        for which in args.sets:
            collect(which, args.out, args.eval, args.N)
    else:
        print("\n".join(replay(args.sets, args.out, evaluation=args.eval)))


if __name__ == "__main__":
    main()
