"""Session-wide test setup."""

from __future__ import annotations

import os

import pytest

from fedfms_jax.compilation_cache import ENV, enable_compilation_cache


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
