"""Shared fixtures. Add yours with small, targeted edits; never rewrite others' fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tinymodels
from hypothesis import settings

# Hypothesis draws the same examples on every run and machine, and keeps no example database: a
# fresh clone (CI) has none, so no test may pass or fail by what an earlier run stored. Loaded
# here, before the test modules build their own `@settings`, which inherit it.
# `HYPOTHESIS_PROFILE=explore` draws new random examples (still no database) to hunt for bugs.
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def tiny_gprl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny gated K=3 GPM (seed 0) in our gprl format."""
    return tinymodels.make_gprl_checkpoint(tmp_path_factory.mktemp("tiny_gprl"), k=3, gated=True)


@pytest.fixture(scope="session")
def tiny_released_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as `tiny_gprl_dir`, in the released CustomRewardModel format."""
    return tinymodels.make_released_checkpoint(tmp_path_factory.mktemp("tiny_rel"), k=3, gated=True)


@pytest.fixture(scope="session")
def tiny_gpm(tiny_gprl_dir: Path):
    """`tiny_gprl_dir` loaded as a `GPM` (float32, CPU). Shared: do not mutate."""
    from gpm_server.model import GPM

    return GPM.from_pretrained(tiny_gprl_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def openrlhf_cpu() -> list[str]:
    """Make the real OpenRLHF 0.11.2 importable on CPU (CUDA-only deps stubbed, see
    tests/openrlhf_stubs.py); returns the stubbed module names."""
    import openrlhf_stubs

    return openrlhf_stubs.install()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is faster, and far faster on a loaded shared machine. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
