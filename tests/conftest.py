"""Tests run on the CPU (the C++ kernels and a float32 reference without TF32),
except those marked `gpu`, which pick their devices themselves."""

import jax
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a GPU; skipped where there is none")


@pytest.fixture(autouse=True)
def _default_device_cpu(request):
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield
