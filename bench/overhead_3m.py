"""Overhead per NFE of the guarded 3M samplers (ODE official and Taylor, SDE official) against k-diffusion's
``sample_dpmpp_2m``, trivial model (D = x / 2), 20 Karras steps, best of ``--repeats``, one run, and the same
samplers of a second copy of the package (``--baseline``: the import name of e.g. an older checkout), so that
before/after ratios come from one run; our 2M and 2M SDE show the floors (the SDE rows include the noise).
``--equal`` instead compares every sampler that calls ``exponential.guarded_step`` with the baseline's on guided
Gaussian mixtures (``equality``).

    python -m dpm_solver_nodes.bench.overhead_3m --threads 1 [--baseline dpm_solver_nodes_base]
    python -m dpm_solver_nodes.bench.overhead_3m --baseline dpm_solver_nodes_base --equal   # outputs, not times
"""
import argparse
import importlib
import math

import torch

from .run import time_call


def trivial_model(x, sigma, **_):
    return x * 0.5


def runs(package, label):
    s = importlib.import_module(package + ".samplers")
    return {f"{label} 3M official": lambda m, x, sig: s.sample_dpmpp_3m(m, x, sig, disable=True),
            f"{label} 3M taylor": lambda m, x, sig: s.sample_dpmpp_3m(m, x, sig, disable=True, solver_type="taylor"),
            f"{label} 3M SDE": lambda m, x, sig: s.sample_dpmpp_3m_sde(m, x, sig, disable=True, seed=0)}


