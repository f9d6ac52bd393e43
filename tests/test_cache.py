"""The EMS cache (stats/cache.py): round trip, corrupt and mismatching files never served, concurrent writers, and the
weights fingerprint (changes with a weight, stable across processes, milliseconds for an SD-sized dict)."""
import logging
import multiprocessing
import os
import subprocess
import sys
import time

import torch

from dpm_solver_nodes.stats.cache import EMSCache, fingerprint_state_dict, make_key, sigma_digest
from dpm_solver_nodes.stats.ems import EMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example_ems(value=0.5, rows=11):
    lambdas = torch.linspace(-4.0, 6.0, rows, dtype=torch.float64)
    shape = (rows, 4, 1, 1)
    l = torch.full(shape, value, dtype=torch.float64)
    s = torch.linspace(-1, 1, rows, dtype=torch.float64).reshape(rows, 1, 1, 1).expand(shape).clone()
    b = torch.zeros(shape, dtype=torch.float64)
    return EMS(lambdas, l, s, b, metadata={"model_kind": "eps", "cfg": "7.5"},
               standard_errors={"l": torch.full(shape, 0.01, dtype=torch.float64)})


def example_key(**changes):
    args = dict(cfg=7.5, guidance="guided", reduction="per_channel", latent_shape=(4, 64, 64), N=10,
                sigma_min=0.0291675, sigma_max=14.614642, model_kind="eps")
    fingerprint = changes.pop("fingerprint", "abc123")
    args.update(changes)
    return make_key(fingerprint, **args)


def test_round_trip_and_listing(tmp_path):
    cache = EMSCache(tmp_path / "ems")
    key = example_key()
    assert cache.get(key) is None
    path = cache.put(key, example_ems())
    loaded = cache.get(key)
    assert loaded is not None and os.path.dirname(path) == str(tmp_path / "ems")
    assert torch.allclose(loaded.l.double(), example_ems().l) and torch.allclose(loaded.s.double(), example_ems().s)
    assert torch.equal(loaded.lambdas, example_ems().lambdas)
    assert "l" in loaded.standard_errors and loaded.metadata["cfg"] == "7.5"
    # float noise in the key (12 significant digits) maps to the same file
    assert cache.get(example_key(cfg=7.5 + 1e-14)) is not None
    entries = cache.entries()
    assert len(entries) == 1 and entries[0][0] == path and entries[0][1]["cfg"] == 7.5
    assert not [n for n in os.listdir(tmp_path / "ems") if n.endswith(".tmp")]


def test_every_key_field_matters(tmp_path):
    cache = EMSCache(tmp_path)
    cache.put(example_key(), example_ems())
    for change in (dict(fingerprint="abc124"), dict(cfg=7.0), dict(guidance="uncond"), dict(reduction="scalar"),
                   dict(latent_shape=(4, 96, 64)), dict(N=11), dict(sigma_min=0.03), dict(sigma_max=14.0),
                   dict(model_kind="flow"), dict(samples="trajectory"), dict(estimator_version="0")):
        assert cache.get(example_key(**change)) is None, change


def test_corrupt_or_truncated_file_is_logged_and_ignored(tmp_path, caplog):
    cache = EMSCache(tmp_path)
    key = example_key()
    path = cache.put(key, example_ems())
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        assert cache.get(key) is None
    assert any("unreadable" in r.message for r in caplog.records)
    assert cache.entries() == [] or all(p != path for p, _, _ in cache.entries())
    with open(path, "wb") as handle:
        handle.write(b"\x00" * 64)
    assert cache.get(key) is None
    cache.put(key, example_ems())  # a fresh put replaces the broken file
    assert cache.get(key) is not None


def test_a_file_for_another_key_is_never_served(tmp_path, caplog):
    cache = EMSCache(tmp_path)
    wanted, other = example_key(), example_key(cfg=1.5)
    other_path = cache.put(other, example_ems(value=0.25))
    os.replace(other_path, cache.path(wanted))  # e.g. a user copied files around
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        assert cache.get(wanted) is None
    assert any("another key" in r.message for r in caplog.records)
    # a plain EMS file without a cache key is not served either
    example_ems().save(cache.path(wanted))
    assert cache.get(wanted) is None


