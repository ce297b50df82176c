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
def kernel_family(request, monkeypatch):
    """Runs a GPU test once per CUDA kernel family: the device's own (Hopper on
    sm_90) and the portable one (JAX_MSA_KERNELS=portable, kernel_family.h)."""
    monkeypatch.setenv("JAX_MSA_KERNELS", request.param)
    return request.param
