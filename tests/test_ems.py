"""The EMS object and its files: round trip, validation, corrupt files, concurrent writers, official npz import."""
import logging
import math
import multiprocessing
import os

import numpy as np
import pytest
import torch

from dpm_solver_nodes.stats import EMS, import_official_ems, load_ems
from dpm_solver_nodes.stats import ems as ems_module

SD_SIGMA_MIN, SD_SIGMA_MAX = 0.0291672, 14.614641


def make_ems(N=8, shape=(4, 3, 3), seed=0, metadata=None, standard_errors=False):
    g = torch.Generator().manual_seed(seed)
    lambdas = torch.linspace(-math.log(SD_SIGMA_MAX), -math.log(SD_SIGMA_MIN), N + 1, dtype=torch.float64)
    l, s, b = (torch.rand((N + 1, *shape), generator=g, dtype=torch.float64) for _ in range(3))
    errors = {"l": torch.full((N + 1, *shape), 0.01)} if standard_errors else None
    meta = {"model_kind": "eps", "cfg": 7.5, "fingerprint": "abc123", "K": 64}
    meta.update(metadata or {})
    return EMS(lambdas, l, s, b, metadata=meta, standard_errors=errors)


def test_round_trip_keeps_values_metadata_and_errors(tmp_path):
    ems = make_ems(standard_errors=True)
    path = tmp_path / "stats.safetensors"
    ems.save(path, dtype=torch.float64)
    back = load_ems(path)
    assert torch.equal(back.lambdas, ems.lambdas)
    for name in ("l", "s", "b"):
        assert torch.equal(getattr(back, name), getattr(ems, name))
    assert torch.allclose(back.standard_errors["l"], ems.standard_errors["l"].double())
    assert back.metadata["format"] == "dpm_solver_nodes.ems" and back.metadata["version"] == "2"
    assert back.metadata["cfg"] == "7.5" and back.metadata["fingerprint"] == "abc123"
    assert back.N == 8 and back.reduction == "per_element" and back.model_kind == "eps"
    assert math.isclose(back.sigma_max, SD_SIGMA_MAX, rel_tol=1e-12)
    assert math.isclose(back.sigma_min, SD_SIGMA_MIN, rel_tol=1e-12)
    # default float32 storage: lambdas stay float64, statistics within float32 rounding
    ems.save(path)
    small = load_ems(path)
    assert small.l.dtype == torch.float32 and small.lambdas.dtype == torch.float64
    assert torch.allclose(small.l.double(), ems.l, atol=1e-7)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_reductions_and_flow_sigmas():
    assert make_ems(shape=(4, 1, 1)).reduction == "per_channel"
    assert make_ems(shape=(1, 1, 1)).reduction == "scalar"
    flow = make_ems(metadata={"model_kind": "flow"})
    # VE lambda -log(sigma~) with sigma~ = sigma / (1 - sigma): sigma = sigma~ / (1 + sigma~)
    assert math.isclose(flow.sigma_max, SD_SIGMA_MAX / (1 + SD_SIGMA_MAX), rel_tol=1e-12)
    deg = EMS.degenerate(torch.linspace(-3, 3, 5), channels=4)
    assert deg.stat_shape == (4, 1, 1) and torch.all(deg.l == 1) and torch.all(deg.s == 0) and torch.all(deg.b == 0)


