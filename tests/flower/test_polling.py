"""flwr's waits that polling.py shortens: if flwr stops waiting where polling.py expects,
these fail and polling.py needs a look."""

from __future__ import annotations

import inspect
import time

import pytest

from fedfms_jax.flower import polling


def test_the_supernode_idle_sleep_is_capped(monkeypatch):
    """flwr 1.42 sleeps 3 s between empty pulls and 0.5 s between reply checks, through
    its module's `time`."""
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    polling.cap_idle_sleep(0.05)
    began = time.monotonic()
    start_client_internal.time.sleep(3)
    assert time.monotonic() - began < 1.0
    assert start_client_internal.time.monotonic() > 0  # the rest of `time` is untouched
    monkeypatch.setenv(polling.POLL_ENV, "0")
    with pytest.raises(SystemExit, match="between 0.01 and 3"):
        polling.poll_interval()


def test_an_object_not_there_yet_is_pulled_again_at_once(monkeypatch):
    """Every object pull of flwr goes through these two functions with their defaults; an
    object that arrives just after the first try costs 0.05 s, not flwr's 1 s."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    functions = (inflatable_utils.pull_objects,
                 inflatable_utils.pull_and_inflate_object_from_tree)
    from flwr.supercore.constant import PULL_INITIAL_BACKOFF

    assert PULL_INITIAL_BACKOFF == 1  # flwr's first wait, in seconds
    for function in functions:
        # restored after the test to what it was
        monkeypatch.setitem(function.__kwdefaults__, "initial_backoff", PULL_INITIAL_BACKOFF)
    source = inspect.getsource(inflatable_utils.pull_and_inflate_object_from_tree)
    assert "initial_backoff=initial_backoff" in source  # passed on to pull_objects
    tries = []

    def pull(object_id):
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    polling.fast_object_pulls()
    began = time.monotonic()
    assert inflatable_utils.pull_objects(["a"], pull) == {"a": b"content"}
    assert len(tries) == 3 and time.monotonic() - began < 0.8  # 0.05 + 0.1 s, with jitter
    assert functions[1].__kwdefaults__["initial_backoff"] == polling.PULL_INITIAL_BACKOFF


@pytest.mark.parametrize("raw", ["fast", "0", "100"])
def test_a_bad_poll_setting_exits_naming_the_variable(monkeypatch, raw):
    from fedfms_jax.flower import superexec

    for variable, read in ((polling.POLL_ENV, polling.poll_interval),
                           (superexec.SUPEREXEC_POLL_ENV, superexec.poll_interval)):
        monkeypatch.setenv(variable, raw)
        with pytest.raises(SystemExit, match=f"{variable}='{raw}'"):
            read()
        monkeypatch.delenv(variable)
        assert read() in (polling.DEFAULT_POLL, superexec.DEFAULT_POLL)
