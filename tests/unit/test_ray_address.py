"""The job runtime env that names the cluster's address to its workers (runs.address_env)."""

from __future__ import annotations

import json

from ropo_ray.runs import address_env


def test_a_cluster_address_goes_to_every_worker(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert address_env("10.0.0.5:6379") == {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}


def test_no_address_for_a_ray_client_or_auto(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert address_env("ray://head:10001") is None  # a client address is not a GCS address
    assert address_env("auto") is None


def test_a_submitted_job_that_sets_it_keeps_its_own(monkeypatch):
    """Ray refuses to merge a job's runtime env with a ray.init one that sets the same variable."""
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert address_env("10.0.0.5:6379") is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert address_env("10.0.0.5:6379") == {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}
