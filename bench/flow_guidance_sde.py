"""3M SDE measurement (bench/results_flow_guidance.md): strong error of ``sample_dpmpp_3m_sde``, official vs taylor,
guard on/off, and of ``sample_dpmpp_2m_sde`` (midpoint), against a 1920-step Taylor-2M SDE solution on the same exact
Brownian path.  Prints markdown rows: kind and guidance, steps, 2M, 3M official, 3M taylor, their ratios to the 2M,
the 3M without the guard (official, taylor).

    python bench/flow_guidance_sde.py [CHECKOUT]
"""
import importlib.util
import math
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FINE = 1920


class BrownianPath:
    """An exact Brownian path in time sigma on a fine grid; coarse runs use sub-grids, so all see one path."""

    def __init__(self, grid, shape, seed):
        self.grid = grid.tolist()
        self.index = {v: j for j, v in enumerate(self.grid)}
        steps = torch.randn(len(grid) - 1, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        increments = steps * (grid[:-1] - grid[1:]).sqrt().view(-1, *[1] * len(shape))
        self.w = torch.cat([torch.zeros(1, *shape, dtype=torch.float64), increments.cumsum(0)])

    def __call__(self, sigma, sigma_next):
        i, j = self.index[float(sigma)], self.index[float(sigma_next)]
        return (self.w[j] - self.w[i]) / math.sqrt(abs(self.grid[j] - self.grid[i]))


def main():
    root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT  # another checkout: the "before" numbers
    spec = importlib.util.spec_from_file_location("dpm_solver_nodes", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dpm_solver_nodes"] = module
    spec.loader.exec_module(module)
    from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, GuidedGaussianMixture, sample_noise
    from dpm_solver_nodes.samplers import sde

    torch.set_num_threads(1)
    steps = (8, 10, 15, 20, 30, 40)
    for kind in ("eps", "flow"):
        if kind == "eps":
            grid = torch.linspace(math.log(14.6), math.log(0.03), FINE + 1, dtype=torch.float64).exp()
        else:
            lam = torch.linspace(math.log(0.001 / 0.999), math.log(0.97 / 0.03), FINE + 1, dtype=torch.float64)
            grid = torch.sigmoid(-lam)
        for w in (1.0, 5.0):
            errors = {}
            for seed in (0, 1):
                mixture = GaussianMixture.random(dim=16, components=8, seed=seed, spread=1.0)
                model = GuidedGaussianMixture(mixture, [0, 1], scale=w).denoiser(kind)
                x = sample_noise(64, (16,), seed=seed) * float(grid[0])
                path = BrownianPath(grid, (64, 16), seed + 10)
                ref = sde.sample_dpmpp_2m_sde(model, x, grid, model_kind=kind, noise_sampler=path, solver_type="heun",
                                              lower_order_final=False, disable=True)
                for n in steps:
                    y = sde.sample_dpmpp_2m_sde(model, x, grid[::FINE // n], model_kind=kind, noise_sampler=path,
                                                disable=True)
                    errors.setdefault((n, "2m", True), []).append((y - ref).pow(2).mean(1).median().item())
                    for solver_type in ("official", "taylor"):
                        for guard in (True, False):
                            y = sde.sample_dpmpp_3m_sde(model, x, grid[::FINE // n], model_kind=kind,
                                                        noise_sampler=path, solver_type=solver_type, guard=guard,
                                                        disable=True)
                            mse = (y - ref).pow(2).mean(1).median().item()
                            errors.setdefault((n, solver_type, guard), []).append(mse)
            for n in steps:
                mean = {key: sum(v) / len(v) for key, v in errors.items() if key[0] == n}
                print("| %s %g | %d | %.3g | %.3g | %.3g | %.2f | %.2f | %.3g | %.3g |" % (
                    kind, w, n, mean[n, "2m", True], mean[n, "official", True], mean[n, "taylor", True],
                    mean[n, "official", True] / mean[n, "2m", True], mean[n, "taylor", True] / mean[n, "2m", True],
                    mean[n, "official", False], mean[n, "taylor", False]), flush=True)


if __name__ == "__main__":
    main()
