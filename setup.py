"""Builds the optional C extensions (the keyspace kernel and the serving fast path); everything
else is in pyproject.toml.

The extension is optional: without a compiler the package installs and runs on its pure-Python
twin, and says so (sovereign_discovery.KERNEL, a KernelFallbackWarning). Set
SOVEREIGN_DISCOVERY_REQUIRE_C=1 at run time to make a missing build an error instead.
"""

import sys

from setuptools import Extension, setup

compile_args = [] if sys.platform == "win32" else ["-O3", "-std=c99", "-Wall", "-Wextra"]

setup(
    ext_modules=[
        Extension(
            "sovereign_discovery._keyspace",
            sources=["sovereign_discovery/_keyspace.c"],
            extra_compile_args=compile_args,
            optional=True,
        ),
        Extension(
            "sovereign_discovery._fastpath",
            sources=["sovereign_discovery/_fastpath.c"],
            extra_compile_args=compile_args,
            optional=True,
        ),
    ]
)
