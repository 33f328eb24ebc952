"""A site's long-lived worker: the model, the compiled client round and the data stream of
one site, kept warm for the whole run.

Flower 1.42 runs every message in a fresh `flwr-clientapp` process, which would re-import
JAX, rebuild the model, reread the data and recompile every round. The site's ClientApp
(client_app.py) therefore only forwards each message over the local channel (channel.py) to
this worker and returns its answer:

    query     -> the site's identity and sizes (read from the data alone)
    train     -> one round of the simulator's local training (site.LocalSite.train)
    evaluate  -> the site's scores of the global weights, by the same built Experiment

The worker keys what it holds by the run: a message of another run id starts that run afresh
(no optimizer state, the data stream from its start), reusing the built model and data when
the run's config and node config are the same. After every round it saves the run's
optimizer state and data position under DIR/state, so a worker restarted mid-run continues
with the server's next message where the previous one stopped.

    python -m fedfms_jax.flower.worker --dir DIR [--parent PID]

serves at DIR (see channel.py) until process PID ends; `python -m fedfms_jax.flower.node`
starts it beside each SuperNode, which is how it is meant to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from pathlib import Path
from typing import Any

import numpy as np

from fedfms_jax.build import load_data
from fedfms_jax.compilation_cache import enable_compilation_cache
from fedfms_jax.config import validate
from fedfms_jax.flower import arrays, channel
from fedfms_jax.flower.processes import tie_to_parent
from fedfms_jax.flower.settings import RunSettings
from fedfms_jax.flower.site import LocalSite, site_config

log = logging.getLogger("fedfms_jax.flower.worker")

_META = "__meta__"


class SiteWorker:
    """Answers the ClientApp's requests (dicts, see client_app.py); keeps the LocalSite of
    the current run. state_dir: where the run's state is saved after every round (None:
    memory only, as under Flower's simulation runtime, whose ClientApp process lives on)."""

    def __init__(self, state_dir: str | os.PathLike | None = None):
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.run_id: int | None = None
        self.site: LocalSite | None = None
        self._built_for: tuple[str, str] | None = None

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The reply to one request: {'ok': True, ...} or {'ok': False, 'error': why}. A
        failing request is reported, never fatal: the worker serves the next one."""
        try:
            return {"ok": True, **self._handle(request)}
        except Exception as error:  # the ClientApp raises it, so the server names the site
            log.error("%s request failed:\n%s", request.get("kind"), traceback.format_exc())
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}

    def _handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        kind = request["kind"]
        if kind == "ping":
            return {"pid": os.getpid()}
        settings = RunSettings.from_run_config(request["run_config"])
        node_config = dict(request["node_config"])
        self._enter_run(int(request["run_id"]))
        if kind == "query":
            return self.query(settings, node_config)
        site = self._site(settings, node_config)
        message = request["config"]
        params = arrays.from_arrays(request["arrays"], site.like, "the server's weights")
        if kind == "train":
            return self.train(site, params, int(message["server-round"]) - 1,
                              list(message["client-sites"]).index(site.index))
        if kind == "evaluate":
            scores = site.evaluate(params, str(message["split"]))
            log.info("site %d (%s): %s Dice %.4f on %d images", site.index, site.name,
                     message["split"], scores.dice, scores.images)
            # Site means and counts travel; the per-case figures stay on the site.
            return {"site-index": site.index, "scores": {
                k: v for k, v in scores.as_dict().items() if k != "per_case"}}
        raise ValueError(f"unknown request kind {kind!r}")

    # --- runs -------------------------------------------------------------------------

    def _enter_run(self, run_id: int) -> None:
        if run_id == self.run_id:
            return
        if self.run_id is not None:
            log.info("run %d replaces run %d: the site starts afresh", run_id, self.run_id)
        self.run_id = run_id
        if self.site is not None:
            self.site.reset()
        if self.state_dir is not None and self.state_dir.is_dir():
            for stale in self.state_dir.glob("run-*.npz"):
                if stale.name != self._state_path(run_id).name:
                    stale.unlink(missing_ok=True)

    def _site(self, settings: RunSettings, node_config: dict) -> LocalSite:
        key = (settings.config_json, json.dumps(node_config, sort_keys=True, default=str))
        if self.site is None or self._built_for != key:
            began = time.perf_counter()
            self.site = LocalSite(settings.config, node_config)
            self._built_for = key
            log.info("site %d (%s): data and model built in %.1f s", self.site.index,
                     self.site.name, time.perf_counter() - began)
            self._restore(self.site)
        return self.site

    def query(self, settings: RunSettings, node_config: dict) -> dict[str, Any]:
        """The site's identity, read from its data without building a model."""
        config, index, name = site_config(settings.config, node_config)
        validate(config)
        site = load_data(config)[name]
        log.info("site %d (%s): %d training and %d validation records", index, name,
                 site.num_train, site.num_val)
        return {"site-index": index, "site-name": name, "num-train": site.num_train,
                "num-val": site.num_val}

    def train(self, site: LocalSite, params, round_index: int, client: int) -> dict[str, Any]:
        result = site.train(params, round_index, client)
        if not result.finite:
            log.warning("site %d (%s), round %d: the update is not finite; the optimizer "
                        "state is reset", site.index, site.name, round_index + 1)
        self._save(site)
        log.info("site %d (%s), round %d: %d steps in %.2f s, loss %.4f", site.index,
                 site.name, round_index + 1, result.steps, result.seconds, result.mean_loss)
        return {"site-index": site.index, "arrays": arrays.state_to_arrays(result.params),
                "metrics": {"num-examples": result.num_examples, "loss": result.mean_loss,
                            "steps": result.steps, "finite": int(result.finite),
                            "train-seconds": result.seconds}}

    # --- the saved state of the run -----------------------------------------------------

    def _state_path(self, run_id: int) -> Path:
        return self.state_dir / f"run-{run_id}.npz"

    def _save(self, site: LocalSite) -> None:
        """The run's state, replaced atomically (a crash leaves the previous round's)."""
        saved = site.saved_state() if self.state_dir is not None else None
        if saved is None:
            return
        meta, opt_arrays = saved
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._state_path(self.run_id)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **opt_arrays, **{_META: np.array(json.dumps(meta))})
        os.replace(tmp, path)

    def _restore(self, site: LocalSite) -> None:
        """Continues the run from its saved state, when an earlier worker left one."""
        if self.state_dir is None or not self._state_path(self.run_id).exists():
            return
        with np.load(self._state_path(self.run_id)) as saved:
            named = {k: saved[k] for k in saved.files}
        meta = json.loads(str(named.pop(_META)))
        site.restore(meta, named)
        log.info("site %d (%s): continues run %d after %d rounds (saved state)", site.index,
                 site.name, self.run_id, meta["rounds"])


def serve(directory: str | os.PathLike, parent: int | None = None) -> None:
    """Answers requests at `directory` one at a time (a SuperNode sends one message at a
    time) until process `parent` ends."""
    directory = Path(directory)
    if parent is not None:
        tie_to_parent(parent)
    enable_compilation_cache()
    worker = SiteWorker(directory / "state")
    with channel.listen(directory) as listener:
        log.info("site worker (pid %d) listening in %s", os.getpid(), directory)
        while True:
            try:
                connection = listener.accept()
            except (AuthenticationError, EOFError, OSError) as error:
                log.warning("refused a connection: %s: %s", type(error).__name__, error)
                continue
            try:
                channel.answer(connection, worker.handle)
            except (BrokenPipeError, ConnectionResetError, EOFError) as error:
                log.warning("the ClientApp went away before the answer: %s", error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedfms_jax.flower.worker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, type=Path, help="the worker directory")
    parser.add_argument("--parent", type=int, help="exit when this process does")
    args = parser.parse_args(argv)
    # force: an imported library may have configured the root logger already.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s "
                        "%(message)s", force=True)
    serve(args.dir, args.parent)


if __name__ == "__main__":
    main()
