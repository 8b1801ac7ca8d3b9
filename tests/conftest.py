"""Test set-up: 8 virtual CPU devices before any JAX work, shared tolerances."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


@pytest.fixture(scope="session")
def ndev():
    n = jax.device_count()
    if n < 8:
        pytest.skip(f"needs 8 devices, have {n}")
    return n