def _writer(root, value, rounds):
    from dpm_solver_nodes.stats.cache import EMSCache as Cache

    cache = Cache(root)
    for _ in range(rounds):
        cache.put(example_key(), example_ems(value=value, rows=401))


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(tmp_path), 0.1 * (i + 1), 15)) for i in range(3)]
    for worker in workers:
        worker.start()
    cache = EMSCache(tmp_path)
    seen = set()
    while any(worker.is_alive() for worker in workers):
        ems = cache.get(example_key())  # readers never see a half-written file
        if ems is not None:
            value = float(ems.l[0, 0, 0, 0])
            assert torch.all(ems.l == ems.l.flatten()[0])
            seen.add(round(value, 3))
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    final = cache.get(example_key())
    assert final is not None and round(float(final.l[0, 0, 0, 0]), 3) in (0.1, 0.2, 0.3)
    assert seen <= {0.1, 0.2, 0.3}
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == [os.path.basename(cache.path(example_key()))]


def sd_sized_state_dict():
    generator = torch.Generator().manual_seed(0)
    state = {}
    for i in range(200):  # ~860M values would be SD; shapes of that size, values allocated lazily via expand
        shape = (1280, 1280) if i % 3 == 0 else (320, 320, 3, 3) if i % 3 == 1 else (1280,)
        base = torch.randn(4096 + 7, generator=generator)
        numel = torch.Size(shape).numel()
        state[f"model.diffusion_model.block{i:03d}.weight"] = base.repeat(numel // base.numel() + 1)[:numel].reshape(
            shape)
    return state


def test_fingerprint_changes_with_a_weight_and_is_fast():
    state = sd_sized_state_dict()
    start = time.perf_counter()
    first = fingerprint_state_dict(state, extra=("SD15", "sigmas:abc"))
    elapsed = time.perf_counter() - start
    assert elapsed < 0.05, elapsed  # milliseconds: only shapes and ~13 x 4096 values are read
    assert fingerprint_state_dict(state, extra=("SD15", "sigmas:abc")) == first
    changed = dict(state)
    name = sorted(state)[16]  # a sampled tensor
    changed[name] = state[name].clone()
    changed[name].view(-1)[100] += 1e-3
    assert fingerprint_state_dict(changed, extra=("SD15", "sigmas:abc")) != first
    assert fingerprint_state_dict(state, extra=("SD15", "sigmas:abd")) != first
    reshaped = dict(state)
    reshaped[sorted(state)[1]] = state[sorted(state)[1]].reshape(-1)  # an unsampled tensor: its shape still counts
    assert fingerprint_state_dict(reshaped, extra=("SD15", "sigmas:abc")) != first
    half = {k: v.half() for k, v in list(state.items())[:20]}
    assert fingerprint_state_dict(half) != fingerprint_state_dict({k: v for k, v in list(state.items())[:20]})
    bf16 = {k: v.bfloat16() for k, v in list(state.items())[:20]}
    assert len(fingerprint_state_dict(bf16)) == 32


def test_fingerprint_and_sigma_digest_are_stable_across_processes():
    code = ("import sys, torch; sys.path.insert(0, {tests!r}); import conftest; "
            "from dpm_solver_nodes.stats.cache import fingerprint_state_dict, sigma_digest; "
            "g = torch.Generator().manual_seed(3); "
            "state = {{f'w{{i}}': torch.randn(64, 65, generator=g) for i in range(40)}}; "
            "print(fingerprint_state_dict(state, extra=('x',)), sigma_digest(torch.linspace(14.6, 0.03, 1000)))")
    code = code.format(tests=os.path.join(ROOT, "tests"))
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONHASHSEED="7")).stdout}
    g = torch.Generator().manual_seed(3)
    state = {f"w{i}": torch.randn(64, 65, generator=g) for i in range(40)}
    here = f"{fingerprint_state_dict(state, extra=('x',))} {sigma_digest(torch.linspace(14.6, 0.03, 1000))}\n"
    assert outputs == {here}
    # the sigma digest sees a shifted schedule but not the dtype it arrives in
    sigmas = torch.linspace(14.6, 0.03, 1000)
    assert sigma_digest(sigmas) == sigma_digest(sigmas.double())
    assert sigma_digest(sigmas) != sigma_digest(sigmas * 1.0001)
