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


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """Unit tests never write into the real data/cache/: every cache file goes to a temporary folder."""
    import os

    old = os.environ.get("MMBOOK_CACHE_DIR")
    os.environ["MMBOOK_CACHE_DIR"] = str(tmp_path_factory.mktemp("mmbook-cache"))
    yield
    if old is None:
        os.environ.pop("MMBOOK_CACHE_DIR", None)
    else:
        os.environ["MMBOOK_CACHE_DIR"] = old
