"""Session-wide test setup."""

from __future__ import annotations

import os

import pytest

from fedfms_jax.compilation_cache import ENV, enable_compilation_cache


# The default suite's models are tiny: compiling their programs, not running them, is most
# of its time, and LLVM's optimisations are much of a compile (a cold suite on 2 cores:
# 9:47 -> 6:24). Every claim the suite checks holds at this level as at the default,
# bit-identities included (adding --xla_cpu_use_fusion_emitters=false would break decoder
# mode's). `make test-slow` (ViT-B at 1024, long runs: running dominates) keeps the default.
# Set before any test starts JAX; every process a test starts inherits it.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")


def pytest_configure(config):
    if "not slow" in (config.option.markexpr or ""):
        flags = os.environ.get("XLA_FLAGS", "").split()
        os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in FAST_COMPILE_FLAGS
                                                     if f not in flags])


@pytest.fixture(scope="session", autouse=True)
def jax_cache(tmp_path_factory):
    """One persistent compilation cache for the session, as every entry point has one:
    shared by the xdist workers and every process the tests start (Flower site workers,
    CLIs), so that the many tests compiling the same tiny-SAM programs compile them once.
    A folder of the session, never the user's own cache."""
    path = tmp_path_factory.getbasetemp().parent / "jax_cache"
    path.mkdir(exist_ok=True)
    saved = os.environ.get(ENV)
    os.environ[ENV] = str(path)
    enable_compilation_cache()
    yield path
    if saved is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = saved
