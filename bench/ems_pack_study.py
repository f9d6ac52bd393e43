"""Which two pack solvers v3 may fall back to (stats.tuning.pack_candidates): DPM-Solver++(2M), (3M) and UniPC bh2
(samplers.unipc), all with their defaults, on the issue-12 study models (bench/ems_tuning_study.py) from noise of
their own (seed 777, not the study's 4242), on the tuning's spacing.  Prints error / the 2M's per NFE.

    python -m dpm_solver_nodes.bench.ems_pack_study > bench/results_ems_pack.md
"""
import torch

from .ems_tuning_study import MIXTURES, _error, embedded_case, mixture_case
from ..samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_3m
from ..samplers.unipc import sample_unipc
from ..stats.tuning import sampling_sigmas


def main():
    torch.set_num_threads(1)
    cases = [lambda m=m, g=g: mixture_case(*m, g) for m in MIXTURES for g in (1.0, 7.5)]
    cases += [lambda k=k, g=g: embedded_case(k, g) for k in ("eps", "flow") for g in (1.0, 7.5)]
    for make in cases:
        c = make()
        noise = torch.randn((c["eval"],) + c["shape"], generator=torch.Generator().manual_seed(777), dtype=c["dtype"])
        ref = c["reference"](noise)
        out = []
        for nfe in (5, 6, 8, 10, 15, 20):
            s = sampling_sigmas(nfe, c["sigma_min"], c["sigma_max"], c["kind"]).to(c["dtype"])
            x = noise * s[0]
            with torch.no_grad():
                e2 = _error(sample_dpmpp_2m(c["model"], x, s, model_kind=c["kind"], disable=True), ref)
                e3 = _error(sample_dpmpp_3m(c["model"], x, s, model_kind=c["kind"], disable=True), ref)
                eu = _error(sample_unipc(c["model"], x, s, model_kind=c["kind"], disable=True), ref)
            out.append(f"{nfe}: 3M {e3/e2:.2f} U {eu/e2:.2f}")
        print(c["name"][:24], c["cfg"], " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
