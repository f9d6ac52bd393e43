"""The EMS store's key and files (stats/store.py, stats/settings.py): round trip, every key field matters, corrupt
and mismatching files never served, concurrent writers, and the weights fingerprint (every value counts, fp16 and
fp32 loads agree, stable across processes)."""
import logging
import multiprocessing
import os
import subprocess
import sys
import time

import torch

from dpm_solver_nodes.stats import EMSKey, EMSSettings, EMSStore, EMSTarget, fingerprint_state_dict, sigma_digest
from dpm_solver_nodes.stats.ems import EMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example_key(settings=None, **changes):
    args = dict(fingerprint="abc123", model_kind="eps", cfg=7.5, latent_shape=(4, 64, 64), sigma_min=0.0291675,
                sigma_max=14.614642)
    args.update(changes)
    return EMSKey(EMSTarget(**args), settings or EMSSettings(N=10))


def example_ems(value=0.5, rows=11, key=None):
    lambdas = torch.linspace(-4.0, 6.0, rows, dtype=torch.float64)
    shape = (rows, 4, 1, 1)
    l = torch.full(shape, value, dtype=torch.float64)
    s = torch.linspace(-1, 1, rows, dtype=torch.float64).reshape(rows, 1, 1, 1).expand(shape).clone()
    b = torch.zeros(shape, dtype=torch.float64)
    metadata = {"model_kind": "eps", "cfg": "7.5"}
    if key is not None:
        metadata["cache_key"] = key.to_json()
    return EMS(lambdas, l, s, b, metadata=metadata,
               standard_errors={"l": torch.full(shape, 0.01, dtype=torch.float64)})


def put(store, key, ems_value=0.5, rows=11):
    return store.save(example_ems(ems_value, rows, key), store.file_name(key))


def test_round_trip(tmp_path):
    store = EMSStore([str(tmp_path / "ems")])
    key = example_key()
    assert store.get(key) == (None, None)
    path = put(store, key)
    loaded, found = store.get(key)
    assert found == path and os.path.dirname(path) == str(tmp_path / "ems")
    assert torch.allclose(loaded.l.double(), example_ems().l) and torch.allclose(loaded.s.double(), example_ems().s)
    assert torch.equal(loaded.lambdas, example_ems().lambdas)
    assert "l" in loaded.standard_errors and loaded.metadata["cfg"] == "7.5"
    # float noise in the key (12 significant digits) maps to the same file
    assert store.get(example_key(cfg=7.5 + 1e-14))[1] == path
    assert store.files() == [path]
    assert not [n for n in os.listdir(tmp_path / "ems") if n.endswith(".tmp")]
    # a copy saved under another name (ComfyUI's save node) is found too, the job's own file first
    copy = store.save(loaded, "a_copy")
    assert store.get(key)[1] == path
    os.remove(path)
    assert store.get(key)[1] == copy


def test_every_key_field_matters(tmp_path):
    store = EMSStore([str(tmp_path)])
    put(store, example_key())
    for change in (dict(fingerprint="abc124"), dict(cfg=7.0), dict(sigma_min=0.03), dict(sigma_max=14.0),
                   dict(latent_shape=(16, 64, 64)), dict(sigma_digest="0123")):
        assert store.get(example_key(**change)) == (None, None), change
    for settings in (EMSSettings(N=11), EMSSettings(N=10, K=48), EMSSettings(N=10, guidance="uncond"),
                     EMSSettings(N=10, reduction="scalar"), EMSSettings(N=10, samples="trajectory"),
                     EMSSettings(N=10, seed=1), EMSSettings(N=10, sb_window=0.0), EMSSettings(N=10, x0_steps=20)):
        assert store.get(example_key(settings)) == (None, None), settings
    flow = EMSKey(EMSTarget("abc123", "flow", 7.5, (4, 64, 64), 0.0291675, 0.99), EMSSettings(N=10))
    assert store.get(flow) == (None, None)
    # per_channel statistics serve every resolution: only the channel count is in their key
    assert store.get(example_key(latent_shape=(4, 96, 64)))[0] is not None
    per_element = EMSSettings(N=10, reduction="per_element")
    assert example_key(per_element).digest() != example_key(per_element, latent_shape=(4, 96, 64)).digest()


def test_corrupt_or_truncated_file_is_logged_and_ignored(tmp_path, caplog):
    store = EMSStore([str(tmp_path)])
    key = example_key()
    path = put(store, key)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="dpm_solver_nodes"):
        assert store.get(key) == (None, None)
    assert any("skipping EMS file" in r.message and path in r.message for r in caplog.records)
    with open(path, "wb") as handle:
        handle.write(b"\x00" * 64)
    assert store.get(key) == (None, None)
    put(store, key)  # a fresh save replaces the broken file
    assert store.get(key)[0] is not None


def test_a_file_for_another_key_is_never_served(tmp_path):
    store = EMSStore([str(tmp_path)])
    wanted, other = example_key(), example_key(cfg=1.5)
    other_path = put(store, other, ems_value=0.25)
    os.replace(other_path, os.path.join(str(tmp_path), store.file_name(wanted) + ".safetensors"))  # files moved
    assert store.get(wanted) == (None, None)
    # a plain EMS file without a cache key is not served either
    example_ems().save(os.path.join(str(tmp_path), store.file_name(wanted) + ".safetensors"))
    assert store.get(wanted) == (None, None)


