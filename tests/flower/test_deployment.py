"""Real deployments on loopback: flower-superlink and one flower-supernode per site, started
by `python -m fedfms_jax.flower.local`, against the in-process simulator."""

from __future__ import annotations

import signal
import time

import jax
import ml_collections
import numpy as np
import psutil
import pytest

from fedfms_jax.config import load_config_file
from fedfms_jax.experiment import Experiment
from fedfms_jax.flower.processes import tagged_processes
from fedfms_jax.run_log import read_records
from fedfms_jax.weights_file import flat_arrays, read_weights
from tests.flower.conftest import REPO, TINY_CONFIG

TWO_SITES = ["--config.data.options.num_sites=2", "--config.data.unseen_site="]


def tiny_config(**changes) -> ml_collections.ConfigDict:
    config = load_config_file(REPO / TINY_CONFIG)
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


class Simulation:
    """The in-process simulator of `config`, round by round."""

    def __init__(self, config):
        self.experiment = Experiment(config)
        self.state = self.experiment.init_state()

    def rounds(self, count: int) -> tuple[list[float], list[float]]:
        """`count` more rounds: their mean client losses and wall seconds (the first
        round of a Simulation includes compilation)."""
        losses, seconds = [], []
        for _ in range(count):
            began = time.perf_counter()
            self.state, result = self.experiment.train_round(self.state)
            jax.block_until_ready(self.state)
            seconds.append(time.perf_counter() - began)
            losses.append(result.mean_loss)
        return losses, seconds

    def weights(self) -> dict[str, np.ndarray]:
        """The global trainable weights, by flat path."""
        return {path: np.asarray(v) for path, v in flat_arrays(self.state.global_params).items()}


# The default suite's one real-process Flower run: the plain loopback one (TLS, whose
# certificates test_certs.py checks in-process, only adds handshakes to it). Three rounds;
# their times are printed beside the simulator's, and held to a bound in bench/flower.py.
LOOPBACK = {"mode": "decoder", "data.options.num_sites": 2, "data.unseen_site": "",
            "train.server_optimizer": "fedadam", "rounds": 3, "eval.every": 3}


@pytest.mark.parametrize("tls", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["loopback", "tls"])
def test_two_sites_train_as_the_simulator(tmp_path, launch, tls):
    """2 sites x 3 rounds of FedAdam, each site a node (SuperNode, in-process SuperExec,
    warm worker): per-round lines, bytes per message, evaluation, no process left, the
    simulator's losses and final weights (the server aggregates with the simulator's code;
    every server optimizer in-process: test_same_trajectory). The round times are printed,
    not asserted: on a 2-core machine the other pytest worker moves them by more than the
    bound, which `python -m bench.flower` measures alone (issue 16's target)."""
    config = tiny_config(**LOOPBACK)
    run = launch(tmp_path / "run", "--config", TINY_CONFIG, *(["--tls"] if tls else []),
                 "--round_timeout", "400", "--connect_timeout", "200",
                 *[f"--config.{k}={v}" for k, v in LOOPBACK.items()])
    # The simulator meanwhile, in this process: it compiles while the sites start (their
    # programs differ: one client against two).
    simulation = Simulation(config)
    losses, simulator_seconds = simulation.rounds(config.rounds)
    expected = simulation.weights()
    code = run.wait(timeout=900)
    output = run.output
    assert code == 0, output
    assert run.leftovers() == []
    for line in ("sites: 0:site1 (n=12), 1:site2 (n=7)", "round 1 ", "round 3 ",
                 "round 3 val Dice: site1", "done: 3 rounds"):
        assert line in output, output
    assert ("(TLS)" in output) == tls, output
    scheme = "https" if tls else "http"
    assert f"Uvicorn running on {scheme}://127.0.0.1" in (
        tmp_path / "run/flower/logs/superlink.log").read_text()

    rounds = read_records(tmp_path / "run", "round")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for record in rounds:
        assert record["sites"] == ["site1", "site2"] and not record["failed"]
        assert set(record["message_bytes"]) == {"site1", "site2"}
        for site in record["message_bytes"].values():
            # the packed payload plus one .npy header and the layout naming each array
            assert record["payload_bytes_per_client"] < site["up"] == site["down"] < \
                1.2 * record["payload_bytes_per_client"]
        assert record["bytes_total"] == 4 * record["bytes_up_per_client"]
    evals = read_records(tmp_path / "run", "eval")
    assert [(e["round"], e["split"], sorted(e["sites"])) for e in evals] == [
        (3, "val", ["site1", "site2"])]

    _, final = read_weights(tmp_path / "run/final.safetensors")
    for r, record in enumerate(rounds):
        np.testing.assert_allclose([record["loss"]["site1"], record["loss"]["site2"]],
                                   losses[r], rtol=1e-4, err_msg=f"round {r + 1} losses")
    assert_close_to_simulator(final, expected, config)
    for k in range(2):
        log = (tmp_path / f"run/flower/logs/site-{k}.log").read_text()
        # Each site built its model and data once and compiled once (round 1), and every
        # message ran in the site's SuperExec: no flwr-clientapp process was started.
        assert log.count("data and model built") == 1, log
        assert log.count("[superexec] train message") == 3, log
        assert log.count("[superexec] evaluate message") == 1, log
        assert "Start `flwr-clientapp` process" not in log, log
    print("seconds per round, Flower:", [f"{r['seconds']:.2f}" for r in rounds],
          "simulator:", [f"{s:.2f}" for s in simulator_seconds])


