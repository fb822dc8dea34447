"""The thread rule of ``umilayers._threads``: what it picks and what it sets, on any machine.

No test depends on the machine's core count or on CUDA being present (``torch.cuda.is_available``
is replaced where ``auto`` is resolved), and none times anything.
"""

from __future__ import annotations

import pytest
import torch

from umilayers import _threads
from umilayers._threads import CPU_DEFAULT_THREADS, THREAD_ENV_VARS, apply_thread_policy, choose_threads


@pytest.fixture
def restore_threads():
    """Put torch's thread count back after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def clean_env(monkeypatch):
    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_default_is_one_thread(device):
    assert CPU_DEFAULT_THREADS == 1
    assert choose_threads(None, device, environ={}) == (1, "the CPU default")


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("device", [None, "auto", ""])
def test_auto_follows_cuda_availability(monkeypatch, device, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    count, reason = choose_threads(None, device, environ={})
    assert count == (None if cuda else 1)
    assert ("torch's default" in reason) == cuda


# ids avoid the bare word "cuda": conftest skips items with that keyword on a machine without a GPU
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0), "mps"],
                         ids=["gpu", "gpu1", "device", "mps"])
def test_accelerators_keep_torchs_choice(device):
    count, reason = choose_threads(None, device, environ={})
    assert count is None and str(device) in reason


@pytest.mark.parametrize("var", THREAD_ENV_VARS)
def test_environment_choice_is_kept_without_the_option(var):
    assert choose_threads(None, "cpu", environ={var: " 3 "}) == (None, f"{var}=3")
    assert choose_threads(None, "cpu", environ={var: ""}) == (1, "the CPU default")  # set but empty: unset


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu", "gpu"])
def test_explicit_count_wins_over_environment_and_device(device):
    assert choose_threads(5, device, environ={"OMP_NUM_THREADS": "2"}) == (5, "--threads 5")
    assert choose_threads(0, device, environ={})[0] is None


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (True, TypeError), (1.5, TypeError), ("2", TypeError)])
def test_bad_counts_name_the_option(bad, error):
    with pytest.raises(error, match=r"^--threads: expected an int >= 0 .*got .*" + repr(bad).strip("'")):
        choose_threads(bad, "cpu", environ={})
    with pytest.raises(error, match=r"^threads: "):
        apply_thread_policy(bad, "cpu", name="threads")


def test_environ_defaults_to_the_process_environment(monkeypatch, clean_env):
    assert choose_threads(None, "cpu") == (1, "the CPU default")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert choose_threads(None, "cpu") == (None, "OMP_NUM_THREADS=7")


def test_apply_sets_the_cpu_default(monkeypatch, clean_env, restore_threads):
    torch.set_num_threads(3)  # more than some machines have: the rule must not care
    assert apply_thread_policy(None, "cpu") == 1 == torch.get_num_threads()


def test_apply_sets_an_explicit_count(restore_threads):
    torch.set_num_threads(1)
    assert apply_thread_policy(3, "cpu") == 3 == torch.get_num_threads()


@pytest.mark.parametrize("threads, device, env",
                         [(0, "cpu", {}), (None, "cuda", {}), (None, "cpu", {"MKL_NUM_THREADS": "1"})])
def test_apply_leaves_the_count_alone(monkeypatch, clean_env, restore_threads, threads, device, env):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    torch.set_num_threads(3)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert apply_thread_policy(threads, device) == 3
    assert calls == []


def test_help_text_states_the_default():
    assert f"Default: {CPU_DEFAULT_THREADS} on the CPU" in _threads.THREADS_HELP
    assert "%" not in _threads.THREADS_HELP  # argparse would read it as a format
