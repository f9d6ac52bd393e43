"""Do the EMS tuning's per-NFE decisions hold on the schedules people sample with?

    python -m dpm_solver_nodes.bench.ems_schedule_transfer [--quick] [--cache DIR] [--out bench/results_ems_schedule_transfer.md]

The tuning (``stats.tuning``) decides, per NFE, between v3 and the pack's solvers on one spacing (uniform in lambda
for eps from sigma_max, uniform in sigma for flow), and ``sample_dpm_solver_v3`` applies the decision whatever
sigmas the host passes.  This study takes the models and EMS of ``bench/ems_tuning_study.py`` (default path:
``estimate_ems(model, x0, sigma_min, sigma_max)``, N = 100, K = 32) and, on 64 (mixtures) / 50 (networks) fresh
noise samples, measures on each schedule family: the default path (decisions applied), v3 forced
(``fallback=False``) and the pack's 2M, 3M and UniPC bh2, against the same references as the tuning study.
Schedules: the tuning's spacing, Karras rho = 7 (the WebUI's and many ComfyUI users' choice), the pack's
``recommended_sigmas``; eps networks also "time_uniform" (ComfyUI's "normal"); flow also the hosts' shift 3 (from
sigma_max = 0.999, where the references start).  A decision is "wrong" on a schedule where the solver it runs has
more than 1.05x the error of the better of v3 and the pack's best there.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import torch

from .ems_tuning_study import (GUIDANCES, MIXTURES, NFES, _error, conv_case, default_path_ems, embedded_case,
                               mixture_case, model_samples)

HERE = pathlib.Path(__file__).resolve().parent
WRONG = 1.05


def schedule_families(case):
    """name -> (NFE -> sigmas); every flow schedule starts at sigma = 1 (x = noise), where the references start."""
    from ..embedded.model import DiscreteVPSchedule
    from ..samplers.sigmas import karras, make_sigmas, recommended_sigmas, shifted, with_zero
    from ..stats.tuning import sampling_sigmas

    lo, hi, kind = case["sigma_min"], case["sigma_max"], case["kind"]
    if kind == "flow":
        return {"time_uniform (tuning)": lambda n: sampling_sigmas(n, lo, hi, kind),
                "logsnr_uniform": lambda n: make_sigmas("logsnr_uniform", n, "flow", lo),
                "karras": lambda n: make_sigmas("karras", n, "flow", lo),
                "recommended": lambda n: recommended_sigmas(n, lo, 1.0, "flow"),
                "shift 3 (hosts)": lambda n: shifted(n, 3.0)}
    out = {"logsnr_uniform (tuning)": lambda n: sampling_sigmas(n, lo, hi, kind),
           "karras": lambda n: with_zero(karras(n, lo, hi)),
           "recommended": lambda n: recommended_sigmas(n, lo, hi, kind)}
    if not case["name"].startswith("mixture"):  # a discrete SD-v1 timestep grid (ComfyUI's "normal")
        discrete = DiscreteVPSchedule()
        out["time_uniform"] = lambda n: make_sigmas("time_uniform", n, "eps", lo, hi, discrete=discrete)
    return out


# the issue's comparison: v3 on logSNR-uniform steps against each pack solver on its best of these
ISSUE_V3_SCHEDULE = {"eps": "logsnr_uniform (tuning)", "flow": "logsnr_uniform"}
ISSUE_PEER_SCHEDULES = ("karras", "logsnr_uniform", "logsnr_uniform (tuning)", "time_uniform",
                        "time_uniform (tuning)")


def run_case(case, K=32, nfes=NFES):
    from ..samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_3m
    from ..samplers.unipc import sample_unipc
    from ..samplers.v3 import sample_dpm_solver_v3

    model, kind, shape, dtype = case["model"], case["kind"], case["shape"], case["dtype"]
    ems = default_path_ems(case, model, model_samples(case, model, K), K)
    noise = torch.randn((case["eval"],) + shape, generator=torch.Generator().manual_seed(4242), dtype=dtype)
    reference = case["reference"](noise)
    out = {}
    for family, build in schedule_families(case).items():
        rows = {}
        for nfe in nfes:
            sigmas = build(nfe).to(dtype)
            x = noise * sigmas[0]  # flow: sigmas[0] = 1
            with torch.no_grad():
                errors = {
                    "default": _error(sample_dpm_solver_v3(model, x, sigmas, ems=ems, model_kind=kind, disable=True),
                                      reference),
                    "v3": _error(sample_dpm_solver_v3(model, x, sigmas, ems=ems, model_kind=kind, disable=True,
                                                      fallback=False), reference),
                    "dpmpp_2m": _error(sample_dpmpp_2m(model, x, sigmas, model_kind=kind, disable=True), reference),
                    "dpmpp_3m": _error(sample_dpmpp_3m(model, x, sigmas, model_kind=kind, disable=True), reference),
                    "unipc": _error(sample_unipc(model, x, sigmas, model_kind=kind, disable=True), reference)}
            decision = ems.decision_for(nfe)
            pack = min(errors["dpmpp_2m"], errors["dpmpp_3m"], errors["unipc"])
            best = min(pack, errors["v3"])
            rows[nfe] = {"errors": errors, "solver": decision.solver if decision else "v3",
                         "default_vs_pack": errors["default"] / pack, "v3_vs_pack": errors["v3"] / pack,
                         "default_vs_best": errors["default"] / best}
        out[family] = rows
    return {"name": case["name"], "cfg": case["cfg"], "kind": kind, "families": out}


def across_schedules(result):
    """{"issue": ..., "best": ...} per NFE (``report``)."""
    families = result["families"]
    pack = ("dpmpp_2m", "dpmpp_3m", "unipc")
    out = {"issue": {}, "best": {}}
    for n in NFES:
        peer = min(families[f][n]["errors"][k] for f in ISSUE_PEER_SCHEDULES if f in families for k in pack)
        out["issue"][n] = families[ISSUE_V3_SCHEDULE[result["kind"]]][n]["errors"]["default"] / peer
        out["best"][n] = (min(rows[n]["errors"]["default"] for rows in families.values())
                          / min(rows[n]["errors"][k] for rows in families.values() for k in pack))
    return out


def _cell(row):
    solver = {"v3": "", "dpmpp_2m": "=2M", "dpmpp_3m": "=3M", "unipc": "=UniPC"}[row["solver"]]
    flag = " !" if row["default_vs_best"] > WRONG else ""
    return f"{row['default_vs_pack']:.2f}{solver} ({row['v3_vs_pack']:.2f}){flag}"


def report(results, seconds, threads):
    lines = ["# Do the EMS tuning's decisions hold on other schedules?", "",
             "Generated by `python -m dpm_solver_nodes.bench.ems_schedule_transfer` (see its docstring), "
             f"{threads} thread(s), {seconds / 60:.1f} min, torch {torch.__version__}, {platform.machine()}.", "",
             "Each cell: the default path (the EMS's decisions applied; \"=X\": the file sends that NFE to X) / the "
             "best of our 2M, 3M and UniPC bh2 on the same schedule, then in brackets v3 forced (`fallback=False`) "
             f"/ that best; \"!\": the default path is more than {WRONG}x the better of v3 and that best (the "
             "decision, made on the tuning's spacing, is wrong on this schedule).", ""]
    families = []
    for result in results:
        for family in result["families"]:
            if family not in families:
                families.append(family)
    wrong = {family: [0, 0] for family in families}
    for result in results:
        lines += [f"## {result['name']}, cfg {result['cfg']:g}", "",
                  "| schedule | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
                  "|---|" + "---|" * len(NFES)]
        for family, rows in result["families"].items():
            lines.append(f"| {family} | " + " | ".join(_cell(rows[n]) for n in NFES) + " |")
            wrong[family][0] += sum(rows[n]["default_vs_best"] > WRONG for n in NFES)
            wrong[family][1] += len(NFES)
        lines.append("")
    lines += ["## Summary: wrong decisions per schedule", "", "| schedule | wrong / cells |", "|---|---|"]
    lines += [f"| {family} | {a} / {b} |" for family, (a, b) in wrong.items()]
    lines += ["", "## Across schedules", "",
              "issue: the default path on logSNR-uniform steps / the best of the pack's 2M, 3M and UniPC, each on "
              "its best of Karras, logSNR-uniform and time-uniform (eps mixtures: no time-uniform grid); best: the "
              "default path on its best schedule of this study / the pack's best solver on its best schedule.", "",
              "| model | cfg | metric | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
              "|---|---|---|" + "---|" * len(NFES)]
    for result in results:
        for metric, cells in across_schedules(result).items():
            lines.append(f"| {result['name']} | {result['cfg']:g} | {metric} | "
                         + " | ".join(f"{cells[n]:.2f}" for n in NFES) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dpm_solver_nodes.bench.ems_schedule_transfer")
    parser.add_argument("--quick", action="store_true", help="two mixtures and the embedded eps model only")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/dpm_solver_nodes/ems_tuning_study"),
                        help="where the conv net is cached (the tuning study's cache)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results_ems_schedule_transfer.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    mixtures = MIXTURES[:1] + MIXTURES[3:4] if args.quick else MIXTURES
    cases = [mixture_case(*m, cfg=cfg) for m in mixtures for cfg in GUIDANCES]
    cases += [embedded_case(kind, cfg) for kind in (("eps",) if args.quick else ("eps", "flow")) for cfg in GUIDANCES]
    if not args.quick:
        cases += [conv_case(cfg, args.cache) for cfg in GUIDANCES]
    results = []
    for case in cases:
        results.append(run_case(case))
        print(json.dumps({"name": case["name"], "cfg": case["cfg"],
                          "cells": {f: " ".join(_cell(r[n]) for n in NFES)
                                    for f, r in results[-1]["families"].items()}}), flush=True)
    out = pathlib.Path(args.out)
    out.write_text(report(results, time.perf_counter() - started, args.threads))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(out)


if __name__ == "__main__":
    main()
