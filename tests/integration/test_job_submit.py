"""`ray job submit` of the pipeline to a real two-node Ray cluster started on this machine.

The job runs `pipelines/ropo_full.py` with small overrides (a smaller built-in task, a few steps, few
samples) from an uploaded working dir, as users run it. Each node offers one CPU, so the two Ray Train
workers must land one on each node: the test reads the actors' nodes from the cluster's state API.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_demo_model import SMALL

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes():
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("two_node_cluster.py")), str(free_port()),
                             str(free_port())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the two-node cluster did not start (exit code {proc.wait(60)})")
        yield json.loads(line)
    finally:
        proc.stdin.close()  # the helper shuts down exactly the raylets it started
        proc.wait(120)


def small_overrides(root: Path) -> list[str]:
    task = [f"task.{f}={getattr(SMALL, f)}" for f in ("num_entities", "max_operand", "num_sft_examples",
                                                        "fact_repeats", "num_pairs", "num_heldout_prompts",
                                                        "num_layers", "intermediate_size", "sft_epochs",
                                                        "sft_batch_size")]
    return [*task, f"pipeline.run_dir={root}/run", f"pipeline.artifacts_dir={root}/artifacts",
            f"cache.root={root}/cache", "pipeline.compare_runs=[]", "train.max_steps=4", "train.eval_every=2",
            "train.log_every=2", "train.checkpoint_every=4", "train.micro_batch_size=8", "eval.num_prompts=4",
            "eval.samples_per_prompt=2", "eval.max_tokens=16", "eval.probe_max_tokens=8"]


def test_job_submit_runs_the_pipeline_on_both_nodes(two_nodes, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    env = {**os.environ, "RAY_ADDRESS": two_nodes["dashboard"]}
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", two_nodes["dashboard"],
           "--working-dir", str(ROOT), "--", sys.executable, "pipelines/ropo_full.py", *small_overrides(tmp_path)]
    t0 = time.time()
    for _ in range(12):  # on a busy machine the head's job agent registers some seconds after the nodes
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
        if "No available agent to submit job" not in done.stderr:
            break
        time.sleep(10)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    jobs = [j for j in JobSubmissionClient(two_nodes["dashboard"]).list_jobs() if j.submission_id]
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED], tail
    assert (tmp_path / "run" / "report" / "report.html").is_file()
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert [r["adapter"] for r in report["runs"]] == ["ropo"]

    nodes = {n.node_id for n in list_nodes(address=two_nodes["dashboard"]) if n.state == "ALIVE"}
    assert nodes == {two_nodes["head_node_id"], two_nodes["worker_node_id"]}
    workers = list_actors(address=two_nodes["dashboard"], filters=[("class_name", "=", "RayTrainWorker")],
                          limit=1000, raise_on_missing_output=False)
    assert {a.node_id for a in workers} == nodes, [(a.class_name, a.node_id) for a in workers]
    print(f"job finished in {time.time() - t0:.0f} s")
