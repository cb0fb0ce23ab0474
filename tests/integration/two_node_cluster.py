"""Start a real two-node Ray cluster on this machine and keep it up until stdin closes.

    python tests/integration/two_node_cluster.py HEAD_PORT DASHBOARD_PORT

A head raylet (1 CPU, dashboard on 127.0.0.1) and a second raylet (1 CPU, the custom resource
`worker_node`), each with its own object store and its own temp dir, as separate machines have (sharing
one, the two nodes' runtime-env agents unpack and garbage-collect the same working-dir folder under each
other's running job): `ray.cluster_utils.Cluster` (STACK.md item 8). It prints
one JSON line with the dashboard address, then waits; on EOF it shuts down exactly the processes it
started (never `ray stop`, which would also stop other Ray instances on the machine).
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile

from ray.cluster_utils import Cluster


def main() -> None:
    head_port, dashboard_port = int(sys.argv[1]), int(sys.argv[2])
    with socket.socket() as s:  # the head's job agent port: its default (52365) is taken by any other local Ray
        s.bind(("127.0.0.1", 0))
        agent_port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "gcs_server_port": head_port, "dashboard_agent_listen_port": agent_port,
        "object_store_memory": 400 * 1024**2})
    second_tmp = tempfile.mkdtemp(prefix="ray-node2-")
    worker = cluster.add_node(num_cpus=1, resources={"worker_node": 1}, object_store_memory=400 * 1024**2,
                              temp_dir=second_tmp)
    cluster.wait_for_nodes()
    print(json.dumps({"gcs": cluster.address, "dashboard": f"http://127.0.0.1:{dashboard_port}",
                      "head_node_id": cluster.head_node.node_id, "worker_node_id": worker.node_id}), flush=True)
    try:
        sys.stdin.read()
    finally:
        cluster.shutdown()
        shutil.rmtree(second_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