def assert_close_to_simulator(final, expected, config):
    """Within 1e-5 of the simulator, leaf by leaf (tiny_config sets Adam's eps to 1e-4, see
    there; at 1e-8 the attention key biases are chaotic, see test_same_trajectory)."""
    assert config.train.adam_eps >= 1e-4
    differences = {k: float(np.max(np.abs(final[k] - v))) for k, v in expected.items()}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 1e-5, (worst, differences[worst])


def test_a_site_count_that_cannot_hold_the_unseen_site_is_refused(tmp_path, launch):
    """The data set has 3 sites with site3 unseen: 2 sites cannot hold it, and the launcher
    says so before starting anything (and that 3 would)."""
    run = launch(tmp_path / "run", "--config", TINY_CONFIG, "--sites", "2")
    assert run.wait(timeout=120) == 2
    assert "--sites 2 cannot hold data.unseen_site='site3', site 3 of the data's 3 sites: " \
        "site1, site2, site3: use --sites 3" in run.output
    assert run.leftovers() == []
    assert not (tmp_path / "run/flower/logs").exists()


def supernode(tag: str, site: int) -> psutil.Process:
    for p in tagged_processes(tag):
        cmdline = p.cmdline()
        if "fedfms_jax.flower.supernode" in cmdline and \
                any(part.startswith(f"site-index={site} ") for part in cmdline):
            return p
    raise AssertionError(f"no SuperNode of site {site}")


def kill_site_mid_round(run, site: int) -> None:
    """SIGKILL a site's SuperNode once it has started training in round 1."""
    log = run.workdir / "flower" / "logs" / f"site-{site}.log"
    deadline = time.monotonic() + 400
    while "round 1: received" not in (log.read_text() if log.exists() else ""):
        assert run.popen.poll() is None, run.output
        assert time.monotonic() < deadline, run.output
        time.sleep(0.2)
    supernode(run.tag, site).send_signal(signal.SIGKILL)


@pytest.mark.slow  # waits out the heartbeat timeout; in make test: test_server_app.py's
def test_a_site_killed_mid_round_does_not_stop_the_others(tmp_path, launch):  # continue tests
    """on_site_failure=continue: round 1 completes with the remaining site, round 2 runs
    without the lost one, the unseen site is still tested; nothing is left behind."""
    run = launch(tmp_path / "run", "--config", TINY_CONFIG, "--sites", "3",
                 "--on_site_failure", "continue", "--round_timeout", "400",
                 "--connect_timeout", "200")
    kill_site_mid_round(run, 1)
    assert run.wait(timeout=900) == 0, run.output
    assert "warning: site-1 exited" in run.output
    rounds = read_records(tmp_path / "run", "round")
    assert [r["sites"] for r in rounds] == [["site1", "site2"], ["site1"]]
    assert list(rounds[0]["loss"]) == ["site1"]
    assert "heartbeat" in rounds[0]["failed"]["site2"]
    evals = {e["split"]: sorted(e["sites"]) for e in read_records(tmp_path / "run", "eval")}
    assert evals == {"val": ["site1"], "test": ["site3"]}
    assert run.leftovers() == []


@pytest.mark.slow
def test_a_site_killed_mid_round_fails_the_run_by_default(tmp_path, launch):
    run = launch(tmp_path / "run", "--config", TINY_CONFIG, "--sites", "2", *TWO_SITES,
                 "--round_timeout", "400", "--connect_timeout", "200")
    kill_site_mid_round(run, 1)
    assert run.wait(timeout=600) == 1
    assert "round 1: training failed at site 1 (site2, node" in run.output
    assert "on-site-failure=fail" in run.output
    assert run.leftovers() == []


@pytest.mark.slow  # the mechanism is in make test: test_processes.py's launcher-death tests
def test_ctrl_c_stops_every_process(tmp_path, launch):
    run = launch(tmp_path / "run", "--config", TINY_CONFIG, "--sites", "2", *TWO_SITES,
                 "--connect_timeout", "200")
    run.wait_for_output("sites: ", timeout=300)
    assert len(tagged_processes(run.tag)) >= 5  # launcher, superlink, 2 supernodes, flwr run
    run.popen.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    assert "interrupted" in run.output
    assert run.leftovers() == []


@pytest.mark.slow  # SecAgg+ is in make test in-process (test_secagg.py)
def test_secagg_on_loopback_ends_near_the_simulator(tmp_path, launch):
    """`--secagg`: 2 real sites x 2 rounds of SecAgg+ (four stages a round, each a message
    to every site, the SuperNode's context carrying the protocol state between them); the
    server sees masked vectors only and ends within the quantisation error (grown through
    one more round of training) of the simulator."""
    run = launch(tmp_path / "run", "--config", TINY_CONFIG, "--sites", "2", "--secagg",
                 "--secagg_range", "0.1", "--round_timeout", "400",
                 "--connect_timeout", "200", *TWO_SITES)
    assert run.wait(timeout=900) == 0, run.output
    assert "up: SecAgg+ masked" in run.output and "done: 2 rounds" in run.output
    assert run.leftovers() == []
    rounds = read_records(tmp_path / "run", "round")
    assert [r["secagg"] for r in rounds] == [True, True]
    assert all(v == 0 for r in rounds for v in r["secagg_clipped"].values())
    config = tiny_config(**{"data.options.num_sites": 2, "data.unseen_site": ""})
    simulation = Simulation(config)
    simulation.rounds(config.rounds)
    expected = simulation.weights()
    _, final = read_weights(tmp_path / "run/final.safetensors")
    assert_close_to_simulator(final, expected, config)
