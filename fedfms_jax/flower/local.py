"""A real Flower deployment on this machine: one SuperLink, one SuperNode per site.

    python -m fedfms_jax.flower.local --config configs/X.py [--sites N] [--workdir DIR]
        [--tls] [--config.key=value ...]

starts `flower-superlink` and N site nodes on 127.0.0.1 (free ports; with --tls, over TLS
with certificates made for the run): each `python -m fedfms_jax.flower.node`, a SuperNode
told its site with `--node-config site-index=K` (so that it reads only that site's data)
with its in-process SuperExec and the site's long-lived worker beside it, as a hospital
starts its site. N defaults to the data's site count, the unseen site included. It then
submits the app with `flwr run` and prints one line per round as the server finishes it. Every process it started (and
every process those started) is stopped when it ends -- normally, on error, on Ctrl-C or
SIGTERM, or after --timeout; killed outright, the kernel stops its children.

DIR gets: metrics.jsonl and global_trainable.safetensors (written by the ServerApp),
flower/logs/{superlink,site-K,server}.log, flower/app/pyproject.toml (the app `flwr run`
bundles), flower/workers/site-K (each site worker's socket, key and saved state) and
flower/home (FLWR_HOME: Flower's config and installed apps).

--write_app DIR only writes the app directory, for `flwr run DIR <superlink>` against a
deployment started by hand (see "Cross-site training on Flower" in the README).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import tomli_w
from absl import app, flags
from ml_collections import config_flags

from fedfms_jax.compilation_cache import ENV, cache_dir
from fedfms_jax.config import ConfigError, validate
from fedfms_jax.flower import bundle, certs
from fedfms_jax.flower.processes import (RUN_TAG_ENV, ChildExited, Processes, exit_on_signals,
                                         free_port, tail, wait_for_port)
from fedfms_jax.flower.settings import (FAILURE_POLICIES, RunSettings, check_secagg,
                                        config_to_json)
from fedfms_jax.flower.site import site_names

HOST = "127.0.0.1"
CONNECTION = "fedfms-local"

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (as train)")
_SITES = flags.DEFINE_integer("sites", None, "number of sites, one SuperNode each (default: "
                              "the data's sites, the unseen one included)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default runs/flower-<time>)")
_TLS = flags.DEFINE_bool("tls", False, "TLS between SuperNodes/flwr and the SuperLink, with "
                         "certificates made for this run")
_TIMEOUT = flags.DEFINE_float("timeout", None, "stop everything after this many seconds "
                              "(default: connect + rounds x round timeout + 120)")
_ROUND_TIMEOUT = flags.DEFINE_float("round_timeout", 1800.0,
                                    "seconds the server waits for one round's replies")
_CONNECT_TIMEOUT = flags.DEFINE_float("connect_timeout", 300.0,
                                      "seconds the server waits for all sites to connect")
_ON_SITE_FAILURE = flags.DEFINE_enum("on_site_failure", "fail", FAILURE_POLICIES,
                                     "a site that errs or is lost mid-round fails the run, or "
                                     "the round continues with the remaining sites")
_MIN_SITES = flags.DEFINE_integer("min_sites", 1, "with --on_site_failure=continue: fewest "
                                  "sites whose updates a round may average")
_SECAGG = flags.DEFINE_bool("secagg", False, "secure aggregation: every round runs SecAgg+, "
                            "the server seeing only the sum of the sites' updates")
_SECAGG_RANGE = flags.DEFINE_float("secagg_range", 1.0, "with --secagg: each update value "
                                   "(times its site's weight / the largest) is clipped to "
                                   "[-R, R] and quantised on a grid of 2R / 2^22")
_SECAGG_THRESHOLD = flags.DEFINE_float("secagg_threshold", 0.67, "with --secagg: the share "
                                       "of a site's neighbours that must answer for its "
                                       "masks to be removed (dropouts tolerated below it)")
_WRITE_APP = flags.DEFINE_string("write_app", None, "only write the Flower app directory here")
_QUIET = flags.DEFINE_bool("quiet", False, "print only the summary")


def child_env(home: Path) -> dict[str, str]:
    """Environment of every process of the deployment."""
    venv_bin = str(Path(sys.executable).parent)
    env = {
        # Flower starts `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name:
        # they must come from this interpreter's environment.
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "FLWR_HOME": str(home),
        # Loopback only: no update checks or telemetry leave the machine.
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    # Every process of the deployment compiles into the machine's cache (the sites compile
    # the same programs, and the next run on this machine reads them back).
    env[ENV] = str(cache_dir())
    return env


def write_flwr_config(home: Path, port: int, ca_cert: Path | None) -> None:
    """FLWR_HOME/config.toml naming this deployment's SuperLink as the default connection."""
    connection = {"address": f"{HOST}:{port}"}
    if ca_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(ca_cert)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def superlink_argv(port: int, tls: certs.Certificates | None) -> list[str]:
    return ["flower-superlink", *(tls.superlink_args() if tls else ["--insecure"]),
            "--host", HOST, "--port", str(port),
            # The app's dependencies are this environment; never pip/uv-install at run time.
            "--disable-runtime-dependency-installation"]


