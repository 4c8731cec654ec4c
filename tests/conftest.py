"""Shared fixtures for the unit tests."""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")  # unit tests draw off-screen; notebooks keep their inline backend


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (the models are tiny: threads only add overhead), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
