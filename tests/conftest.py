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


@pytest.fixture(params=["native", "portable"])
def family(request, monkeypatch):
    """The kernel family a GPU test runs (kernels/cuda/kernel_family.h): the
    card's own, or the portable one (JAX_MSA_KERNELS=portable, which the FFI
    handlers read at every call and child processes inherit)."""
    monkeypatch.setenv("JAX_MSA_KERNELS", request.param)
    return request.param
