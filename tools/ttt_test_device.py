"""The device switch of every package's tests: ``TTT_TEST_DEVICE=cuda`` runs them on the GPU.

Each package's ``tests/conftest.py`` imports the hooks and fixtures below (one place for the rule).

- ``TTT_TEST_DEVICE`` unset or ``cpu``: nothing changes (the CI run).
- ``TTT_TEST_DEVICE=cuda``: every test runs under :class:`TestDevice`, which makes CUDA the default
  device of tensor factories (``torch.set_default_device`` semantics). A factory given a CPU
  ``torch.Generator`` draws on the CPU and moves the result, so a test sees the same numbers on
  both devices and references built from them (fp64 on the device) stay valid. TF32 is pinned off
  (fp32 matmuls and convolutions in full precision) for the whole session.
- Tests that only make sense on the CPU are skipped with their reason: a module listed in the
  conftest's ``CPU_ONLY`` (file name -> reason), or a test marked ``@pytest.mark.cpu_only(reason)``.
- No CUDA device: every test is skipped with the reason, or fails when ``TTT_REQUIRE_GPU=1``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._device import DeviceContext, _device_constructors

ENV = "TTT_TEST_DEVICE"
DEVICE = os.environ.get(ENV, "cpu").strip().lower() or "cpu"
REQUIRE_GPU = os.environ.get("TTT_REQUIRE_GPU", "0") == "1"
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"{ENV} must be 'cpu' or 'cuda', got {DEVICE!r}")

# What a conftest takes with `from ttt_test_device import *`: the hooks and the autouse fixture.
__all__ = ["pytest_collection_modifyitems", "pytest_configure", "ttt_test_device"]


def device_skip_reason() -> str | None:
    """None when the tests can run on ``DEVICE``, else why not."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return f"{ENV}=cuda but no CUDA device is available (torch.cuda.is_available() is False)"
    return None


def pin_full_fp32() -> None:
    """fp32 matmuls and cuDNN convolutions in full precision (no TF32) for every test."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


class TestDevice(DeviceContext):
    """``torch.set_default_device(device)`` for the duration of a test, except that a factory call
    with a CPU generator draws on the CPU (the same numbers as a CPU run) and moves the result."""

    __test__ = False  # a helper, not a test class

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        on_cpu = gen is not None and gen.device.type == "cpu" and kwargs.get("device") is None
        if on_cpu and func in _device_constructors():
            requires_grad = kwargs.pop("requires_grad", False)
            out = func(*args, **kwargs).to(self.device)
            return out.requires_grad_(requires_grad)
        return super().__torch_function__(func, types, args, kwargs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"cpu_only(reason): the test only makes sense on the CPU; skipped under {ENV}=cuda",
    )
    pin_full_fp32()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under the switch, skip the CPU-only tests with their reason (the no-device skip or failure
    is the fixture's). Every package conftest imports this hook: deciding twice changes nothing."""
    if DEVICE == "cpu":
        return
    for item in items:
        why = cpu_only_reason(item)
        if why is not None and not any(m.name == "skip" for m in item.iter_markers()):
            item.add_marker(pytest.mark.skip(reason=f"CPU only (under {ENV}=cuda): {why}"))


def cpu_only_reason(item: pytest.Item) -> str | None:
    """The test's ``cpu_only`` marker reason, or its module's entry in the ``CPU_ONLY`` table of
    the conftest.py of its directory; None when the test runs on the device."""
    marker = item.get_closest_marker("cpu_only")
    if marker is not None:
        return marker.args[0] if marker.args else marker.kwargs.get("reason", "marked cpu_only")
    for plugin in item.config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None) or ""
        here = os.path.dirname(path) + os.sep
        if os.path.basename(path) == "conftest.py" and str(item.path).startswith(here):
            return getattr(plugin, "CPU_ONLY", {}).get(item.path.name)
    return None


@pytest.fixture(autouse=True)
def ttt_test_device():
    """Runs each test with ``DEVICE`` as torch's default device (a no-op on the CPU)."""
    if DEVICE == "cpu":
        yield torch.device("cpu")
        return
    reason = device_skip_reason()
    if reason is not None:
        if REQUIRE_GPU:
            pytest.fail(f"TTT_REQUIRE_GPU=1 but {reason}")
        pytest.skip(reason)
    with TestDevice(torch.device(DEVICE)):
        yield torch.device(DEVICE)
