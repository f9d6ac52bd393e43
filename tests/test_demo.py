"""The main job (``python -m dpm_solver_nodes demo``) end to end in its --quick mode, and its schedules."""
import csv
import importlib.util
import math
import pathlib

import pytest
import torch

from dpm_solver_nodes import demo
from dpm_solver_nodes.__main__ import main as package_main
from dpm_solver_nodes.embedded.model import DiscreteVPSchedule
from dpm_solver_nodes.samplers.sigmas import SCHEDULES, make_sigmas

HAVE_KDIFF = importlib.util.find_spec("k_diffusion") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    samplers = ["dpmpp_2m", "dpmpp_3m", "ddim", "dpm_solver_v3", "dpmpp_2m_sde"]
    if HAVE_KDIFF:
        samplers += ["kdiff:dpmpp_2m"]
    code = package_main(["demo", "--quick", "--out", str(out), "--samplers", *samplers])
    assert code == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return out, rows


def test_quick_demo_writes_table_and_plots(quick_run):
    out, rows = quick_run
    assert {r["sampler"] for r in rows} >= {"dpmpp_2m", "dpmpp_3m", "ddim", "dpm_solver_v3", "dpmpp_2m_sde"}
    assert {float(r["guidance"]) for r in rows} == {1.0, 5.0}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows)
    for r in ok:
        assert int(r["nfe"]) <= int(r["nfe_budget"])
        assert math.isfinite(float(r["error_rms"])) and float(r["frechet_distance"]) > 0
    markdown = (out / "results.md").read_text()
    assert "## Guidance 5" in markdown and "dpmpp_2m" in markdown and "NFE 10" in markdown
    assert (out / "results.json").exists()
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("error_vs_nfe.png", "samples_cfg1.png", "samples_cfg5.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_demo_errors_shrink_with_nfe_and_match_the_peer(quick_run):
    _, rows = quick_run
    error = {(r["sampler"], float(r["guidance"]), int(r["nfe_budget"])): float(r["error_rms"]) for r in rows}
    for w in (1.0, 5.0):
        for name in ("dpmpp_2m", "dpmpp_3m", "ddim"):
            assert error[(name, w, 10)] < error[(name, w, 5)], (name, w)
        if HAVE_KDIFF:  # same sigmas, same noise: DPM-Solver++(2M) is k-diffusion's sample_dpmpp_2m
            for n in (5, 10):
                assert error[("dpmpp_2m", w, n)] == pytest.approx(error[("kdiff:dpmpp_2m", w, n)], rel=1e-3)


def test_demo_rejects_unknown_sampler(tmp_path):
    with pytest.raises(ValueError, match="unknown sampler"):
        demo.main(["--quick", "--out", str(tmp_path), "--samplers", "no_such_sampler"])


def test_package_entry_point_usage():
    assert package_main([]) == 2
    with pytest.raises(SystemExit) as exit_info:
        package_main(["demo", "--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_schedules_span_the_model_range(schedule, kind):
    sigma_min, sigma_max = (0.0292, 14.6) if kind == "eps" else (1e-3, 1.0)
    discrete = DiscreteVPSchedule() if kind == "eps" else None
    for n in (1, 2, 5, 20):
        s = make_sigmas(schedule, n, kind, sigma_min=sigma_min, sigma_max=sigma_max, discrete=discrete)
        assert len(s) == n + 1 and s[-1] == 0
        assert s[0].item() == pytest.approx(sigma_max)
        if n > 1:
            assert s[-2].item() == pytest.approx(sigma_min, rel=1e-6)
        assert (s[1:] < s[:-1]).all()
    if schedule == "time_uniform" and kind == "eps":  # uniform in the SD v1 timestep
        t = discrete.sigma_to_t(make_sigmas(schedule, 11, kind, sigma_min=sigma_min, sigma_max=sigma_max,
                                            discrete=discrete)[:-1])
        torch.testing.assert_close(t[:-1] - t[1:], torch.full((10,), (t[0] - t[-1]).item() / 10,
                                                              dtype=torch.float64))


# ---- layering of the top floor -----------------------------------------------------------------------------------

TOP_FLOOR = ("demo", "peers", "bench", "__main__")


def _imports(path, module):
    """The package modules (dotted, without ``dpm_solver_nodes.``) that ``path`` imports, at any depth in the file."""
    import ast

    package = [part for part in (module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")) if part]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("dpm_solver_nodes"):
                base = node.module.split(".")[1:]
            else:
                continue
            found.add(".".join(base))
            found.update(".".join(base + [alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(".".join(alias.name.split(".")[1:]) for alias in node.names
                         if alias.name.startswith("dpm_solver_nodes."))
    return {name for name in found if name}


def _package_modules(root):
    import os

    for folder, subfolders, names in os.walk(root):
        if folder == str(root):  # not the package: tests, workflows; never walk into virtual environments
            subfolders[:] = [name for name in subfolders if name not in ("tests", "workflows", "venv")]
        subfolders[:] = sorted(name for name in subfolders if not name.startswith((".", "__")))
        for name in sorted(names):
            if name.endswith(".py"):
                path = pathlib.Path(folder) / name
                parts = path.relative_to(root).with_suffix("").parts
                yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_top_floor_layering():
    """Only the top floor (demo, peers, bench) imports the top floor; peers imports neither demo nor bench; the demo
    and the benchmark share the registry in ``peers`` and only ``bench.run`` runs the demo, so no cycle."""
    root = pathlib.Path(demo.__file__).resolve().parent
    graph = {module: _imports(path, module) for path, module in _package_modules(root)}
    assert {"demo", "peers", "bench.run"} <= set(graph)

    def top(name):
        return name.split(".")[0] in TOP_FLOOR

    for module, imported in graph.items():
        if not top(module):
            assert not {name for name in imported if top(name)}, module
    assert not {name for name in graph["peers"] if name.split(".")[0] in ("demo", "bench")}
    assert "peers" in graph["demo"] and "peers" in graph["bench.run"] and "demo" in graph["bench.run"]
    assert not {name for name in graph["demo"] if name.startswith("bench")}  # sigma builders: samplers/sigmas.py
    tests = root / "tests"
    for path in tests.glob("*.py"):
        imported = _imports(path, "tests." + path.stem)
        assert not {name for name in imported if name.startswith("bench")}, path.name