def _writer(root, value, rounds):
    store = EMSStore([root])
    for _ in range(rounds):
        put(store, example_key(), ems_value=value, rows=401)


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(tmp_path), 0.1 * (i + 1), 15)) for i in range(3)]
    for worker in workers:
        worker.start()
    store = EMSStore([str(tmp_path)])
    seen = set()
    while any(worker.is_alive() for worker in workers):
        ems = store.get(example_key())[0]  # readers never see a half-written file
        if ems is not None:
            value = float(ems.l[0, 0, 0, 0])
            assert torch.all(ems.l == ems.l.flatten()[0])
            seen.add(round(value, 3))
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    final = store.get(example_key())[0]
    assert final is not None and round(float(final.l[0, 0, 0, 0]), 3) in (0.1, 0.2, 0.3)
    assert seen <= {0.1, 0.2, 0.3}
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == [store.file_name(example_key()) +
                                                                            ".safetensors"]


def sd_sized_state_dict(count=60):
    generator = torch.Generator().manual_seed(0)
    state = {}
    for i in range(count):
        shape = (320, 320) if i % 3 == 0 else (64, 64, 3, 3) if i % 3 == 1 else (1280,)
        state[f"model.diffusion_model.block{i:03d}.weight"] = torch.randn(shape, generator=generator)
    return state


def test_fingerprint_sees_every_value_of_every_tensor():
    """main hashed every 16th tensor's first 4096 values, so a fine-tune could be served its base model's EMS."""
    state = sd_sized_state_dict()
    first = fingerprint_state_dict(state, extra=("SD15", "sigmas:abc"))
    assert fingerprint_state_dict(state, extra=("SD15", "sigmas:abc")) == first
    for index in (1, 16, 59):  # unsampled tensors on main (1, 59) and a sampled one (16)
        name = sorted(state)[index]
        changed = dict(state)
        changed[name] = state[name].clone()
        changed[name].view(-1)[-1] += 1e-2  # the last value: beyond main's first 4096
        assert fingerprint_state_dict(changed, extra=("SD15", "sigmas:abc")) != first, name
    assert fingerprint_state_dict(state, extra=("SD15", "sigmas:abd")) != first
    reshaped = dict(state)
    reshaped[sorted(state)[1]] = state[sorted(state)[1]].reshape(-1)
    assert fingerprint_state_dict(reshaped, extra=("SD15", "sigmas:abc")) != first
    swapped = dict(state)  # two values exchanged within a 4-value word: the wrapping word sum still sees it
    name = sorted(state)[0]
    swapped[name] = state[name].clone()
    swapped[name].view(-1)[[0, 1]] = state[name].view(-1)[[1, 0]]
    assert fingerprint_state_dict(swapped, extra=("SD15", "sigmas:abc")) != first
    # an fp16 load of the same weights finds the same EMS (values are rounded to float16 first)
    half = {k: v.half() for k, v in state.items()}
    assert fingerprint_state_dict(half, extra=("SD15", "sigmas:abc")) == first
    assert len(fingerprint_state_dict({k: v.bfloat16() for k, v in state.items()})) == 32


def test_cached_weights_digest_is_milliseconds_and_sees_in_place_edits():
    from dpm_solver_nodes.stats.fingerprint import CachedWeightsDigest

    state = sd_sized_state_dict()
    digest = CachedWeightsDigest()
    first = digest(state)
    started = time.perf_counter()
    assert digest(state) == first
    assert time.perf_counter() - started < 0.05  # identities and version counters only
    with torch.no_grad():
        state[sorted(state)[5]].view(-1)[-1] += 1.0
    assert digest(state) != first


def test_cached_weights_digest_on_inference_tensors():
    """ComfyUI loads weights under torch.inference_mode(): such tensors have no version counter (reading it raised
    RuntimeError in a real ComfyUI); a strided probe of their values stands in for it."""
    from dpm_solver_nodes.stats.fingerprint import CachedWeightsDigest, weights_digest

    with torch.inference_mode():
        state = {f"w{i}": torch.randn(64, 65, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    digest = CachedWeightsDigest()
    first = digest(state)
    assert first == weights_digest(state) and digest(state) == first
    with torch.inference_mode():
        state["w2"].view(-1)[0] += 1.0  # element 0 is one of the probed values
    assert digest(state) != first and digest(state) == weights_digest(state)


def test_fingerprint_and_sigma_digest_are_stable_across_processes():
    code = ("import sys, torch; sys.path.insert(0, {tests!r}); import conftest; "
            "from dpm_solver_nodes.stats import fingerprint_state_dict, sigma_digest; "
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



def test_cached_weights_digest_is_not_fooled_by_a_reused_address():
    """A checkpoint freed and another loaded in its place can get the same addresses, shapes and version counters;
    the cache must still see the new values (else the first checkpoint's EMS are served for the second).  Writing
    through ``.data`` changes the values at the same address without moving the version counter."""
    from dpm_solver_nodes.stats.fingerprint import CachedWeightsDigest, weights_digest

    state = {f"w{i}": torch.randn(64, 65, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    digest = CachedWeightsDigest()
    first = digest(state)
    identity = {name: (tensor.data_ptr(), tensor._version) for name, tensor in state.items()}
    for i, tensor in enumerate(state.values()):
        tensor.data.copy_(torch.randn(64, 65, generator=torch.Generator().manual_seed(100 + i)))
    assert identity == {name: (tensor.data_ptr(), tensor._version) for name, tensor in state.items()}
    assert digest(state) == weights_digest(state) != first