def node_argv(site: int, superlink_port: int, port: int, worker_dir: Path,
              tls: certs.Certificates | None) -> list[str]:
    """A site's node (node.py: its SuperNode and its worker), as a hospital starts it."""
    return [sys.executable, "-m", "fedfms_jax.flower.node", "--worker_dir", str(worker_dir),
            "--", *(tls.supernode_args() if tls else ["--insecure"]),
            "--superlink", f"{HOST}:{superlink_port}", "--host", HOST, "--port", str(port),
            "--node-config", f"site-index={site}",
            # A SuperLink that went away is not waited for forever.
            "--max-wait-time", "60"]


def site_count(config, requested: int | None) -> int:
    """How many sites to start: `requested`, or by default every site of the data (sites
    0..N-1 connect, in the data's order, so N must reach the unseen site). ConfigError
    naming a count that works otherwise."""
    names = site_names(config)
    unseen = config.data.unseen_site
    listed = f"{len(names)} sites: {', '.join(names)}"
    if requested is None:
        return len(names)
    if not 1 <= requested <= len(names):
        raise ConfigError(f"--sites {requested}: the data has {listed}; use --sites "
                          f"{len(names)} (the default) or fewer")
    if unseen and unseen in names and requested <= names.index(unseen):
        need = names.index(unseen) + 1
        raise ConfigError(f"--sites {requested} cannot hold data.unseen_site={unseen!r}, site "
                          f"{need} of the data's {listed}: use --sites {need}"
                          + (f" to {len(names)}" if need < len(names) else "")
                          + f" (default {len(names)}), or --config.data.unseen_site= to "
                          "train without an unseen site")
    return requested


class RoundPrinter:
    """Prints metrics.jsonl records as the server appends them."""

    def __init__(self, path: Path, quiet: bool):
        self.path = path
        self.quiet = quiet
        self.offset = 0
        self.records: list[dict] = []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            while (line := f.readline()).endswith("\n"):
                self.offset = f.tell()
                record = json.loads(line)
                self.records.append(record)
                if not self.quiet:
                    print(format_record(record), flush=True)


def format_record(record: dict) -> str:
    """One line for a metrics.jsonl record of the ServerApp."""
    kind = record.get("kind")
    if kind == "error":
        return f"server error: {record['error']}"
    if kind == "sites":
        return "sites: " + ", ".join(f"{s['index']}:{s['name']} (n={s['num_train']})"
                                     for s in record["sites"])
    if kind == "round":
        parts = [f"round {record['round']}", f"{record['seconds']:.1f} s",
                 f"{len(record['sites'])} sites",
                 f"down {record['bytes_down_per_client'] / 2**20:.3f} MB/site",
                 f"up {record['bytes_up_per_client'] / 2**20:.3f} MB/site"]
        losses = [v for v in record["loss"].values() if v is not None]
        if losses:
            parts.append(f"loss {sum(losses) / len(losses):.4f}")
        if record.get("epsilon") is not None:
            parts.append(f"epsilon {record['epsilon']:.3f}")
        if record.get("secagg"):
            parts[4] = "up: SecAgg+ masked"
        if record.get("excluded"):
            parts.append(f"non-finite: {record['excluded']}")
        if record.get("failed"):
            parts.append(f"FAILED: {record['failed']}")
        return "  ".join(parts)
    if kind == "eval":
        dice = ", ".join(f"{site} {v['dice']:.4f}" for site, v in record["sites"].items())
        return f"round {record['round']} {record['split']} Dice: {dice}"
    if kind == "done":
        return (f"done: {record['rounds']} rounds in {record['seconds']:.1f} s, "
                f"{record['bytes_cumulative'] / 2**20:.2f} MB in messages; "
                f"weights: {record.get('weights')}")
    return json.dumps(record)