def test_constructor_rejects_bad_arrays():
    lam = torch.linspace(-2, 2, 5, dtype=torch.float64)
    good = torch.zeros(5, 1, 1, 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        EMS(lam.flip(0), good, good, good)
    with pytest.raises(ValueError, match="rows"):
        EMS(lam, torch.zeros(4, 1, 1, 1), good, good)
    with pytest.raises(ValueError, match="shapes differ"):
        EMS(lam, good, torch.zeros(5, 2, 1, 1), good)
    bad = good.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        EMS(lam, good, bad, good)


def test_expectations_name_the_key_and_both_values(tmp_path):
    path = tmp_path / "stats.safetensors"
    make_ems().save(path)
    load_ems(path, expect={"channels": 4, "model_kind": "eps", "fingerprint": "abc123", "cfg": 7.5})
    with pytest.raises(ValueError, match=r"channels mismatch: expected 16, the file has 4"):
        load_ems(path, expect={"channels": 16})
    with pytest.raises(ValueError, match=r"model_kind mismatch: expected 'flow', the file has 'eps'"):
        load_ems(path, expect={"model_kind": "flow"})
    with pytest.raises(ValueError, match=r"fingerprint mismatch: expected 'other', the file has 'abc123'"):
        load_ems(path, expect={"fingerprint": "other"})
    with pytest.raises(ValueError, match=r"cfg mismatch"):
        load_ems(path, expect={"cfg": 1.5})
    with pytest.raises(ValueError, match=r"guidance mismatch: expected 'uncond', the file has None"):
        load_ems(path, expect={"guidance": "uncond"})
    # the lambda range: EDM's sigma_max 80 is not SD's 14.6
    with pytest.raises(ValueError, match=r"sigma_max mismatch: expected 80.0"):
        load_ems(path, expect={"sigma_max": 80.0})
    load_ems(path, expect={"sigma_max": SD_SIGMA_MAX, "sigma_min": SD_SIGMA_MIN})


def _write_raw(path, tensors, metadata):
    """A file as another writer could make it: the checksum is right unless ``metadata`` gives one."""
    from safetensors.torch import save_file

    metadata = {"tensor_sha256": ems_module.tensor_digest(tensors), **metadata}
    save_file(tensors, str(path), metadata=metadata)


def test_load_rejects_invalid_files(tmp_path):
    ems = make_ems()
    lam = ems.lambdas
    base = {"lambdas": lam, "l": ems.l.float(), "s": ems.s.float(), "b": ems.b.float()}
    meta = {"format": "dpm_solver_nodes.ems", "version": "2"}
    cases = [
        ("nan", dict(base, s=torch.where(ems.s > 0.5, float("nan"), ems.s).float()), meta, "NaN"),
        ("order", dict(base, lambdas=lam.flip(0)), meta, "strictly increasing"),
        ("format", base, {"format": "something.else", "version": "2"}, "not a dpm_solver_nodes.ems file"),
        ("version1", base, {"format": "dpm_solver_nodes.ems", "version": "1"}, "no checksum"),
        ("version", base, {"format": "dpm_solver_nodes.ems", "version": "99"}, "version '99'"),
        ("missing", {k: v for k, v in base.items() if k != "b"}, meta, r"lacks the tensors \['b'\]"),
        ("rows", dict(base, l=ems.l[:-1].float()), meta, "rows"),
        ("N", base, dict(meta, N="3"), "metadata N = 3"),
        ("reduction", base, dict(meta, reduction="scalar"), "metadata reduction"),
    ]
    for name, tensors, metadata, message in cases:
        path = tmp_path / f"{name}.safetensors"
        _write_raw(path, tensors, metadata)
        with pytest.raises(ValueError, match=message):
            load_ems(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_ems(tmp_path / "absent.safetensors")


def test_corrupt_and_truncated_files_raise_value_error(tmp_path):
    path = tmp_path / "good.safetensors"
    make_ems().save(path)
    data = path.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("header_only", data[:20]),
                          ("garbage", b"\x00\xff" * 200), ("empty", b"")):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="corrupt or truncated"):
            load_ems(bad)


def test_for_latent_shapes_and_fallback(caplog):
    ems = make_ems(shape=(4, 3, 3))
    l, s, b = ems.for_latent((2, 4, 3, 3))
    assert l.shape == (9, 4, 3, 3) and torch.equal(l, ems.l)
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        l2, _, _ = ems.for_latent((2, 4, 5, 7))
        ems.for_latent((1, 4, 5, 7))
    assert l2.shape == (9, 4, 1, 1)
    assert torch.allclose(l2[:, :, 0, 0], ems.l.mean((2, 3)))
    assert len([r for r in caplog.records if "per-channel means" in r.getMessage()]) == 1
    with pytest.raises(ValueError, match="4 channels.*16 channels"):
        ems.for_latent((1, 16, 3, 3))
    video = make_ems(shape=(4, 1, 1)).for_latent((1, 4, 2, 5, 5))[0]
    assert video.shape == (9, 4, 1, 1, 1)
    scalar = make_ems(shape=(1, 1, 1)).for_latent((1, 16, 8, 8))[0]
    assert scalar.shape == (9, 1, 1, 1)


def _writer(path, seed, repeats):
    ems = make_ems(shape=(4, 16, 16), N=30, seed=seed)
    for _ in range(repeats):
        ems.save(path)


