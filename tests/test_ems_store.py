"""EMS files that cannot hurt, and the one store and job (stats/store.py, stats/job.py): each hostile input found on
main (4cdd6d3) is a test here: malformed metadata, a read racing a writer, a flipped bit, unbounded values, a
failed save, a symlink loop, stale temp files, bad names, and the job's interrupt / resume / cost."""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from dpm_solver_nodes.analytic.gaussian_mixture import GaussianMixture, sample_noise
from dpm_solver_nodes.samplers import sample_dpm_solver_v3, sample_dpmpp_2m
from dpm_solver_nodes.stats import (EMS, EMSJob, EMSJobInterrupted, EMSKey, EMSSettings, EMSStore, EMSStoreError,
                                    EMSTarget, ModelAccess, load_ems)
from dpm_solver_nodes.stats import ems as ems_module
from dpm_solver_nodes.stats import job as job_module

SIGMA_MIN, SIGMA_MAX = 0.03, 14.6


def _target(fingerprint="model-a", cfg=5.0, kind="eps", shape=(4, 1, 1)):
    return EMSTarget(fingerprint, kind, cfg, shape, SIGMA_MIN, SIGMA_MAX)


def _ems(fingerprint="model-a", cfg=5.0, value=0.9, N=10, rows_seed=0, decisions=None):
    key = EMSKey(_target(fingerprint, cfg), EMSSettings(N=N))
    lambdas = torch.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), N + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(rows_seed)
    shape = (N + 1, 4, 1, 1)
    return EMS(lambdas, torch.full(shape, value) + 0.01 * torch.rand(shape, generator=g), torch.zeros(shape),
               torch.zeros(shape), decisions=decisions,
               metadata={"fingerprint": fingerprint, "cfg": repr(cfg), "model_kind": "eps",
                         "cache_key": key.to_json()})


def _write_with_metadata(path, ems, **changes):
    """``ems`` saved, then its metadata edited as a hand-made or foreign file could have it (checksum kept right,
    so only the edited field is wrong)."""
    from safetensors.torch import load, save

    data = ems.to_bytes()
    tensors = load(data)
    metadata = dict(ems_module.read_header(data, "x"), **changes)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    with open(path, "wb") as handle:
        handle.write(save(tensors, metadata=metadata))
    return path


def _mixture_model():
    mixture = GaussianMixture.random(dim=4, components=3, seed=3)
    denoiser = mixture.denoiser("eps")

    def model(x, sigma, **_):
        return denoiser(x.reshape(x.shape[0], -1).double(), sigma.double()).reshape(x.shape).to(x.dtype)

    return model


SIGMAS = torch.tensor([SIGMA_MAX, 3.0, 0.8, 0.1, 0.0], dtype=torch.float64)


# ---- malformed metadata ------------------------------------------------------------------------------------------

