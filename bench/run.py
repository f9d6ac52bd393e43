"""The benchmark: quality and overhead of our solvers against PyPI k-diffusion and diffusers, measured in one run.

    python -m dpm_solver_nodes bench [--parts gmm embedded overhead ems] [--quick] [--threads 1]
                                     [--out bench/results]
    python -m dpm_solver_nodes bench --report-only      # rebuild results.md from the JSON of the last run

Parts (each writes ``<out>/<part>.json``; ``<out>/../results.md`` is regenerated from all of them, no hand-typed
numbers):
- gmm: the analytic Gaussian mixture (d = 8 as a 1x2x4 latent, 5 components, float64; diffusers runs in float32)
  with an exact reference (DOP853 at 1e-12 to sigma_min, then the exact denoiser), unguided and with guidance 5
  (``GuidedGaussianMixture``).  Every solver on the same Karras sigmas and the same noise; metric: the median over
  samples of the per-sample RMS error (trajectories near basin boundaries switch modes, so the mean is noisy).
- embedded: the demo's table (``demo.run_demo``) on the embedded eps model: RMS error vs a converged reference and
  Fréchet distance.
- overhead: sampler time per NFE with a trivial denoiser (D = x / 2) at 4x64x64 and 4x128x128 (eps) and 16x64x64
  (flow; peers run it as eps, their arithmetic is the same), batch 1, 20 steps, best of ``--repeats``; overhead =
  (run time - bare model calls) / NFE, reported as a ratio to k-diffusion's ``sample_dpmpp_2m`` from the same run.
  Includes DPM-Solver-v3's one-off setup (its coefficient plan) with per-element and per-channel synthetic EMS, the
  SDE noise sources at batch 4 and the guarded 3M samplers at batch 1 and 4 (``overhead_3m.measure``).
- ems: EMS estimation cost on the embedded model (``stats.estimate.estimate_ems``): seconds and JVP rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import platform
import time
import warnings

import torch

from ..peers import Unavailable, solvers

log = logging.getLogger("dpm_solver_nodes.bench")
HERE = pathlib.Path(__file__).resolve().parent
PARTS = ("gmm", "embedded", "overhead", "ems")
GMM_SIGMA_MIN, GMM_SIGMA_MAX = 0.0292, 14.6


def environment(threads):
    return {"threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or "", "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_json(path: pathlib.Path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# GMM quality
# ----------------------------------------------------------------------------------------------------------------

def gmm_part(args):
    from ..analytic.gaussian_mixture import GaussianMixture, GuidedGaussianMixture, reference_solution
    from .sigmas import make_sigmas

    mixture = GaussianMixture.random(dim=8, components=5, seed=0)
    batch = 16 if args.quick else 64
    nfes = (5, 10, 20) if args.quick else (5, 6, 8, 10, 15, 20, 40)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(batch, 1, 2, 4, generator=generator, dtype=torch.float64)
    models = {"1": mixture, "5": GuidedGaussianMixture(mixture, [0, 1], scale=5.0)}

    def sigmas_for(n):
        return make_sigmas("karras", n, "eps", sigma_min=GMM_SIGMA_MIN, sigma_max=GMM_SIGMA_MAX)

    rows = []
    for scale, mix in models.items():
        model = mix.denoiser("eps")
        x_start = (noise * GMM_SIGMA_MAX).reshape(batch, -1)
        x_end = reference_solution(mix, x_start, GMM_SIGMA_MAX, GMM_SIGMA_MIN)
        exact = mix.denoise_ve(x_end, torch.full((batch,), GMM_SIGMA_MIN, dtype=torch.float64)).reshape(noise.shape)
        for solver in solvers(args.families):
            for nfe in ([20] if solver.adaptive else nfes):
                dtype = torch.float32 if solver.family == "diffusers" else torch.float64
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        out, calls, note = solver.run(model, noise.to(dtype), lambda n: sigmas_for(n).to(dtype),
                                                      {"seed": args.seed}, nfe, "eps")
                except Unavailable as error:
                    log.warning("gmm: skipping %s: %s", solver.name, error)
                    break
                except Exception as error:
                    log.error("gmm: %s failed at NFE %d: %s", solver.name, nfe, error)
                    rows.append(dict(guidance=scale, sampler=solver.name, family=solver.family, nfe_budget=nfe,
                                     nfe=None, median_error=math.nan, status=f"failed: {error}"))
                    continue
                per_sample = ((out.double() - exact) ** 2).flatten(1).mean(1).sqrt()
                rows.append(dict(guidance=scale, sampler=solver.name, family=solver.family, nfe_budget=nfe,
                                 nfe=calls, stochastic=solver.stochastic, median_error=float(per_sample.median()),
                                 status="ok"))
    return {"rows": rows, "nfe": list(nfes), "batch": batch, "dim": 8, "components": 5,
            "sigma_range": [GMM_SIGMA_MIN, GMM_SIGMA_MAX], "schedule": "karras"}


# ----------------------------------------------------------------------------------------------------------------
# embedded model quality (the demo)
# ----------------------------------------------------------------------------------------------------------------

def embedded_part(args):
    """Runs the demo (or, with ``--demo-json``, takes the rows of an earlier demo run's results.json)."""
    if args.demo_json:
        data = json.loads(pathlib.Path(args.demo_json).read_text())
        data["info"]["source"] = str(args.demo_json)
        return {"rows": data["rows"], "info": data["info"]}
    from ..demo import build_parser, run_demo

    argv = ["--threads", str(args.threads), "--seed", str(args.seed), "--out", "unused"]
    if args.quick:
        argv.append("--quick")
    demo_args = build_parser().parse_args(argv)
    demo_args.samplers = None if args.families == ("ours", "k-diffusion", "diffusers") else list(args.families)
    rows, _, info = run_demo(demo_args)
    return {"rows": rows, "info": info}


# ----------------------------------------------------------------------------------------------------------------
# overhead
# ----------------------------------------------------------------------------------------------------------------

def trivial_model(x, sigma, **_):
    return x * 0.5


def synthetic_ems(stat_shape, nodes=251, model_kind="eps"):
    """An EMS with smooth, non-trivial l, s, b (for timing only)."""
    from ..stats.ems import EMS

    lambdas = torch.linspace(-4.0, 4.0, nodes, dtype=torch.float64)
    wave = torch.sin(lambdas)[:, None, None, None]
    shape = (nodes,) + tuple(stat_shape)
    l = (1 + 0.05 * wave).expand(shape).contiguous()
    s = (0.02 * wave).expand(shape).contiguous()
    b = (0.01 * wave).expand(shape).contiguous()
    return EMS(lambdas, l.float(), s.float(), b.float(), metadata={"model_kind": model_kind})


def time_call(fn, repeats):
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def overhead_part(args):
    from ..samplers import sample_dpm_solver_v3
    from .sigmas import make_sigmas

    steps = 20
    repeats = 2 if args.quick else 5
    shapes = [("eps", (4, 64, 64))] if args.quick else [("eps", (4, 64, 64)), ("eps", (4, 128, 128)),
                                                        ("flow", (16, 64, 64))]
    rows, setup = [], []
    all_solvers = solvers(args.families)
    for kind, shape in shapes:
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn((1,) + shape, generator=generator)
        x = noise if kind == "flow" else noise * 14.6
        bare = time_call(lambda: [trivial_model(x, torch.ones(1)) for _ in range(100)], repeats) / 100

        def sigmas_for(n, _kind=kind):
            return make_sigmas("karras", n, _kind, sigma_min=0.0292 if _kind == "eps" else 1e-3,
                               sigma_max=14.6 if _kind == "eps" else 1.0).float()

        for solver in all_solvers:
            run_kind = "eps" if solver.eps_only else kind
            run_sigmas = (lambda n: make_sigmas("karras", n, "eps", sigma_min=0.0292, sigma_max=14.6).float()
                          ) if run_kind != kind else sigmas_for
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    solver.check(run_kind)
                    fixed, _ = solver.steps_for(steps, run_sigmas, run_kind)
                    solver.run(trivial_model, noise, run_sigmas, {"seed": 0}, steps, run_kind, fixed)  # warm-up
                    calls = []

                    def once():
                        calls.append(solver.run(trivial_model, noise, run_sigmas, {"seed": 0}, steps, run_kind,
                                                fixed)[1])

                    seconds = time_call(once, repeats)
            except Unavailable as error:
                log.warning("overhead: skipping %s: %s", solver.name, error)
                continue
            except Exception as error:
                log.error("overhead: %s failed: %s", solver.name, error)
                continue
            nfe = calls[-1]
            rows.append(dict(kind=kind, shape="x".join(map(str, shape)), sampler=solver.name, family=solver.family,
                             nfe=nfe, seconds=seconds, bare_call_ms=bare * 1e3,
                             overhead_ms_per_nfe=max(seconds - nfe * bare, 0.0) / nfe * 1e3,
                             run_as="eps" if run_kind != kind else kind))
        # DPM-Solver-v3 setup: the first call with a new EMS / sigma list builds the coefficient plan
        for reduction, stat_shape in (("per_element", shape), ("per_channel", (shape[0], 1, 1))):
            ems = synthetic_ems(stat_shape, model_kind=kind)
            sig = sigmas_for(steps)
            start = time.perf_counter()
            sample_dpm_solver_v3(trivial_model, x, sig, disable=True, ems=ems, model_kind=kind)
            first = time.perf_counter() - start
            again = time_call(lambda: sample_dpm_solver_v3(trivial_model, x, sig, disable=True, ems=ems,
                                                           model_kind=kind), repeats)
            setup.append(dict(kind=kind, shape="x".join(map(str, shape)), reduction=reduction, ems_nodes=251,
                              first_call_s=first, cached_call_s=again, setup_s=max(first - again, 0.0)))
    reference = {(r["kind"], r["shape"]): r["overhead_ms_per_nfe"] for r in rows if r["sampler"] == "kdiff:dpmpp_2m"}
    for r in rows:
        base = reference.get((r["kind"], r["shape"]))
        r["ratio_to_kdiff_dpmpp_2m"] = r["overhead_ms_per_nfe"] / base if base else math.nan
    return {"rows": rows, "v3_setup": setup, "steps": steps, "repeats": repeats, "batch": 1,
            "sde_noise": sde_noise_overhead(steps, repeats, quick=args.quick),
            "guard_3m": guard_overhead(steps, repeats, quick=args.quick)}


def guard_overhead(steps, repeats, quick=False):
    """The guarded 3M samplers (ODE official and Taylor, SDE) at batch 1 and 4 (``overhead_3m.measure``): the
    price of ``exponential.guarded_step`` next to k-diffusion's 2M and our 2M / 2M SDE."""
    from .overhead_3m import measure

    try:
        return measure(repeats=repeats, steps=steps, batches=(1,) if quick else (1, 4))
    except Unavailable:
        return None


def guard_table(guard):
    from .overhead_3m import table_lines

    return [f"The guarded 3M (`exponential.guarded_step`) at 4x64x64, batch 1 and 4, {guard['steps']} Karras steps, "
            f"trivial model, best of {guard['repeats']} interleaved runs; overhead = (run - bare model calls) / NFE, "
            "ms and ratio to k-diffusion's `sample_dpmpp_2m` in the same run (the SDE rows include the noise):",
            ""] + table_lines(guard)


def sde_noise_overhead(steps, repeats, quick=False, shape=(4, 4, 64, 64)):
    """Our 2M SDE per noise source at batch 4 (the issue-13 row): overhead per NFE with a trivial model, and a bare
    per-step ``randn`` of the latent (the floor of any fresh-noise step) and k-diffusion's ODE 2M for scale."""
    from ..samplers import sample_dpmpp_2m_sde
    from ..peers import Unavailable, load_kdiffusion
    from .sigmas import make_sigmas

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = make_sigmas("karras", steps, "eps", sigma_min=0.0292, sigma_max=14.6).float()
    bare = time_call(lambda: [trivial_model(x, torch.ones(1)) for _ in range(100)], repeats) / 100
    runs = {f"ours 2M SDE, noise_type={t}": (lambda t=t: sample_dpmpp_2m_sde(
        trivial_model, x, sigmas, seed=0, noise_type=t, disable=True)) for t in ("gaussian", "brownian")}
    if not quick:
        runs["ours 2M SDE, noise_type=brownian_tree"] = lambda: sample_dpmpp_2m_sde(
            trivial_model, x, sigmas, seed=0, noise_type="brownian_tree", disable=True)
    runs["bare randn per step (no sampler)"] = lambda: [torch.randn(shape) for _ in range(steps)]
    try:
        k = load_kdiffusion()
        runs["kdiff:dpmpp_2m (ODE)"] = lambda: k.sample_dpmpp_2m(trivial_model, x, sigmas, disable=True)
    except Unavailable:
        pass
    rows = []
    for name, fn in runs.items():
        fn()  # warm-up
        seconds = time_call(fn, 2 if "tree" in name else repeats)
        calls = 0 if name.startswith("bare") else steps
        rows.append(dict(sampler=name, seconds=seconds,
                         overhead_ms_per_nfe=max(seconds - calls * bare, 0.0) / steps * 1e3))
    gaussian = next(r["overhead_ms_per_nfe"] for r in rows if r["sampler"].endswith("=gaussian"))
    for r in rows:
        r["ratio_to_gaussian"] = r["overhead_ms_per_nfe"] / gaussian
    return {"shape": "x".join(map(str, shape)), "steps": steps, "bare_call_ms": bare * 1e3, "rows": rows}


def sde_noise_table(noise):
    lines = [f"SDE noise sources: our DPM-Solver++(2M) SDE at {noise['shape']} (batch {noise['shape'].split('x')[0]}), "
             f"{noise['steps']} Karras steps, trivial model; overhead = (run - bare model calls) / NFE, ratio to the "
             "same sampler with `noise_type=\"gaussian\"`:", "", "| run | ms/NFE | ratio to gaussian |", "|---|---|---|"]
    for r in noise["rows"]:
        lines.append(f"| {r['sampler']} | {r['overhead_ms_per_nfe']:.3f} | {r['ratio_to_gaussian']:.2f} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# EMS estimation cost
# ----------------------------------------------------------------------------------------------------------------

def ems_part(args):
    """The cost recorded in the shipped EMS files, plus a small estimation timed in this run."""
    from ..embedded.make_ems import BATCH, LabelledByRow
    from ..embedded.model import HERE as EMBEDDED, load_model
    from ..stats.ems import load_ems
    from ..stats.estimate import estimate_ems, generate_x0

    runs = []
    for path in sorted(EMBEDDED.glob("mnist16_*_ems_cfg*.safetensors")):
        meta = load_ems(path).metadata
        runs.append(dict(source=f"shipped {path.name}", N=int(meta["N"]), K=int(meta["K"]),
                         reduction=meta.get("reduction"), x0_seconds=float(meta.get("x0_seconds", "nan")),
                         estimate_seconds=float(meta["seconds"]), jvp_rows=int(meta.get("jvp_rows", 0))))
    model = load_model("eps")
    wrapped = LabelledByRow(model, 1.0)
    N, K = (5, BATCH) if args.quick else (20, 2 * BATCH)
    start = time.perf_counter()
    x0 = generate_x0(wrapped, model.shape, K, model.sigma_max, model.sigma_min, steps=50, seed=0, batch_size=BATCH)
    x0_seconds = time.perf_counter() - start
    ems = estimate_ems(wrapped, x0, model.sigma_min, model.sigma_max, N=N, K=K, batch_size=BATCH,
                       tune=False)
    runs.append(dict(source="measured in this run", N=N, K=K, reduction=ems.metadata.get("reduction"),
                     x0_seconds=x0_seconds, estimate_seconds=float(ems.metadata["seconds"]),
                     jvp_rows=int(ems.metadata.get("jvp_rows", 0))))
    return {"runs": runs, "model": "embedded eps MLP (1.8M parameters, 1x16x16, guidance doubles the rows)"}


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------

def fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def error_table(rows, nfes, key, guidance):
    sub = [r for r in rows if str(r["guidance"]) in (str(guidance), f"{float(guidance):g}") and r["status"] == "ok"]
    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for name in dict.fromkeys(r["sampler"] for r in sub):
        own = [r for r in sub if r["sampler"] == name]
        star = "*" if own[0].get("stochastic") else ""
        cells = []
        adaptive = len(own) == 1 and len(nfes) > 1
        for n in nfes:
            if adaptive:
                r = own[0]
                cells.append(f"{fmt(r[key])} ({r['nfe']} NFE)" if n == nfes[-1] else "")
                continue
            r = next((r for r in own if r["nfe_budget"] == n), None)
            cells.append("" if r is None else fmt(r[key]) + ("" if r["nfe"] == n else f" ({r['nfe']})"))
        lines.append(f"| {name}{star} | " + " | ".join(cells) + " |")
    return lines


def standings(rows, key, guidance, nfes=(5, 10, 20)):
    """Markdown lines: error ratio ours / peer (below 1: ours more accurate) for each of our deterministic samplers
    against each deterministic peer, at the NFE budgets ``nfes``."""
    sub = {(r["sampler"], r["nfe_budget"]): r for r in rows if r["status"] == "ok" and not r.get("stochastic")
           and str(r["guidance"]) in (str(guidance), f"{float(guidance):g}")}
    ours = list(dict.fromkeys(s for (s, _), r in sub.items() if r["family"] == "ours" and "adaptive" not in s))
    peers = list(dict.fromkeys(s for (s, _), r in sub.items() if r["family"] != "ours"
                               and "adaptive" not in s))
    lines = [f"Error ratio ours / peer at guidance {guidance:g} (below 1: ours more accurate); cells: NFE "
             + " / ".join(map(str, nfes)) + " (same budget; solvers that use fewer calls keep their own count).", "",
             "| ours \\ peer | " + " | ".join(peers) + " |", "|---|" + "---|" * len(peers)]
    for o in ours:
        cells = []
        for p in peers:
            values = []
            for n in nfes:
                a, b = sub.get((o, n)), sub.get((p, n))
                ok = a and b and b[key] and b[key] > 0 and not math.isnan(a[key])
                values.append(fmt(a[key] / b[key], 2) if ok else "-")
            cells.append(" / ".join(values))
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(out: pathlib.Path):
    parts = {}
    for part in PARTS:
        path = out / f"{part}.json"
        if path.exists():
            parts[part] = json.loads(path.read_text())
    lines = ["# Benchmark results", "",
             "Generated by `python -m dpm_solver_nodes bench` (rebuild with `--report-only`) from the JSON files in "
             f"`{out.name}/`; no number here is typed by hand.", ""]
    if "gmm" in parts:
        g = parts["gmm"]
        env = g["environment"]
        lines += ["## Quality on the analytic Gaussian mixture (exact reference)", "",
                  f"d = {g['dim']}, {g['components']} components, batch {g['batch']}, {g['schedule']} sigmas "
                  f"{g['sigma_range'][1]} -> {g['sigma_range'][0]} then 0, float64 (diffusers float32). Median "
                  f"per-sample RMS error vs DOP853 (1e-12) + exact denoiser. (n) = model calls used when below the "
                  f"budget; * = stochastic (different target). {env['date']}, torch {env['torch']}.", ""]
        for w in ("1", "5"):
            lines += [f"### Guidance {w}", ""] + error_table(g["rows"], g["nfe"], "median_error", w) + [""]
            lines += standings(g["rows"], "median_error", float(w))
    if "embedded" in parts:
        e = parts["embedded"]
        info = e["info"]
        lines += ["## Quality on the embedded model (16x16 MNIST, SD v1 schedule, eps)", "",
                  f"Batch {info['batch']}, {info['schedule']} schedule, seed {info['seed']}, {info['threads']} thread(s). "
                  f"RMS error vs our 3M at {info['reference_steps']} steps (self-check vs 2M at twice the steps: "
                  + ", ".join(f"cfg {w}: {v['self_check_rms']:.1e}" for w, v in info["references"].items())
                  + f"). Fréchet distance real floor at this batch: {fmt(info['real_floor'])}.", ""]
        for w in info["guidance"]:
            lines += [f"### Guidance {w:g}: RMS error", ""] + error_table(e["rows"], info["nfe"], "error_rms", w)
            lines += [""] + standings(e["rows"], "error_rms", float(w))
            lines += [f"### Guidance {w:g}: Fréchet distance", ""] + error_table(
                e["rows"], info["nfe"], "frechet_distance", w) + [""]
    if "overhead" in parts:
        o = parts["overhead"]
        env = o["environment"]
        lines += ["## Sampler overhead (trivial model)", "",
                  f"{env['threads']} thread(s), {env['cpus']} CPUs ({env['machine']}), torch {env['torch']}, batch 1, "
                  f"{o['steps']} steps, best of {o['repeats']}; overhead = (run - bare model calls) / NFE. Ratio to "
                  "k-diffusion `sample_dpmpp_2m` measured in the same run. Peers are not flow-aware; on the flow "
                  "latent they run as eps (same arithmetic).", ""]
        shapes = list(dict.fromkeys((r["kind"], r["shape"]) for r in o["rows"]))
        lines += ["| sampler | " + " | ".join(f"{k} {s} ms/NFE (ratio)" for k, s in shapes) + " |",
                  "|---|" + "---|" * len(shapes)]
        for name in dict.fromkeys(r["sampler"] for r in o["rows"]):
            cells = []
            for k, s in shapes:
                r = next((r for r in o["rows"] if r["sampler"] == name and r["kind"] == k and r["shape"] == s), None)
                cells.append("-" if r is None else
                             f"{r['overhead_ms_per_nfe']:.3f} ({fmt(r['ratio_to_kdiff_dpmpp_2m'], 2)})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "DPM-Solver-v3 setup (coefficient plan, first call minus a cached call, synthetic EMS with "
                  "251 nodes):", "", "| latent | EMS | setup (s) | cached 20-step run (s) |", "|---|---|---|---|"]
        for r in o["v3_setup"]:
            lines.append(f"| {r['kind']} {r['shape']} | {r['reduction']} | {r['setup_s']:.3f} | "
                         f"{r['cached_call_s']:.3f} |")
        lines.append("")
        if "sde_noise" in o:
            lines += sde_noise_table(o["sde_noise"]) + [""]
        if o.get("guard_3m"):
            lines += guard_table(o["guard_3m"]) + [""]
    if "ems" in parts:
        m = parts["ems"]
        env = m["environment"]
        lines += ["## EMS estimation cost", "", f"{m['model']}; {env['threads']} thread(s). Rows per second = JVP "
                  "rows / estimation seconds.", "",
                  "| source | N | K | reduction | x0 sampling (s) | estimation (s) | JVP rows | rows/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in m["runs"]:
            rate = r["jvp_rows"] / r["estimate_seconds"] if r["estimate_seconds"] else math.nan
            lines.append(f"| {r['source']} | {r['N']} | {r['K']} | {r['reduction']} | {fmt(r['x0_seconds'])} | "
                         f"{r['estimate_seconds']:.1f} | {r['jvp_rows']} | {rate:.0f} |")
        lines.append("")
    text = "\n".join(lines)
    path = out.parent / "results.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    update_readme(parts, out.parent.parent / "README.md")
    return path


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
README_OVERHEAD = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpm_solver_v3", "kdiff:dpmpp_2m", "kdiff:dpmpp_2m_sde",
                   "diffusers:dpmsolver++2M", "diffusers:unipc_bh2")


def update_readme(parts, readme: pathlib.Path):
    """Rewrite the README's results block (between the bench markers) from the same JSON: the embedded model's
    deterministic error tables and the main samplers' overhead.  Leaves the README alone without the markers."""
    if not readme.exists() or "embedded" not in parts:
        return
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    e = parts["embedded"]
    info = e["info"]
    deterministic = [r for r in e["rows"] if not r.get("stochastic")]
    lines = [README_START, "",
             f"Embedded eps model (1x16x16 MNIST, SD v1 schedule), batch {info['batch']}, {info['schedule']} sigmas, "
             f"seed {info['seed']}, {info['threads']} thread(s): RMS error against our DPM-Solver++(3M, Taylor form) at "
             f"{info['reference_steps']} steps from the same noise ((n) = model calls when a solver fits fewer into "
             "the budget). Full tables, Fréchet distances, stochastic samplers and the Gaussian-mixture results: "
             "[bench/results.md](bench/results.md).", ""]
    for w in info["guidance"]:
        lines += [f"**Guidance {w:g}**", ""] + error_table(deterministic, info["nfe"], "error_rms", w) + [""]
    if "overhead" in parts:
        o = parts["overhead"]
        env = o["environment"]
        shapes = list(dict.fromkeys((r["kind"], r["shape"]) for r in o["rows"]))
        lines += [f"Sampler overhead per NFE with a trivial model ({env['threads']} thread(s), batch 1, {o['steps']} "
                  "steps, best of " f"{o['repeats']}), ms and ratio to k-diffusion's `sample_dpmpp_2m` in the same run:",
                  "", "| sampler | " + " | ".join(f"{k} {s}" for k, s in shapes) + " |", "|---|" + "---|" * len(shapes)]
        for name in README_OVERHEAD:
            cells = []
            for k, sh in shapes:
                r = next((r for r in o["rows"] if r["sampler"] == name and r["kind"] == k and r["shape"] == sh), None)
                cells.append("-" if r is None else
                             f"{r['overhead_ms_per_nfe']:.3f} ({fmt(r['ratio_to_kdiff_dpmpp_2m'], 2)})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if "sde_noise" in o:
            lines += sde_noise_table(o["sde_noise"]) + [""]
        if o.get("guard_3m"):
            lines += guard_table(o["guard_3m"]) + [""]
    lines.append(README_END)
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(head + "\n".join(lines) + tail)
    os.replace(tmp, readme)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpm_solver_nodes bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--families", nargs="+", default=["ours", "k-diffusion", "diffusers"])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--demo-json", type=pathlib.Path, default=None,
                        help="embedded part: use this demo results.json instead of running the demo again")
    args = parser.parse_args(argv)
    args.families = tuple(args.families)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if not args.report_only:
        for part in args.parts:
            log.info("bench part %s", part)
            start = time.perf_counter()
            data = globals()[f"{part}_part"](args)
            data["environment"] = environment(args.threads)
            data["seconds"] = round(time.perf_counter() - start, 1)
            data["quick"] = args.quick
            write_json(args.out / f"{part}.json", data)
    path = report(args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