def run_status(env: dict[str, str], run_id: int, timeout: float = 60) -> dict:
    """`flwr ls --run-id` of the finished run: {'status': 'finished:completed', ...}."""
    out = subprocess.run(["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                         env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=timeout)
    try:
        runs = json.loads(out.stdout)["runs"]
        return runs[0] if runs else {}
    except (ValueError, KeyError, IndexError):
        return {"status": f"unknown (flwr ls: {out.stdout.strip()} {out.stderr.strip()})"}


class DeploymentError(RuntimeError):
    """The deployment failed; the message says where to look."""


def deploy(config, num_sites: int, workdir: Path, *, tls: bool = False,
           timeout: float | None = None, round_timeout: float = 1800.0,
           connect_timeout: float = 300.0, on_site_failure: str = "fail", min_sites: int = 1,
           quiet: bool = False, secure: dict | None = None) -> dict:
    """Runs the federation to the end; returns the server's final metrics record.
    secure: RunSettings' secagg, secagg_range, secagg_threshold (default: no SecAgg).
    Raises DeploymentError (or TimeoutError) with the reason and the log to read."""
    workdir = workdir.resolve()
    base = workdir / "flower"
    logs, home = base / "logs", base / "home"
    for stale in ("metrics.jsonl",):
        (workdir / stale).unlink(missing_ok=True)
    settings = RunSettings(
        config_json=config_to_json(config), num_sites=num_sites, workdir=str(workdir),
        connect_timeout=connect_timeout, round_timeout=round_timeout,
        on_site_failure=on_site_failure, min_sites=min_sites, **(secure or {}))
    if timeout is None:
        timeout = connect_timeout + int(config.rounds) * round_timeout + 120
    bundle.write_app(base / "app", settings)
    env = child_env(home)
    # A tag given in the environment (tests) marks this run's processes; else a fresh one.
    tag = os.environ.get(RUN_TAG_ENV) or uuid.uuid4().hex
    printer = RoundPrinter(workdir / "metrics.jsonl", quiet)
    deadline = time.monotonic() + timeout
    started = time.monotonic()

    with Processes(tag, env) as procs:
        tls_files = certs.make_certificates(base / "certs") if tls else None
        link_port = free_port(HOST)
        superlink = procs.start("superlink", superlink_argv(link_port, tls_files),
                                logs / "superlink.log")
        wait_for_port(HOST, link_port, 60, alive=lambda: superlink.popen.poll() is None,
                      what=f"flower-superlink (log: {superlink.log_path})")
        sites = [procs.start(f"site-{k}", node_argv(k, link_port, free_port(HOST),
                                                    base / "workers" / f"site-{k}", tls_files),
                             logs / f"site-{k}.log")
                 for k in range(num_sites)]
        write_flwr_config(home, link_port, tls_files.ca_cert if tls_files else None)
        if not quiet:
            print(f"superlink on {HOST}:{link_port}{' (TLS)' if tls else ''}, {num_sites} "
                  f"sites; logs in {logs}", flush=True)
        runner = procs.start("flwr run", ["flwr", "run", str(base / "app"), CONNECTION,
                                          "--stream"], logs / "server.log")
        lost = set()
        while runner.popen.poll() is None:
            printer.poll()
            if superlink.popen.poll() is not None:
                raise DeploymentError(f"flower-superlink exited with code "
                                      f"{superlink.popen.returncode}; see {superlink.log_path}:"
                                      f"\n{tail(superlink.log_path)}")
            for site in sites:
                if site.popen.poll() is not None and site.name not in lost:
                    lost.add(site.name)
                    print(f"warning: {site.name} exited with code {site.popen.returncode} "
                          f"(log: {site.log_path})", flush=True)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the federation did not finish within {timeout:.0f} s; "
                                   f"server log: {runner.log_path}")
            procs.reap()
            time.sleep(0.5)
        printer.poll()
        server_log = runner.log_path.read_text(errors="replace")
        match = re.search(r"Successfully started run (\d+)", server_log)
        if runner.popen.returncode != 0 or not match:
            raise DeploymentError(f"`flwr run` failed (code {runner.popen.returncode}); see "
                                  f"{runner.log_path}:\n{tail(runner.log_path, 30)}")
        status = run_status(env, int(match.group(1)))

    errors = [r["error"] for r in printer.records if r.get("kind") == "error"]
    done = [r for r in printer.records if r.get("kind") == "done"]
    if status.get("status") != "finished:completed" or errors or not done:
        reason = errors[-1] if errors else f"run status {status.get('status')!r}"
        raise DeploymentError(f"the federation failed: {reason}\nserver log: "
                              f"{runner.log_path}:\n{tail(runner.log_path, 30)}")
    summary = dict(done[-1])
    summary["wall_seconds"] = time.monotonic() - started
    summary["network"] = status.get("network-traffic", {})
    return summary


def secure_settings() -> dict:
    """The SecAgg+ fields of RunSettings from the flags."""
    return {"secagg": int(_SECAGG.value), "secagg_range": _SECAGG_RANGE.value,
            "secagg_threshold": _SECAGG_THRESHOLD.value}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    try:
        # Before any process starts. The app alone (--write_app) may be written where the
        # data is not: the sites check their own.
        here = not _WRITE_APP.value
        validate(config, data_here=here, weights_here=here, federated=True)
        check_secagg(config, RunSettings(config_json="{}", num_sites=1, **secure_settings()))
        if here or _SITES.value is None:
            num_sites = site_count(config, _SITES.value)
        else:
            num_sites = _SITES.value
    except (ConfigError, ValueError) as error:
        if not here and _SITES.value is None:
            error = ConfigError(f"{error}\n(with --write_app where the data is not, give "
                                "--sites: the number of sites that will connect)")
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if _WRITE_APP.value:
        settings = RunSettings(
            config_json=config_to_json(config), num_sites=num_sites,
            workdir=str(Path(_WORKDIR.value).resolve()) if _WORKDIR.value else "",
            connect_timeout=_CONNECT_TIMEOUT.value, round_timeout=_ROUND_TIMEOUT.value,
            on_site_failure=_ON_SITE_FAILURE.value, min_sites=_MIN_SITES.value,
            **secure_settings())
        print(f"wrote {bundle.write_app(_WRITE_APP.value, settings)}")
        return
    workdir = Path(_WORKDIR.value or time.strftime("runs/flower-%Y%m%d-%H%M%S"))
    exit_on_signals()
    try:
        summary = deploy(config, num_sites, workdir, tls=_TLS.value, timeout=_TIMEOUT.value,
                         round_timeout=_ROUND_TIMEOUT.value,
                         connect_timeout=_CONNECT_TIMEOUT.value,
                         on_site_failure=_ON_SITE_FAILURE.value, min_sites=_MIN_SITES.value,
                         quiet=_QUIET.value, secure=secure_settings())
    except KeyboardInterrupt:
        print("interrupted; every process of the federation was stopped", file=sys.stderr)
        sys.exit(130)
    except (DeploymentError, TimeoutError, ChildExited) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"finished in {summary['wall_seconds']:.1f} s; Flower counted "
          f"{summary['network'].get('total-bytes', 0) / 2**20:.2f} MB of traffic; "
          f"workdir {workdir}", flush=True)


if __name__ == "__main__":
    app.run(main)
