"""The main job (``python -m dpm_solver_nodes demo``) end to end in its --quick mode, and its schedules."""
import csv
import importlib.util
import math

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
