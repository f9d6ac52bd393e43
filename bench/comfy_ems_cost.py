"""Where the EMS node's time goes inside a real ComfyUI: rows, calls and seconds per phase of ``stats.EMSJob`` through
``nodes.comfy_ems.ComfyModelAccess`` (ComfyUI's CFGGuider path), for the EMS node's settings.

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfyui/python -m dpm_solver_nodes.bench.comfy_ems_cost \\
        --checkpoint tiny_sd15.safetensors [--size 32] [--N 100] [--K 32] [--batch 0] [--jvp auto] [--threads 2]
    ... --calls                    # seconds per model call and per sample: forward, JVP, one-sided differences

Run it with ComfyUI's Python and this checkout importable as ``dpm_solver_nodes`` (e.g. a folder holding a
``dpm_solver_nodes`` symlink to the checkout on PYTHONPATH).  ``--old`` runs the job as main did before issue 14's
changes: batch 4, forward AD, the tuning run by run.  The checkpoint is loaded on the CPU; the prompt is the shipped
workflow's.  Prints one JSON line per run (settings, planned and measured rows/calls, seconds per phase, the EMS's
decisions).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PROMPTS = ("a watercolor painting of a lighthouse at dawn", "blurry, low quality")


def _load(comfyui, checkpoint, threads):
    sys.path.insert(0, comfyui)
    from comfy.cli_args import args

    args.cpu = True
    import torch

    torch.set_num_threads(threads)
    import comfy.sd

    model, clip = comfy.sd.load_checkpoint_guess_config(checkpoint)[:2]
    positive, negative = (clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in PROMPTS)
    return model, positive, negative


class _Timed:
    """The ComfyUI access with model calls, rows and seconds counted per phase."""

    def __init__(self, access, lockstep=True):
        self.access, self.network_dtype = access, access.network_dtype
        self.rows_independent = lockstep
        self.phases = {}

    def run(self, phase, work):
        entry = self.phases.setdefault(phase, {"calls": 0, "rows": 0, "seconds": 0.0, "model_seconds": 0.0})

        def timed_work(model, extra_args, device):
            def call(x, sigma, **kwargs):
                entry["calls"] += 1
                entry["rows"] += int(x.shape[0])
                started = time.perf_counter()
                try:
                    return model(x, sigma, **kwargs)
                finally:
                    entry["model_seconds"] += time.perf_counter() - started

            return work(call, extra_args, device)

        started = time.perf_counter()
        try:
            return self.access.run(phase, timed_work)
        finally:
            entry["seconds"] += time.perf_counter() - started


def run_job(model, positive, negative, args):
    from ..nodes import comfy_ems
    from ..stats.job import EMSJob, resolve_jvp
    from ..stats.settings import EMSSettings, EMSTarget

    shape = comfy_ems.latent_shape_of(model, args.size, args.size)
    jvp = "forward" if args.old else args.jvp
    settings = EMSSettings(N=args.N, K=args.K, x0_steps=args.x0_steps, jvp=jvp)
    access = comfy_ems.ComfyModelAccess(model, positive, negative, args.cfg, shape, 0, "guided")
    batch = 4 if args.old else args.batch or comfy_ems.auto_batch_size(
        model, shape, args.cfg, resolve_jvp(jvp, access.network_dtype))
    timed = _Timed(access, lockstep=not args.old)
    target = EMSTarget("bench", access.kind, args.cfg, shape, access.sigma_min, access.sigma_max)
    job = EMSJob(target, settings, batch_size=batch)
    planned = {"rows": job.plan(timed), "calls": job.calls(timed), "cost": job.cost(timed)}
    started = time.perf_counter()
    ems = job.compute(timed)
    seconds = time.perf_counter() - started
    return {"N": args.N, "K": args.K, "size": args.size, "x0_steps": args.x0_steps, "batch": batch,
            "jvp": ems.metadata.get("estimator"), "lockstep": not args.old, "threads": args.threads,
            "seconds": round(seconds, 1), "phases": {p: dict(v, seconds=round(v["seconds"], 1), model_seconds=round(v["model_seconds"], 1))
                                                     for p, v in timed.phases.items()},
            "planned": planned, "decisions": ems.decision_summary(),
            "load": os.getloadavg()}


def time_calls(model, positive, negative, args):
    """Median seconds of a forward call, a JVP and the one-sided differences' calls at several batch sizes."""
    import torch

    from ..nodes import comfy_ems

    shape = comfy_ems.latent_shape_of(model, args.size, args.size)
    access = comfy_ems.ComfyModelAccess(model, positive, negative, args.cfg, shape, 0, "guided")
    out = []

    def work(denoiser, extra_args, device):
        def f(x, s):
            return denoiser(x, s, **extra_args)

        for batch in (1, 2, 4, 8, 16, 32):
            x = torch.randn((batch,) + shape)
            sigma, probe = torch.full((batch,), 3.0), torch.randn((batch,) + shape)
            timings = {"forward": [], "jvp": []}
            for _ in range(args.repeats + 1):
                started = time.perf_counter()
                f(x, sigma)
                timings["forward"].append(time.perf_counter() - started)
                started = time.perf_counter()
                torch.func.jvp(f, (x.clone(), sigma.clone()), (probe, torch.zeros_like(sigma)))
                timings["jvp"].append(time.perf_counter() - started)
            forward, jvp = (statistics.median(v[1:]) for v in timings.values())
            out.append({"batch": batch, "forward_s": round(forward, 4), "per_sample_s": round(forward / batch, 4),
                        "jvp_over_forward": round(jvp / forward, 2)})
            print(json.dumps(out[-1]), flush=True)

    access.run("estimate", work)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--N", type=int, default=100)
    parser.add_argument("--K", type=int, default=32)
    parser.add_argument("--x0-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=0, help="0: auto (the node's default)")
    parser.add_argument("--jvp", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--old", action="store_true", help="batch 4, forward AD, tuning run by run")
    parser.add_argument("--calls", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("--comfyui or COMFYUI_DIR is needed")
    model, positive, negative = _load(args.comfyui, args.checkpoint, args.threads)
    import torch

    with torch.inference_mode():  # as ComfyUI executes nodes
        if args.calls:
            time_calls(model, positive, negative, args)
        else:
            print(json.dumps(run_job(model, positive, negative, args)), flush=True)


if __name__ == "__main__":
    main()