def equality(baseline, seeds=(0, 1, 2, 3), steps=(5, 6, 8, 10, 12, 15, 20, 30), dtype=torch.float32):
    """Every sampler that calls ``exponential.guarded_step``, run by this package and by ``baseline`` on guided
    Gaussian mixtures (as tests/test_flow_guidance.py: 16-d, 8 components, guidance 1 / 5 / 7.5 on components 0-1,
    32 samples, eps and flow, two schedules each; noise and sigmas in ``dtype``): the largest difference of the
    outputs, and how many (step, sample) pairs the guard sent to the second-order step (what the equality says
    something about)."""
    from ..analytic.gaussian_mixture import GaussianMixture, GuidedGaussianMixture
    from ..samplers import exponential, sigmas as sg

    package = __package__.rsplit(".", 1)[0]
    mods = {name: importlib.import_module(f"{package}.samplers.{name}")
            for name in ("dpmpp", "sde", "dpm_solver", "v3")}
    fallbacks = [0, 0]
    original = exponential.guarded_step

    def counting(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        unguarded = original(x, *args, **dict(kwargs, guard=False))
        fallbacks[0] += int((out != unguarded).flatten(1).any(1).sum())
        fallbacks[1] += x.shape[0]
        return out

    schedules = {"eps": (lambda n: sg.with_zero(sg.karras(n, 0.03, 14.6, 7.0)),
                         lambda n: sg.with_zero(sg.exponential(n, 0.002, 80.0))),
                 "flow": (lambda n: sg.shifted(n, 3.0), lambda n: sg.recommended_sigmas(n, 0.0029, 1.0, "flow"))}
    worst, cases = 0.0, 0
    for name, mod in mods.items():
        mod.guarded_step = counting
    try:
        for package_name in (package, baseline):
            s = importlib.import_module(package_name + ".samplers")
            samplers = {"3m": lambda m, x, sig, k: s.sample_dpmpp_3m(m, x, sig, model_kind=k, disable=True),
                        "3m-taylor": lambda m, x, sig, k: s.sample_dpmpp_3m(m, x, sig, model_kind=k, disable=True,
                                                                             solver_type="taylor"),
                        "3m-sde": lambda m, x, sig, k: s.sample_dpmpp_3m_sde(m, x, sig, model_kind=k, disable=True,
                                                                              seed=0),
                        "3m-sde-taylor": lambda m, x, sig, k: s.sample_dpmpp_3m_sde(
                            m, x, sig, model_kind=k, disable=True, seed=0, solver_type="taylor", eta=0.5),
                        "dpm-solver-multistep-3": lambda m, x, sig, k: s.sample_dpm_solver(
                            m, x, sig, model_kind=k, order=3, method="multistep", disable=True),
                        "v3": lambda m, x, sig, k: s.sample_dpm_solver_v3(m, x, sig, model_kind=k, disable=True)}
            results = {}
            for seed in seeds:
                for guidance in (1.0, 5.0, 7.5):
                    model = GuidedGaussianMixture(GaussianMixture.random(dim=16, components=8, seed=seed, spread=1.0),
                                                  [0, 1], scale=guidance)
                    for kind in ("eps", "flow"):
                        denoiser = model.denoiser(kind)
                        for k, build in enumerate(schedules[kind]):
                            for n in steps:
                                sig = build(n)
                                noise = torch.randn((32, 16), generator=torch.Generator().manual_seed(seed),
                                                    dtype=dtype)
                                x = noise if kind == "flow" else noise * float(sig[0])
                                for sampler, fn in samplers.items():
                                    results[seed, guidance, kind, k, n, sampler] = fn(denoiser, x, sig.to(dtype), kind)
            if package_name == package:
                ours, counted = results, list(fallbacks)
        for key, value in ours.items():
            difference = (value - results[key]).abs().max().item()
            worst = max(worst, difference if difference == difference else math.inf)
            cases += 1
    finally:
        for name, mod in mods.items():
            mod.guarded_step = original
    print(f"{dtype}: {cases} runs; largest |ours - {baseline}|: {worst}; guarded (step, sample) pairs: {counted[1]}, "
          f"sent to the second-order step: {counted[0]}")
    return worst


def measure(baseline=None, repeats=15, steps=20, batches=(1, 4)):
    """Rows {sampler, shape, overhead_ms_per_nfe, ratio_to_kdiff_dpmpp_2m}: k-diffusion's 2M, our 2M and 2M SDE (the
    floors: the SDE's noise is in both SDE rows), the guarded 3M samplers, and ``baseline``'s 3M samplers."""
    from ..peers import load_kdiffusion
    from .sigmas import make_sigmas

    k = load_kdiffusion()
    s = importlib.import_module(__package__.rsplit(".", 1)[0] + ".samplers")
    table = {"kdiff 2M": lambda m, x, sig: k.sample_dpmpp_2m(m, x, sig, disable=True),
             "ours 2M": lambda m, x, sig: s.sample_dpmpp_2m(m, x, sig, disable=True),
             "ours 2M SDE": lambda m, x, sig: s.sample_dpmpp_2m_sde(m, x, sig, disable=True, seed=0)}
    if baseline:
        table.update(runs(baseline, "before"))
    table.update(runs(__package__.rsplit(".", 1)[0], "after" if baseline else "ours"))
    sigmas = make_sigmas("karras", steps, "eps", sigma_min=0.0292, sigma_max=14.6).float()
    rows = []
    for batch in batches:
        x = torch.randn((batch, 4, 64, 64), generator=torch.Generator().manual_seed(0)) * 14.6
        bare = time_call(lambda: [trivial_model(x, None) for _ in range(100)], repeats) / 100
        for fn in table.values():
            fn(trivial_model, x, sigmas)  # warm-up
        best = dict.fromkeys(table, math.inf)
        for _ in range(repeats):  # interleaved, so that a slow spell of the machine hits every sampler
            for name, fn in table.items():
                best[name] = min(best[name], time_call(lambda: fn(trivial_model, x, sigmas), 1))
        overhead = {name: max(seconds - steps * bare, 0.0) / steps * 1e3 for name, seconds in best.items()}
        rows += [dict(sampler=name, shape=f"{batch}x4x64x64", overhead_ms_per_nfe=value,
                      ratio_to_kdiff_dpmpp_2m=value / overhead["kdiff 2M"]) for name, value in overhead.items()]
    return {"steps": steps, "repeats": repeats, "rows": rows}


def table_lines(result):
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    lines = ["| sampler | " + " | ".join(f"{shape} ms/NFE (ratio)" for shape in shapes) + " |",
             "|---|" + "---|" * len(shapes)]
    for name in dict.fromkeys(r["sampler"] for r in result["rows"]):
        cells = [next(f"{r['overhead_ms_per_nfe']:.3f} ({r['ratio_to_kdiff_dpmpp_2m']:.2f})" for r in result["rows"]
                      if r["sampler"] == name and r["shape"] == shape) for shape in shapes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--baseline", default=None, help="import name of the package to compare against")
    parser.add_argument("--equal", action="store_true", help="compare the outputs with --baseline's instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.equal:
        return [equality(args.baseline, dtype=dtype) for dtype in (torch.float32, torch.float64)]
    print("\n".join(table_lines(measure(args.baseline, args.repeats, args.steps))))


if __name__ == "__main__":
    main()
