"""The main job: every solver of the pack and of the peers on the embedded model, against a converged reference.

    python -m dpm_solver_nodes demo [--samplers ...] [--nfe 5 6 8 10 15 20] [--schedule karras] [--guidance 1 5]
                                    [--seed 0] [--batch 100] [--model eps|flow] [--out ./demo_output] [--quick]

For each guidance scale w, NFE budget and sampler, all starting from the same noise (``--batch`` digits, labels
0..9 repeating):
- error: RMS over all pixels of the sample minus the converged reference from the same noise (our DPM-Solver++(3M),
  third-order Taylor form, with ``--reference-steps`` logSNR-uniform steps; its own error is estimated against 2M at
  twice the steps and printed).  Stochastic samplers (SDE, ancestral, DDPM) converge to a different sample; their error is shown in
  the table but left out of the plot, compare them by quality.
- quality: Fréchet distance in the shipped digit classifier's features (lower is better; ``real floor`` = the score
  of the same number of real digits) and class confidence (mean probability of the requested digit).
- time: wall seconds of the sampler call (model included).
Every solver gets the most steps whose model calls fit the NFE budget; adaptive solvers choose their own and are
listed with the calls they made.  Solvers that are not written yet (NotImplementedError), peers that are not
installed and peers that are not flow-aware (``--model flow``) are skipped with a log line.

Writes into ``--out``: results.csv, results.md, results.json, and with matplotlib error_vs_nfe.png and
samples_cfg<w>.png (a grid: one row per sampler, one column per NFE, ten digits per cell).
DPM-Solver-v3 uses the EMS shipped next to the weights (embedded/mnist16_<model>_ems_cfg<w>.safetensors) when
present, else runs with ems=None (DPM-Solver++ plus the v3 corrector, logged).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import pathlib
import time
import warnings

import torch

log = logging.getLogger("dpm_solver_nodes.demo")

DEFAULT_NFE = (5, 6, 8, 10, 15, 20)
DEFAULT_GUIDANCE = (1.0, 5.0)
QUICK_NFE = (5, 10)
SCHEDULE_CHOICES = ("karras", "exponential", "time_uniform", "logsnr_uniform")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m dpm_solver_nodes demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", nargs="+", default=None,
                        help="solver names (e.g. dpmpp_2m kdiff:dpmpp_2m) or families (ours, k-diffusion, "
                             "diffusers); default: all")
    parser.add_argument("--nfe", nargs="+", type=int, default=None, help=f"NFE budgets (default {DEFAULT_NFE})")
    parser.add_argument("--schedule", choices=SCHEDULE_CHOICES, default="karras")
    parser.add_argument("--guidance", nargs="+", type=float, default=None,
                        help=f"classifier-free guidance scales (default {DEFAULT_GUIDANCE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise and of SDE noise")
    parser.add_argument("--batch", type=int, default=None, help="samples per configuration (default 100)")
    parser.add_argument("--model", choices=("eps", "flow"), default="eps",
                        help="embedded model: eps (SD v1 schedule) or flow (rectified flow)")
    parser.add_argument("--reference-steps", type=int, default=None, help="steps of the reference (default 500)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings depend on it)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_output"), help="output folder")
    parser.add_argument("--quick", action="store_true",
                        help="CI mode: NFE 5 10, batch 20, 100-step reference (under a minute)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser


# ----------------------------------------------------------------------------------------------------------------

def ems_loader(model_kind):
    """``ems_for(model_kind, extra_args)``: the shipped EMS for the guidance scale in extra_args, or None."""
    from .embedded.model import HERE

    cache = {}

    def ems_for(kind, extra_args):
        scale = float((extra_args or {}).get("cfg_scale", 1.0))
        path = HERE / f"mnist16_{kind}_ems_cfg{scale:g}.safetensors"
        if path not in cache:
            cache[path] = None
            if path.exists():
                try:
                    from .stats.ems import load_ems

                    cache[path] = load_ems(path)
                    log.info("DPM-Solver-v3 uses the EMS in %s", path.name)
                except Exception as error:  # a broken file must not stop the demo; v3 falls back to ems=None
                    log.warning("could not load %s (%s); DPM-Solver-v3 runs with ems=None", path, error)
            else:
                log.info("no shipped EMS %s; DPM-Solver-v3 runs with ems=None (DPM-Solver++ + v3 corrector)",
                         path.name)
        return cache[path]

    return ems_for


def select_solvers(all_solvers, wanted):
    if not wanted:
        return all_solvers
    from .peers import FAMILIES

    chosen, known = [], {s.name: s for s in all_solvers}
    for name in wanted:
        if name in FAMILIES:
            chosen += [s for s in all_solvers if s.family == name and s not in chosen]
        elif name in known:
            if known[name] not in chosen:
                chosen.append(known[name])
        else:
            raise ValueError(f"unknown sampler {name!r}; available: {', '.join(known)} (or a family: "
                             f"{', '.join(FAMILIES)})")
    return chosen


def rms(a, b):
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


@torch.no_grad()
def reference(model, noise, extra_args, model_kind, sigma_min, sigma_max, steps):
    """(x0, self-check error): our 3M on ``steps`` logSNR-uniform steps; error vs 2M at 2x the steps."""
    from .samplers.sigmas import make_sigmas
    from .samplers import sample_dpmpp_2m, sample_dpmpp_3m

    def sigmas(n):
        schedule = "logsnr_uniform"
        return make_sigmas(schedule, n, model_kind, sigma_min=sigma_min, sigma_max=sigma_max)

    start = noise if model_kind == "flow" else noise * sigma_max
    x = start.double()
    args = {key: value for key, value in extra_args.items() if key != "seed"}
    best = sample_dpmpp_3m(model, x, sigmas(steps), extra_args=args, disable=True, model_kind=model_kind,
                           solver_type="taylor")          # third order: the converged reference
    check = sample_dpmpp_2m(model, x, sigmas(2 * steps), extra_args=args, disable=True, model_kind=model_kind)
    return best.float(), rms(best, check)


# ----------------------------------------------------------------------------------------------------------------

def run_demo(args):
    from tqdm.auto import tqdm

    from .peers import Unavailable, solvers
    from .samplers.sigmas import make_sigmas
    from .embedded import QualityScore, load_model

    nfes = args.nfe or (QUICK_NFE if args.quick else DEFAULT_NFE)
    guidances = args.guidance or DEFAULT_GUIDANCE
    batch = args.batch or (20 if args.quick else 100)
    reference_steps = args.reference_steps or (100 if args.quick else 500)
    if batch < 2 or min(nfes) < 1 or reference_steps < 2:
        raise ValueError("--batch must be >= 2, --nfe values >= 1 and --reference-steps >= 2")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    quality = QualityScore()
    kind = args.model
    sigma_min, sigma_max = model.sigma_min, model.sigma_max

    def sigmas_for(n):
        return make_sigmas(args.schedule, n, kind, sigma_min=sigma_min, sigma_max=sigma_max,
                           discrete=model.discrete).to(torch.float32)

    all_solvers = select_solvers(solvers(ems_for=ems_loader(kind)), args.samplers)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((batch,) + tuple(model.shape), generator=generator)
    labels = torch.arange(batch) % 10
    info = {"model": kind, "schedule": args.schedule, "batch": batch, "seed": args.seed, "threads": args.threads,
            "nfe": list(nfes), "guidance": list(guidances), "reference_steps": reference_steps,
            "real_floor": quality.real_floor(batch), "torch": torch.__version__, "references": {}}
    rows, images, references, skipped = [], {}, {}, {}
    jobs = []
    for w in guidances:
        for solver in all_solvers:
            for nfe in ([max(nfes)] if solver.adaptive else nfes):
                jobs.append((w, solver, nfe))
    log.info("%d solvers x %d NFE x %d guidance scales, batch %d, %s schedule, %s model", len(all_solvers),
             len(nfes), len(guidances), batch, args.schedule, kind)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Should have t")  # torchsde on float32 sigma ranges
        warnings.filterwarnings("ignore", category=FutureWarning)
        bar = tqdm(jobs, desc="demo", unit="run")
        for w, solver, nfe in bar:
            extra_args = {"cond": labels, "cfg_scale": w, "seed": args.seed}
            if w not in references:
                bar.set_postfix_str(f"reference cfg {w:g}")
                start = time.perf_counter()
                references[w], ref_error = reference(model, noise, extra_args, kind, sigma_min, sigma_max,
                                                     reference_steps)
                ref_fd = quality.frechet_distance(references[w].clamp(-1, 1))
                info["references"][f"{w:g}"] = {"self_check_rms": ref_error, "frechet_distance": ref_fd,
                                                "seconds": round(time.perf_counter() - start, 2)}
                log.info("reference cfg %g: RMS vs 2M at %d steps %.2e, FD %.1f", w, 2 * reference_steps,
                         ref_error, ref_fd)
                images[(w, "reference", 0)] = references[w][:10].clamp(-1, 1)
            if solver.name in skipped:
                continue
            bar.set_postfix_str(f"{solver.name} NFE {nfe} cfg {w:g}")
            try:
                solver.check(kind)
                steps, _ = solver.steps_for(nfe, sigmas_for, kind)
                start = time.perf_counter()
                with torch.no_grad():
                    out, calls, note = solver.run(model, noise, sigmas_for, extra_args, nfe, kind, steps)
                seconds = time.perf_counter() - start
            except Unavailable as error:
                skipped[solver.name] = str(error)
                log.warning("skipping %s: %s", solver.name, error)
                continue
            except Exception as error:  # report, keep going: one broken solver must not hide the others
                log.error("%s failed at NFE %d, cfg %g: %s: %s", solver.name, nfe, w, type(error).__name__, error)
                rows.append(dict(guidance=w, sampler=solver.name, family=solver.family, nfe_budget=nfe,
                                 nfe=None, steps="", stochastic=solver.stochastic, error_rms=math.nan,
                                 frechet_distance=math.nan, class_confidence=math.nan, seconds=math.nan,
                                 status=f"failed: {type(error).__name__}: {error}"))
                continue
            finite = bool(torch.isfinite(out).all())
            shown = out.float().clamp(-1, 1) if finite else None
            rows.append(dict(
                guidance=w, sampler=solver.name, family=solver.family, nfe_budget=nfe, nfe=calls, steps=note,
                stochastic=solver.stochastic, error_rms=rms(out, references[w]) if finite else math.nan,
                frechet_distance=quality.frechet_distance(shown) if finite else math.nan,
                class_confidence=quality.class_confidence(shown, labels) if finite else math.nan,
                seconds=seconds, status="ok" if finite else "non-finite output"))
            if finite:
                images[(w, solver.name, calls if solver.adaptive else nfe)] = shown[:10]
    info["skipped"] = skipped
    return rows, images, info


# ----------------------------------------------------------------------------------------------------------------

def fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_tables(rows, info):
    """One table per guidance scale: sampler x NFE cells "error / FD", plus adaptive runs and timings."""
    lines = [f"# Demo: {info['model']} model, {info['schedule']} schedule, batch {info['batch']}, seed {info['seed']}",
             "",
             f"Cells: RMS error vs the converged reference (same noise) / Fréchet distance (real-data floor at "
             f"{info['batch']} samples: {fmt(info['real_floor'])}).  * = stochastic sampler (converges to another "
             f"sample; compare its FD).  Threads: {info['threads']}, torch {info['torch']}.", ""]
    for w, ref in info["references"].items():
        lines.append(f"- reference cfg {w}: our DPM-Solver++(3M), {info['reference_steps']} logSNR-uniform steps; "
                     f"RMS vs 2M at {2 * info['reference_steps']} steps {ref['self_check_rms']:.1e}; "
                     f"FD {fmt(ref['frechet_distance'])}")
    for name, reason in info.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {reason}")
    nfes = info["nfe"]
    for w in info["guidance"]:
        sub = [r for r in rows if r["guidance"] == w]
        lines += ["", f"## Guidance {w:g}", "",
                  "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " | time/run (s) |",
                  "|---|" + "---|" * (len(nfes) + 1)]
        names = list(dict.fromkeys(r["sampler"] for r in sub))
        for name in names:
            own = [r for r in sub if r["sampler"] == name]
            star = "*" if own[0]["stochastic"] else ""
            if len(own) == 1 and own[0]["steps"] == "adaptive":
                r = own[0]
                cells = [""] * len(nfes)
                cells[-1] = f"{fmt(r['error_rms'])} / {fmt(r['frechet_distance'])} ({r['nfe']} NFE)"
            else:
                by_nfe = {r["nfe_budget"]: r for r in own}
                cells = []
                for n in nfes:
                    r = by_nfe.get(n)
                    if r is None:
                        cells.append("")
                    elif r["status"] != "ok":
                        cells.append(r["status"][:40])
                    else:
                        used = "" if r["nfe"] == n else f" ({r['nfe']})"
                        cells.append(f"{fmt(r['error_rms'])} / {fmt(r['frechet_distance'])}{used}")
            times = [r["seconds"] for r in own if not math.isnan(r["seconds"])]
            mean_time = sum(times) / len(times) if times else math.nan
            lines.append(f"| {name}{star} | " + " | ".join(cells) + f" | {fmt(mean_time, 2)} |")
    lines.append("")
    lines.append("(n) after a cell: the model calls actually used when fewer than the budget (singlestep and "
                 "two-call-per-step solvers).")
    return "\n".join(lines) + "\n"


def write_atomic(path: pathlib.Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(rows, info, out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    fields = ["guidance", "sampler", "family", "nfe_budget", "nfe", "steps", "stochastic", "error_rms",
              "frechet_distance", "class_confidence", "seconds", "status"]
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, out / "results.csv")
    table = markdown_tables(rows, info)
    write_atomic(out / "results.md", table)
    write_atomic(out / "results.json", json.dumps({"info": info, "rows": rows}, indent=1, default=str))
    return table


def write_plots(rows, images, info, out: pathlib.Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log.warning("matplotlib is not installed; no plots (pip install matplotlib)")
        return []
    written = []
    guidances = info["guidance"]
    fig, axes = plt.subplots(1, len(guidances), figsize=(7 * len(guidances), 5.5), squeeze=False)
    styles = {"ours": "-", "k-diffusion": "--", "diffusers": ":"}
    for ax, w in zip(axes[0], guidances):
        sub = [r for r in rows if r["guidance"] == w and r["status"] == "ok" and not r["stochastic"]]
        colors = plt.get_cmap("tab20").colors
        for index, name in enumerate(dict.fromkeys(r["sampler"] for r in sub)):
            own = sorted((r for r in sub if r["sampler"] == name), key=lambda r: r["nfe"])
            family = own[0]["family"]
            ax.plot([r["nfe"] for r in own], [max(r["error_rms"], 1e-8) for r in own], styles[family],
                    color=colors[index % len(colors)], marker="os^vD"[index // len(colors) % 5], ms=3, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["nfe"] for r in sub}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("NFE (model calls)")
        ax.set_ylabel("RMS error vs converged reference")
        ax.set_title(f"{info['model']} model, {info['schedule']}, guidance {w:g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out / "error_vs_nfe.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    nfes = info["nfe"]
    for w in guidances:
        names = ["reference"] + list(dict.fromkeys(r["sampler"] for r in rows if r["guidance"] == w))
        names = [n for n in names if any(key[0] == w and key[1] == n for key in images)]
        cell_h, cell_w, gap = 33, 84, 4
        canvas = torch.full((len(names) * (cell_h + gap), len(nfes) * (cell_w + gap)), 1.0)
        notes = []
        for i, name in enumerate(names):
            own = [key for key in images if key[0] == w and key[1] == name]
            for j, n in enumerate(nfes):
                if name == "reference":
                    key = own[0] if j == 0 else None
                elif (w, name, n) in images:
                    key = (w, name, n)
                else:  # adaptive solvers: the NFE they chose, in the last column
                    key = own[0] if len(own) == 1 and j == len(nfes) - 1 else None
                if key is None:
                    continue
                top, left = i * (cell_h + gap), j * (cell_w + gap)
                canvas[top:top + cell_h, left:left + cell_w] = torch.from_numpy(tile(images[key]))
                if key[2] not in (0, n):
                    notes.append((left + cell_w / 2, top + cell_h + 1, f"{key[2]} NFE"))
        height = canvas.shape[0] / 80 + 0.8
        fig, ax = plt.subplots(figsize=(canvas.shape[1] / 80 + 2.6, height))
        ax.imshow(canvas.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([j * (cell_w + gap) + cell_w / 2 for j in range(len(nfes))], [f"NFE {n}" for n in nfes],
                      fontsize=7)
        ax.xaxis.tick_top()
        labels = [f"reference ({info['reference_steps']} steps)" if n == "reference" else n for n in names]
        ax.set_yticks([i * (cell_h + gap) + cell_h / 2 for i in range(len(names))], labels, fontsize=7)
        for x, y, text in notes:
            ax.text(x, y, text, fontsize=5, ha="center", va="top", color="red")
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(length=0)
        ax.set_title(f"{info['model']} model, {info['schedule']} schedule, guidance {w:g}", fontsize=8)
        fig.tight_layout()
        path = out / f"samples_cfg{w:g}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def tile(batch, columns=5):
    """(N, 1, 16, 16) -> a (rows*16, columns*16) mosaic (padding 1 px), N <= 10."""
    n = len(batch)
    rows = math.ceil(n / columns)
    canvas = torch.full((rows * 17 - 1, columns * 17 - 1), 1.0)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * 17:r * 17 + 16, c * 17:c * 17 + 16] = batch[i, 0]
    return canvas.numpy()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    rows, images, info = run_demo(args)
    info["total_seconds"] = round(time.perf_counter() - start, 1)
    table = write_results(rows, info, args.out)
    print(table)
    if not args.no_plots:
        for path in write_plots(rows, images, info, args.out):
            log.info("wrote %s", path)
    log.info("results in %s (%.0f s)", args.out, info["total_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
