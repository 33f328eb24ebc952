"""Session-wide test setup."""

from __future__ import annotations

import os

import pytest

from fedfms_jax.compilation_cache import ENV, enable_compilation_cache

# XLA's cheap CPU compile pipeline for the suite: the tests compile dozens of tiny-SAM
# programs and run each a few steps, so compiling dominates, and these settings halve it
# (measured: tests/fed/test_round.py's fixture 166 s -> 75 s on 2 cores). They change how
# XLA fuses and orders the float32 arithmetic, never what is computed: every tolerance
# here holds under them as under XLA's defaults, which FEDFMS_TEST_XLA_DEFAULTS=1 keeps
# (`make test-slow` and a portability run use it). Set before JAX starts its backend; the
# caller's own XLA_FLAGS come after and win; subprocesses inherit them.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
if not os.environ.get("FEDFMS_TEST_XLA_DEFAULTS"):
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()


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
