"""A local Ray started by the project (runs.connect_ray) serves its dashboard's HTTP server on 127.0.0.1 only,
and its workers reach its state API beside another Ray on the same machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# Run in its own process: the session's shared cluster (ray_local) is initialised here, and connect_ray
# would then return at once without starting anything.
PROBE = """
import json, os, socket, urllib.error, urllib.request
import psutil, ray
from ropo_ray.runs import connect_ray


@ray.remote(num_cpus=0)
def state_from_a_worker():
    # What Ray Train's placement-group cleaner does in its actor: the state API with no address given.
    from ray.util.state import list_nodes
    try:
        return {"env": os.environ.get("RAY_ADDRESS"), "nodes": [n.node_id for n in list_nodes()]}
    except Exception as err:
        return {"env": os.environ.get("RAY_ADDRESS"), "error": f"{type(err).__name__}: {err}"}


logged = []
connect_ray(log=logged.append)
try:
    worker = ray.get(state_from_a_worker.remote())
    own = {"gcs": ray.get_runtime_context().gcs_address, "node": ray.get_runtime_context().get_node_id()}
    dash = [p for p in psutil.Process().children(recursive=True)
            if any(a.endswith("dashboard/dashboard.py") for a in p.cmdline())]
    # The dashboard's HTTP server (its UI and API). The same process also serves Ray's Prometheus metrics
    # (port 44227) on every interface: Ray binds that one to loopback only when the node's address is
    # loopback, and ray.init resolves 127.0.0.1 to the machine's address (RELIABILITY.md, Security).
    http_port = int(next(line for line in logged if "dashboard at" in line).rsplit(":", 1)[1])
    every = [(c.laddr.ip, c.laddr.port) for p in dash for c in p.net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN]
    listening = [(ip, port) for ip, port in every if port == http_port]
    answers = {}
    for _, port in listening:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as r:
                answers[port] = r.status
        except urllib.error.HTTPError as err:  # an HTTP status is an answer too
            answers[port] = err.code
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    reachable = []
    for address in others:
        for _, port in listening:
            try:
                socket.create_connection((address, port), timeout=5).close()
                reachable.append(f"{address}:{port}")
            except OSError:
                pass
    print(json.dumps({"dashboards": len(dash), "listening": listening, "every": every, "answers": answers,
                      "others": others, "reachable": reachable, "worker": worker, "own": own}))
finally:
    ray.shutdown()
"""


@pytest.fixture(scope="module")
def probe(ray_local, tmp_path_factory):
    """The probe's findings, from a local Ray it starts beside the session's (ray_local: two on one machine)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path_factory.mktemp("probe"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_local_dashboard_listens_on_loopback_only(probe):
    found = probe
    assert found["dashboards"] == 1, found
    assert found["listening"], found
    for ip, port in found["listening"]:  # the dashboard HTTP server's every listening socket
        assert ip == "127.0.0.1", (ip, port)
    assert any(100 <= status < 600 for status in found["answers"].values()), found  # it answers HTTP there
    # nothing answers on this machine's other addresses (tried while the cluster ran)
    assert found["reachable"] == [], found


def test_workers_reach_their_own_cluster_beside_another(probe, ray_local):
    """With the session's Ray also running, a worker's state API (no address given, as Ray Train's
    placement-group cleaner calls it) answers for the worker's own cluster: the job's env names its GCS.
    Without it the lookup among this machine's processes finds two and fails."""
    worker, own = probe["worker"], probe["own"]
    assert own["gcs"] != ray_local.get_runtime_context().gcs_address  # really two instances
    assert "error" not in worker, worker
    assert worker["env"].rsplit(":", 1)[1] == own["gcs"].rsplit(":", 1)[1]
    assert worker["nodes"] == [own["node"]]
