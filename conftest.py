"""Repository-wide pytest settings.

A plain `pytest` run executes every benchmark once, untimed (pytest-benchmark's
--benchmark-disable), so CI proves the suites work without spending minutes timing them;
`pytest --benchmark-only` (or --benchmark-enable) times them for real.
"""

import pytest


def pytest_configure(config):
    option = config.option
    if hasattr(option, "benchmark_disable") and not (option.benchmark_only or option.benchmark_enable):
        option.benchmark_disable = True


def pytest_benchmark_update_machine_info(config, machine_info):
    """Device and library versions, in the JSON next to pytest-benchmark's own machine info."""
    import torch

    from benchmarks.common import DEVICE
    from fasttrain.device import device_name
    from fasttrain.session import versions

    machine_info["fasttrain"] = {
        "device": device_name(DEVICE), **versions(), "cpu_threads": torch.get_num_threads(),
        "command": " ".join(["pytest", *config.invocation_params.args]),
    }


@pytest.fixture(scope="session")
def peaks():
    """The machine's measured peak TFLOP/s per precision label (the faster of a large matmul and a large
    convolution) and copy GB/s (benchmarks.common.measure_peaks)."""
    from benchmarks.common import measure_peaks

    return measure_peaks()