MALFORMED = {
    "decisions_garbage": {"v3_decisions": "garbage"},
    "decisions_trailing_comma": {"v3_decisions": "5:0.5,"},
    "decisions_bad_solver": {"v3_decisions": json.dumps([[5, "euler", 0.5]])},
    "decisions_nan_ratio": {"v3_decisions": '[[5, "v3", NaN]]'},
    "cache_key_not_a_dict": {"cache_key": json.dumps([1, 2, 3])},
    "cache_key_not_json": {"cache_key": "{oops"},
    "cache_key_without_cfg": {"cache_key": "MISSING_CFG"},
    "model_kind": {"model_kind": "epsilon"},
    "cfg_text": {"cfg": "seven"},
    "N_disagrees": {"N": "99"},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_skipped_with_one_log_line_and_v3_works_for_other_models(tmp_path, caplog, case):
    changes = dict(MALFORMED[case])
    if changes.get("cache_key") == "MISSING_CFG":
        key = json.loads(_ems("model-b").metadata["cache_key"])
        del key["target"]["cfg"]
        changes["cache_key"] = json.dumps(key)
    bad = _write_with_metadata(tmp_path / "bad.safetensors", _ems("model-b"), **changes)
    with pytest.raises(ValueError, match="bad.safetensors"):  # the error names the file
        load_ems(bad)
    _ems("model-a").save(tmp_path / "good.safetensors")
    store = EMSStore([str(tmp_path)])
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        for _ in range(3):
            assert store.find("model-b", "eps", cfg=5.0) == (None, None)
            found, path = store.find("model-a", "eps", cfg=5.0)
            assert found is not None and path.endswith("good.safetensors")
    skipped = [r for r in caplog.records if "bad.safetensors" in r.getMessage()]
    assert len(skipped) == 1, [r.getMessage() for r in caplog.records]
    model = _mixture_model()
    x = sample_noise(2, (4, 1, 1), seed=1) * SIGMA_MAX
    out = sample_dpm_solver_v3(model, x, SIGMAS.float(), ems=found, disable=True)
    assert torch.isfinite(out).all()


def test_old_comma_separated_check_text_is_never_parsed(tmp_path):
    """main parsed metadata ``v3_check`` in the sampler, so "garbage" there broke every v3 run for the model."""
    path = _write_with_metadata(tmp_path / "m.safetensors", _ems(), v3_check="garbage")
    ems = load_ems(path)
    x = sample_noise(2, (4, 1, 1), seed=1) * SIGMA_MAX
    assert torch.isfinite(sample_dpm_solver_v3(_mixture_model(), x, SIGMAS.float(), ems=ems, disable=True)).all()


# ---- integrity -----------------------------------------------------------------------------------------------

def test_one_flipped_bit_in_the_tensor_data_is_rejected(tmp_path):
    path = _ems().save(tmp_path / "m.safetensors")
    data = bytearray(open(path, "rb").read())
    header = 8 + int.from_bytes(data[:8], "little")
    for position in (header, header + (len(data) - header) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="flipped.safetensors.*sha256"):
            load_ems(tmp_path / "flipped.safetensors")
    store = EMSStore([str(tmp_path)])
    os.replace(tmp_path / "flipped.safetensors", path)
    assert store.find("model-a", "eps", cfg=5.0) == (None, None)


@pytest.mark.parametrize("name, value", [("b", 1e30), ("b", -2e6), ("s", 1e5), ("l", float("inf"))])
def test_unbounded_values_are_rejected(tmp_path, name, value):
    ems = _ems()
    tensors = {"lambdas": ems.lambdas, "l": ems.l.float(), "s": ems.s.float(), "b": ems.b.float()}
    tensors[name] = tensors[name].clone()
    tensors[name][3] = value
    from safetensors.torch import save_file

    metadata = {"format": "dpm_solver_nodes.ems", "version": "2", "tensor_sha256": ems_module.tensor_digest(tensors)}
    save_file(tensors, str(tmp_path / "wild.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=f"wild.safetensors.*{name}"):
        load_ems(tmp_path / "wild.safetensors")
    with pytest.raises(ValueError, match=name):
        EMS(ems.lambdas, tensors["l"], tensors["s"], tensors["b"])


def _replacing_writer(path, seconds):
    """Alternate two different EMS at ``path`` with os.replace as fast as possible for ``seconds``."""
    versions = [_ems(value=v, rows_seed=i, cfg=c) for i, (v, c) in enumerate(((0.25, 3.0), (0.75, 9.0)))]
    data = [v.to_bytes() for v in versions]
    folder = os.path.dirname(path)
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        tmp = os.path.join(folder, f".w{i % 2}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data[i % 2])
        os.replace(tmp, path)
        i += 1


def test_reads_racing_a_writer_are_whole_files(tmp_path):
    """Each read is one open: tensors and metadata always come from the same file version (main opened the path
    twice: 89 of 12,176 reads failed, one mixed two writers' files)."""
    path = str(tmp_path / "shared.safetensors")
    _ems().save(path)
    writer = multiprocessing.get_context("fork").Process(target=_replacing_writer, args=(path, 4.0))
    writer.start()
    reads = 0
    try:
        time.sleep(0.2)
        while writer.is_alive():
            ems = load_ems(path)
            value = float(ems.l.mean())
            cfg = float(ems.metadata["cfg"])
            assert (cfg == 3.0 and 0.25 < value < 0.27) or (cfg == 9.0 and 0.75 < value < 0.77), (cfg, value)
            reads += 1
    finally:
        writer.join()
    assert writer.exitcode == 0 and reads > 100, reads


# ---- the folder: symlink loops, temp files, names ---------------------------------------------------------------

def test_symlink_loop_in_the_folder_ends(tmp_path):
    _ems().save(tmp_path / "m.safetensors")
    (tmp_path / "sub").mkdir()
    os.symlink(str(tmp_path), str(tmp_path / "sub" / "loop"))
    os.symlink(str(tmp_path / "sub"), str(tmp_path / "sub" / "self"))
    store = EMSStore([str(tmp_path)])
    result = {}
    worker = threading.Thread(target=lambda: result.update(files=store.files(),
                                                           found=store.find("model-a", "eps", cfg=5.0)))
    worker.daemon = True
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "listing the EMS folder did not finish (symlink loop)"
    assert result["files"] == [str(tmp_path / "m.safetensors")]
    assert result["found"][0] is not None


def test_temp_files_of_dead_writers_are_removed_on_next_use(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ems-{dead.pid}-0123abcd.tmp"
    stale.write_bytes(b"half a file")
    live = tmp_path / f".ems-{os.getpid()}-4567cdef.tmp"  # a writer in progress: kept
    live.write_bytes(b"being written")
    old = tmp_path / f".ems-{os.getpid()}-89abcdef.tmp"  # an hour old: gone whatever its pid
    old.write_bytes(b"forgotten")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store = EMSStore([str(tmp_path)])
    store.save(_ems(), "model")
    assert not stale.exists() and not old.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["model.safetensors"]


def test_a_failed_save_keeps_the_ems_with_a_clear_message(tmp_path, monkeypatch):
    """The folder turns unwritable during the computation (here: replaced by a file, which fails even for root):
    the job returns the EMS, saves it to the fallback folder and says where; with the fallback unwritable too, the
    EMS are still returned and the message says they are only in memory."""
    folder = tmp_path / "ems"
    monkeypatch.setattr(job_module, "FALLBACK_FOLDER", str(tmp_path / "fallback"))
    settings = EMSSettings(N=4, K=4, x0_steps=4, check_samples=0)

    def break_folder(done, total):
        if done == total and folder.is_dir():
            os.rename(folder, tmp_path / "moved")
            folder.write_text("not a folder")

    job = EMSJob(_target(), settings, batch_size=4)
    result = job.run(ModelAccess(_mixture_model()), EMSStore([str(folder)]), progress=break_folder)
    assert isinstance(result.ems, EMS) and result.source == "computed"
    assert str(folder) in result.save_error and "saved to" in result.save_error
    assert result.path.startswith(str(tmp_path / "fallback")) and load_ems(result.path).N == 4
    monkeypatch.setattr(job_module, "FALLBACK_FOLDER", str(tmp_path / "moved" / "x" / "y"))
    os.remove(folder)
    os.rename(tmp_path / "moved", folder)
    (folder / "x").write_text("blocks the fallback")
    result = job.run(ModelAccess(_mixture_model()), EMSStore([str(folder)]), progress=break_folder, recompute=True)
    assert isinstance(result.ems, EMS) and result.path is None
    assert "kept in memory" in result.save_error


def test_an_unwritable_folder_is_refused_before_computing(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    calls = []

    def model(x, sigma, **_):
        calls.append(1)
        return x

    job = EMSJob(_target(), EMSSettings(N=4, K=4, x0_steps=4), batch_size=4)
    with pytest.raises(EMSStoreError, match="cannot write EMS files to"):
        job.run(ModelAccess(model), EMSStore([str(tmp_path / "file" / "ems")]))
    assert not calls


# ---- the job -------------------------------------------------------------------------------------------------

def test_job_stores_decisions_the_sampler_follows_and_serves_them_again(tmp_path, caplog):
    model = _mixture_model()
    settings = EMSSettings(N=20, K=16, x0_steps=20, check_nfes=(4, 8))
    job = EMSJob(_target(), settings, batch_size=8)
    store = EMSStore([str(tmp_path)])
    result = job.run(ModelAccess(model), store)
    assert result.source == "computed" and result.save_error is None and os.path.isfile(result.path)
    assert [d.nfe for d in result.ems.decisions] == [4, 8]
    again = job.run(ModelAccess(model), store)
    assert again.source == "cached" and again.ems is store.find("model-a", "eps", cfg=5.0)[0]
    assert again.ems.decisions == result.ems.decisions
    sigmas = torch.tensor([SIGMA_MAX, 4.0, 1.0, 0.2, 0.0], dtype=torch.float32)
    x = sample_noise(3, (4, 1, 1), seed=2, dtype=torch.float32) * SIGMA_MAX
    decision = again.ems.decision_for(4)
    out = sample_dpm_solver_v3(model, x, sigmas, ems=again.ems, disable=True)
    two_m = sample_dpmpp_2m(model, x, sigmas, disable=True)
    assert torch.equal(out, two_m) == (decision.solver == "dpmpp_2m")


def test_job_interrupt_and_resume_give_the_uninterrupted_result(tmp_path):
    model = _mixture_model()
    settings = EMSSettings(N=6, K=8, x0_steps=6, check_samples=0)
    calls = []

    def counted(x, sigma, **kwargs):
        calls.append(x.shape[0])
        return model(x, sigma, **kwargs)

    reference = EMSJob(_target(), settings, batch_size=4).compute(ModelAccess(counted))
    uninterrupted = len(calls)
    calls.clear()
    job = EMSJob(_target(), settings, batch_size=4)
    with pytest.raises(EMSJobInterrupted) as caught:
        job.run(ModelAccess(counted), EMSStore([str(tmp_path)]), should_stop=lambda: len(calls) >= 40)
    assert caught.value.state.x0 is not None and caught.value.phase == "estimate"
    first = len(calls)
    result = job.run(ModelAccess(counted), EMSStore([str(tmp_path)]))  # resumes from the kept state
    assert torch.equal(result.ems.l, reference.l) and torch.equal(result.ems.s, reference.s)
    assert torch.equal(result.ems.b, reference.b)
    # not started over: only the estimator's 10-row timestep check runs again
    assert len(calls) <= uninterrupted + 10, (first, len(calls), uninterrupted)


def test_a_finished_job_reports_a_full_progress_bar():
    """The row count behind the progress bar is an upper bound; with the check skipped (toy settings, as in the
    browser test's EMS workflow then) the bar stopped at 846 / 1000 in a real ComfyUI.  A finished job ends at total."""
    seen = []
    settings = EMSSettings(N=2, K=2, x0_steps=2, check_samples=0)
    EMSJob(_target(), settings, batch_size=2).compute(ModelAccess(_mixture_model()),
                                                     progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and all(done <= total for done, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_settings_too_small_to_check_v3_are_refused_before_any_model_call():
    """main stored EMS that ran v3 unchecked at every NFE when N x K left no budget for the tuning or the check (up to
    1.5x DPM-Solver++(2M)'s error on the embedded models, bench/results_unchecked_ems.md).  The job now refuses such
    settings before calling the model and names the least N that works; check_samples=0 opts out on purpose."""
    calls = []

    def model(x, sigma, **kwargs):
        calls.append(len(x))
        return _mixture_model()(x, sigma, **kwargs)

    for N, K in ((20, 8), (10, 4), (2, 2)):
        settings = EMSSettings(N=N, K=K, x0_steps=2)
        with pytest.raises(ValueError, match=rf"N = {N}, K = {K} are too small to check DPM-Solver-v3") as error:
            EMSJob(_target(), settings, batch_size=2).compute(ModelAccess(model))
        assert not calls
        suggested = int(re.search(r"use N >= (\d+) at K", str(error.value)).group(1))
        assert EMSSettings(N=suggested, K=K).unverified_reason() is None           # the named N is enough ...
        assert EMSSettings(N=suggested - 1, K=K).unverified_reason() is not None   # ... and the least that is
        assert EMSSettings(N=N, K=K, check_samples=0).unverified_reason() is None
        assert EMSSettings(N=N, K=K, tune=False).unverified_reason() is not None
    with pytest.raises(ValueError, match="no NFE can be checked"):
        EMSJob(_target(), EMSSettings(N=200, K=8, check_steps=10), batch_size=2).compute(ModelAccess(model))
    assert EMSSettings().unverified_reason() is None


def test_check_cost_follows_the_settings():
    """main ran min(K, 16) x (100 + 2 sum NFE) model rows of check whatever N was; now the check never costs more
    than the estimation's model evaluations (a JVP counted as one) and shrinks with them (none for toy settings)."""
    for N, K in ((2, 2), (10, 8), (50, 8), (50, 32), (200, 64)):
        settings = EMSSettings(N=N, K=K, tune=False)
        cost = settings.cost(guided=False)
        assert cost["check"] <= settings.tuning_budget() <= cost["estimate"], (N, K, cost)
    assert EMSSettings(N=2, K=2).check_plan()[0] == 0
    assert EMSSettings(N=200, K=64).check_plan() == (16, 80, (5, 6, 8, 10, 15, 20))
    assert EMSSettings(N=20, K=16).check_plan()[0] == 3  # (21 x 16 x 2 + 10) evaluations // 208 rows per sample


def test_settings_and_target_validate_with_clear_messages():
    for bad, message in ((dict(N=1), "N must be"), (dict(K=True), "K must be"), (dict(reduction="mean"), "reduction"),
                         (dict(seed=-1), "seed"), (dict(check_nfes=(5, "6")), "check_nfes"),
                         (dict(sb_window=float("nan")), "sb_window")):
        with pytest.raises(ValueError, match=message):
            EMSSettings(**bad)
    assert EMSSettings(seed=2 ** 64 - 1).seed == 2 ** 64 - 1  # ComfyUI's largest seed
    with pytest.raises(ValueError, match="sigma_max < 1"):
        EMSTarget("f", "flow", 1.0, (16, 8, 8), 0.01, 1.0)
    key = EMSKey(_target(), EMSSettings())
    assert EMSKey.from_json(key.to_json()).digest() == key.digest()
    assert EMSKey(_target(cfg=5.0 + 1e-14), EMSSettings()).digest() == key.digest()  # 12 significant digits
    for change in (dict(cfg=6.0), dict(fingerprint="other"), dict(kind="flow")):
        target = _target(**change) if "kind" not in change else EMSTarget("model-a", "flow", 5.0, (4, 1, 1), 0.03,
                                                                          0.9)
        assert EMSKey(target, EMSSettings()).digest() != key.digest()
    assert EMSKey(_target(), EMSSettings(N=60)).digest() != key.digest()