def test_two_concurrent_writers_leave_one_complete_file(tmp_path):
    path = str(tmp_path / "shared.safetensors")
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_writer, args=(path, seed, 15)) for seed in (1, 2)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers):
        if os.path.exists(path):
            load_ems(path)  # never half-written while both are writing
            reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    final = load_ems(path)
    candidates = [make_ems(shape=(4, 16, 16), N=30, seed=seed).l.float() for seed in (1, 2)]
    assert any(torch.equal(final.l, c) for c in candidates)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _official_folder(root, name, N=10, shape=(4, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir()
    l, s, b = (rng.random((N + 1, *shape)) for _ in range(3))
    np.savez(folder / "l.npz", l=l)
    np.savez(folder / "sb.npz", s=s, b=b)
    return folder, l, s, b


def test_import_official_sd_and_edm(tmp_path):
    folder, l, s, b = _official_folder(tmp_path, "7.5_10_16")
    ems = import_official_ems(folder)
    assert ems.N == 10 and ems.metadata["cfg"] == "7.5" and ems.metadata["K"] == "16"
    assert ems.reduction == "per_element" and ems.model_kind == "eps"
    assert torch.equal(ems.l, torch.from_numpy(l)) and torch.equal(ems.b, torch.from_numpy(b))
    # SD-1.x: t 1 -> 1e-3 is sigma 14.614641 -> 0.0291672, uniform in lambda, row 0 the noisiest
    assert math.isclose(ems.lambdas[0].item(), -math.log(14.614641), abs_tol=1e-6)
    assert math.isclose(ems.lambdas[-1].item(), -math.log(0.0291672), abs_tol=1e-5)
    steps = ems.lambdas.diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-12)
    via_loader = load_ems(folder, expect={"cfg": 7.5, "channels": 4})
    assert torch.equal(via_loader.s, ems.s)

    edm, *_ = _official_folder(tmp_path, "0.002_80.0_10_32", shape=(3, 4, 4))
    ems = import_official_ems(edm, model="edm")
    assert math.isclose(ems.sigma_max, 80.0, rel_tol=1e-12) and math.isclose(ems.sigma_min, 0.002, rel_tol=1e-12)
    assert ems.metadata["N"] == "10" and ems.metadata["K"] == "32"

    # ScoreSDE VP-linear: log alpha(1) = -(20 - 0.1)/4 - 0.1/2 = -5.025, sigma = sqrt(e^{10.05} - 1)
    sde, *_ = _official_folder(tmp_path, "0.001_10_8", shape=(3, 4, 4))
    ems = import_official_ems(sde, model="scoresde")
    assert math.isclose(ems.sigma_max, math.sqrt(math.expm1(10.05)), rel_tol=1e-9)


def test_import_official_errors(tmp_path):
    odd, *_ = _official_folder(tmp_path, "my_stats")
    with pytest.raises(ValueError, match="pass sigma_min and sigma_max"):
        import_official_ems(odd)
    ems = import_official_ems(odd, sigma_min=0.002, sigma_max=80.0)
    assert math.isclose(ems.sigma_max, 80.0, rel_tol=1e-12)
    wrong_n, *_ = _official_folder(tmp_path, "7.5_250_1024", N=10)
    with pytest.raises(ValueError, match="N = 250"):
        import_official_ems(wrong_n)
    with pytest.raises(ValueError, match="model must be one of"):
        import_official_ems(wrong_n, model="dalle")
    pickled = tmp_path / "1.5_10_16"
    pickled.mkdir()
    np.savez(pickled / "l.npz", l=np.array([{"evil": 1}], dtype=object))
    np.savez(pickled / "sb.npz", s=np.zeros((11, 4, 8, 8)), b=np.zeros((11, 4, 8, 8)))
    with pytest.raises(ValueError):
        import_official_ems(pickled)
    missing = tmp_path / "1.5_10_8"
    missing.mkdir()
    np.savez(missing / "l.npz", l=np.zeros((11, 4, 8, 8)))
    with pytest.raises(ValueError, match="lacks sb.npz"):
        import_official_ems(missing)
    bad = tmp_path / "2.0_10_8"
    bad.mkdir()
    np.savez(bad / "l.npz", l=np.full((11, 4, 8, 8), np.nan))
    np.savez(bad / "sb.npz", s=np.zeros((11, 4, 8, 8)), b=np.zeros((11, 4, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        import_official_ems(bad)


def test_module_exports():
    assert ems_module.FORMAT == "dpm_solver_nodes.ems"
