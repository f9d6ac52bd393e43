"""What the EMS job's settings cost and what they buy: N (grid cells), K (samples per node) and the JVP back-end.

    python -m dpm_solver_nodes.bench.ems_cost_study [--quick] [--out bench/results_ems_cost.md]

For every model and setting: ``stats.EMSJob`` with ``EMSSettings(N, K, x0_steps=20, jvp)`` (the ComfyUI node's
defaults otherwise: tuned, per-channel) through ``ModelAccess`` (the mixtures' rows are independent, so their tuning
runs in lockstep; the embedded models' wrapper labels rows, so theirs runs set by set), one batch of K samples per
model call; then, on noise neither the estimation nor the tuning saw, ``sample_dpm_solver_v3(model, x, sigmas,
ems=ems)`` with default options against the better of the pack's DPM-Solver++(2M) and (3M) at 5, 6, 8, 10, 15, 20
NFE on the tuning's spacing (uniform in lambda for eps, in sigma from 1 for flow), errors against the references of
bench/ems_tuning_study.py (exact ODE solutions for the mixtures, 500 steps of our 3M for the embedded networks).
Costs: model rows per phase (a JVP row counted as one) and CPU seconds at 1 thread.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import time

import torch

from .ems_tuning_study import EVAL, MIXTURES, NFES, embedded_case, mixture_case

HERE = pathlib.Path(__file__).resolve().parent
SETTINGS = [  # (N, K, jvp): main's default before issue 14 (forward AD), the same with one-sided differences, the
    # new default, the shipped ComfyUI workflow's and its neighbours, and two of the same cost with another split
    (100, 32, "forward"), (100, 32, "one_sided_difference"), (200, 8, "one_sided_difference"),
    (200, 4, "one_sided_difference"), (180, 4, "one_sided_difference"), (100, 8, "one_sided_difference"),
    (50, 16, "one_sided_difference"),
]


class _ProcessTimedAccess:
    """``ModelAccess`` that keeps the CPU seconds per phase."""

    def __init__(self, model, rows_independent):
        from ..stats.job import ModelAccess

        self.inner = ModelAccess(model, network_dtype=torch.float32, rows_independent=rows_independent)
        self.network_dtype, self.rows_independent = self.inner.network_dtype, rows_independent
        self.seconds = {}

    def run(self, phase, work):
        started = time.process_time()
        try:
            return self.inner.run(phase, work)
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.process_time() - started


def _error(out, reference):
    return float((out.double() - reference.double()).pow(2).flatten(1).mean(1).sqrt().mean())


def run(case, N, K, jvp, reference_cache):
    from ..samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_3m
    from ..samplers.v3 import sample_dpm_solver_v3
    from ..stats.job import EMSJob
    from ..stats.settings import EMSSettings, EMSTarget
    from ..stats.tuning import sampling_sigmas

    kind, shape, dtype = case["kind"], case["shape"], case["dtype"]
    settings = EMSSettings(N=N, K=K, x0_steps=20, jvp=jvp)
    target = EMSTarget(f"study {case['name']}", kind, float(case["cfg"]), tuple(shape), case["sigma_min"],
                       case["sigma_max"])
    job = EMSJob(target, settings, batch_size=K, dtype=dtype, metadata={"cfg": repr(float(case["cfg"]))})
    access = _ProcessTimedAccess(case["model"], rows_independent=case["name"].startswith("mixture"))
    with torch.no_grad():
        ems = job.compute(access)
    name = case["name"]
    if name not in reference_cache:
        noise = torch.randn((case["eval"],) + tuple(shape), generator=torch.Generator().manual_seed(4242),
                            dtype=dtype)
        reference_cache[name] = (noise, case["reference"](noise), {})
    noise, reference, peers = reference_cache[name]
    ratios = {}
    for nfe in NFES:
        sigmas = sampling_sigmas(nfe, case["sigma_min"], case["sigma_max"], kind).to(dtype)
        x = noise * sigmas[0]
        with torch.no_grad():
            v3 = _error(sample_dpm_solver_v3(case["model"], x, sigmas, ems=ems, model_kind=kind, disable=True),
                        reference)
            if nfe not in peers:
                peers[nfe] = min(_error(solver(case["model"], x, sigmas, model_kind=kind, disable=True), reference)
                                 for solver in (sample_dpmpp_2m, sample_dpmpp_3m))
        decision = ems.decision_for(nfe)
        ratios[nfe] = (v3 / peers[nfe], decision.solver if decision else "v3")
    tuning = json.loads(ems.metadata.get("tuning", "{}"))
    return {"model": name, "cfg": case["cfg"], "N": N, "K": K, "jvp": jvp, "fit": tuning.get("fit", "untuned"),
            "tuning_samples": tuning.get("samples_per_set", 0), "rows": {p: v["rows"] for p, v in job.phases.items()},
            "seconds": {p: round(v, 2) for p, v in access.seconds.items()}, "ratios": ratios}


def cases(quick):
    out = [lambda: embedded_case("eps", 1.0), lambda: embedded_case("eps", 7.5), lambda: embedded_case("flow", 1.0),
           lambda: embedded_case("flow", 7.5)]
    if not quick:
        out += [lambda: mixture_case(*MIXTURES[1], 1.0), lambda: mixture_case(*MIXTURES[4], 7.5)]
    return out


def _cell(ratio, solver):
    short = {"v3": "", "dpmpp_2m": " 2M", "dpmpp_3m": " 3M"}[solver]
    return f"{ratio:.2f}{short}"


def markdown(results, seconds):
    lines = ["# EMS job cost: N, K and the JVP back-end (issue 12 cost, issue 14)", "",
             f"Generated by `python -m dpm_solver_nodes.bench.ems_cost_study` (bench/ems_cost_study.py; method in its "
             f"docstring). torch {torch.__version__}, 1 thread, {platform.machine()}, shared 2-core machine (other "
             f"jobs running: CPU seconds, not wall), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{seconds / 60:.1f} min in all.", "",
             "Cells: default-path v3 error / the better of our DPM-Solver++(2M) and (3M) on held-out noise (< 1: v3 "
             "wins; 2M / 3M: the EMS send that NFE to that solver, so the ratio is that solver's). Rows: model rows "
             "per phase (x0, estimate, tune; a JVP row counted as one, a difference's forward rows each), CPU "
             "seconds per phase.", "",
             "| model | cfg | N | K | JVP | fit (S) | " + " | ".join(str(n) for n in NFES) +
             " | mean log ratio | rows x0 / est / tune | CPU s x0 / est / tune (all) |",
             "|" + "---|" * (len(NFES) + 9)]
    for r in results:
        cells = [_cell(*r["ratios"][n]) for n in NFES]
        mean_log = sum(math.log(r["ratios"][n][0]) for n in NFES) / len(NFES)
        rows = " / ".join(f"{r['rows'].get(p, 0):,}" for p in ("x0", "estimate", "tune"))
        secs = " / ".join(f"{r['seconds'].get(p, 0):.1f}" for p in ("x0", "estimate", "tune"))
        jvp = {"forward": "forward AD", "one_sided_difference": "one-sided"}.get(r["jvp"], r["jvp"])
        lines.append(f"| {r['model']} | {r['cfg']:g} | {r['N']} | {r['K']} | {jvp} | {r['fit']} ({r['tuning_samples']}) "
                     f"| " + " | ".join(cells) + f" | {mean_log:+.3f} | {rows} | {secs} "
                     f"({sum(r['seconds'].values()):.1f}) |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the embedded models only")
    parser.add_argument("--out", default=str(HERE / "results_ems_cost.md"))
    parser.add_argument("--settings", nargs="*", default=None, help="N,K,jvp triples (default: SETTINGS)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = SETTINGS if not args.settings else [(int(n), int(k), j) for n, k, j in
                                                     (item.split(",") for item in args.settings)]
    started = time.perf_counter()
    results = []
    for make in cases(args.quick):
        case = make()
        reference_cache = {}
        for N, K, jvp in settings:
            result = run(case, N, K, jvp, reference_cache)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "ratios"}),
                  {n: (round(v[0], 2), v[1]) for n, v in result["ratios"].items()}, flush=True)
    out = pathlib.Path(args.out)
    out.write_text("\n".join(markdown(results, time.perf_counter() - started)) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
