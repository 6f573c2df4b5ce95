"""Shared fixtures. ``kernel`` runs a test against both keyspace kernels side by side."""

from __future__ import annotations

import os

import pytest

from sovereign_discovery import keys

_REQUIRE_C = keys._flag(keys.REQUIRE_C_ENV)


def _kernel_params() -> list:
    params = [pytest.param("python", id="py")]
    try:
        keys.kernel_module("c")
    except ImportError as exc:
        if _REQUIRE_C:
            raise RuntimeError(f"{keys.REQUIRE_C_ENV}=1 but the C kernel is missing: {exc}") from exc
        params.append(pytest.param("c", id="c", marks=pytest.mark.skip(reason=f"C kernel not built: {exc}")))
    else:
        params.append(pytest.param("c", id="c"))
    return params


@pytest.fixture(scope="session", params=_kernel_params())
def kernel(request):
    """The kernel module under test: the pure-Python spec, then the C extension."""
    return keys.kernel_module(request.param)


@pytest.fixture(scope="session")
def both_kernels():
    """(python, c) for differential tests; skipped when C was not built and not required."""
    try:
        return keys.kernel_module("python"), keys.kernel_module("c")
    except ImportError as exc:
        if _REQUIRE_C:
            raise
        pytest.skip(f"C kernel not built: {exc}")


def pytest_report_header(config):
    return f"sovereign_discovery kernel: {keys.KERNEL} ({keys.KERNEL_REASON}); pid {os.getpid()}"
