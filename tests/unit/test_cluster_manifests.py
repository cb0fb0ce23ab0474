"""Static checks of cluster/: what can be known without Kubernetes, a cloud account or a running Ray.

- The launcher YAMLs validate against Ray's own cluster-config schema (ray/autoscaler/ray-schema.json, shipped
  in the ray package) and pass Ray's own validator after Ray's own default-filling, as `ray up` runs them.
- The KubeRay manifests use the ray.io/v1 fields correctly (kinds, group specs, replica bounds, string-valued
  rayStartParams, known autoscalerOptions keys, RayJob fields) and the RayJob runs on the same cluster spec.
- Every pod and container (autoscaler and RayJob submitter included) runs non-root and unprivileged with
  requests and limits, secrets come only from Secrets, and no file under cluster/ holds a credential.

Each check is a function returning the problems it finds, and each is shown failing on a broken copy.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ropo_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHERS = {"aws": CLUSTER / "launcher" / "aws.yaml", "gcp": CLUSTER / "launcher" / "gcp.yaml"}
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
STORAGE = CLUSTER / "kuberay" / "storage.yaml"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"

ENTRYPOINT_SCRIPT = "pipelines/ropo_full.py"
# The RayJob's --config: the 7B UltraFeedback recipe, written by a parallel change. test_rayjob_config_file_exists
# requires it (and that it loads with the RayJob's overrides): without it the RayJob would fail the same way.
EXPECTED_CONFIG = "pipelines/configs/ultrafeedback_7b.yaml"
SHARED_MOUNT = "/mnt/ropo"
SHARED_CLAIM = "ropo-shared"
IMAGE_WORKDIR = "/home/ray/ropo-ray"
RAY_VERSION = "2.60.0"

# KubeRay v1 AutoscalerOptions (ray-operator/apis/ray/v1/raycluster_types.go) and its UpscalingMode enum.
AUTOSCALER_KEYS = {"upscalingMode", "idleTimeoutSeconds", "resources", "image", "imagePullPolicy",
                   "securityContext", "env", "envFrom", "volumeMounts"}
UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
CREDENTIAL_TEXT = [re.compile(r"AKIA[0-9A-Z]{16}"), re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")]
GPU = "nvidia.com/gpu"


def load_yaml(path: Path) -> Any:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher: Ray's schema and Ray's validator
# ---------------------------------------------------------------------------------------------------------

def ray_schema() -> dict:
    return json.loads((importlib.resources.files("ray.autoscaler") / "ray-schema.json").read_text("utf-8"))


def ray_validate(config: dict) -> dict:
    """What `ray up` does before touching a cloud: fill Ray's per-provider defaults, then validate
    (ray.autoscaler._private.commands._bootstrap_config). validate_config alone needs the filled fields,
    e.g. cluster_synced_files."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_config_matches_rays_schema(name):
    jsonschema.validate(load_yaml(LAUNCHERS[name]), ray_schema())


def _misspelled_key(c: dict) -> None:
    c["max_worker"] = c.pop("max_workers")


def _wordy_max_workers(c: dict) -> None:
    c["max_workers"] = "many"


def _node_type_without_resources(c: dict) -> None:
    next(iter(c["available_node_types"].values())).pop("resources")


def _fractional_resource(c: dict) -> None:
    next(iter(c["available_node_types"].values()))["resources"]["CPU"] = 0.5


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
@pytest.mark.parametrize("breakage", [_misspelled_key, _wordy_max_workers, _node_type_without_resources,
                                      _fractional_resource])
def test_rays_schema_rejects_a_broken_launcher_config(name, breakage):
    config = load_yaml(LAUNCHERS[name])
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_config_passes_rays_validator(name):
    prepared = ray_validate(load_yaml(LAUNCHERS[name]))
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_rays_validator_rejects_an_inconsistent_launcher_config(name):
    """Schema-valid but wrong: the head type is not a node type, or min_workers exceed the global max."""
    config = load_yaml(LAUNCHERS[name])
    config["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(config)
    config = load_yaml(LAUNCHERS[name])
    for node_type in config["available_node_types"].values():
        node_type["min_workers"] = config["max_workers"]
    with pytest.raises(ValueError, match="max_workers"):
        ray_validate(config)


def launcher_problems(config: dict) -> list[str]:
    """House rules of our launcher files: the project image, no work and a local-only dashboard on the head,
    GPU workers on the GPU image, bounded autoscaling, setup that installs no Ray."""
    problems = []
    head = config["available_node_types"][config["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        problems.append("head node type must offer CPU 0")
    start = " ".join(config.get("head_start_ray_commands", []))
    for flag in ("--num-cpus=0", "--dashboard-host=127.0.0.1"):
        if flag not in start:
            problems.append(f"head_start_ray_commands lack {flag}")
    if "0.0.0.0" in start:
        problems.append("the dashboard must not listen on 0.0.0.0")
    if not config["docker"]["image"].endswith("-cpu"):
        problems.append("docker.image must be the project's CPU image")
    if not 0 < config.get("idle_timeout_minutes", 0):
        problems.append("idle_timeout_minutes must be set")
    for name, node_type in config["available_node_types"].items():
        if node_type.get("min_workers", 0) > node_type.get("max_workers", config["max_workers"]):
            problems.append(f"{name}: min_workers > max_workers")
        gpu_image = node_type.get("docker", {}).get("worker_image", "").endswith("-gpu")
        if (node_type["resources"].get("GPU", 0) > 0) != gpu_image:
            problems.append(f"{name}: GPU resources and the GPU image go together")
    setup = config.get("setup_commands", []) + config.get("head_setup_commands", [])
    if any(re.search(r"pip install[^|;&]*\bray\b", cmd) for cmd in setup):
        problems.append("setup must not install Ray (the image holds Ray 2.60.0)")
    return problems


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_config_house_rules(name):
    config = load_yaml(LAUNCHERS[name])
    assert launcher_problems(config) == []
    assert config["file_mounts"] == {"~/ropo-ray": "."}
    assert not [n for n, t in config["available_node_types"].items() if t.get("min_workers", 0)], "scale from 0"


def test_launcher_house_rules_can_fail():
    config = load_yaml(LAUNCHERS["aws"])
    config["head_start_ray_commands"] = ["ray start --head --dashboard-host=0.0.0.0"]
    config["available_node_types"]["ray.worker.gpu"].pop("docker")
    config["setup_commands"] = ["pip install -U ray[default]"]
    problems = launcher_problems(config)
    assert len(problems) == 5, problems


def test_aws_nodes_use_instance_profiles_by_name():
    for name, node_type in load_yaml(LAUNCHERS["aws"])["available_node_types"].items():
        assert set(node_type["node_config"]["IamInstanceProfile"]) == {"Name"}, name
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/"), name


def test_gcp_gpu_nodes_terminate_on_host_maintenance():
    node_types = load_yaml(LAUNCHERS["gcp"])["available_node_types"]
    gpu_types = {name: t for name, t in node_types.items() if t["resources"].get("GPU")}
    assert gpu_types, "a GPU node type"
    for name, node_type in gpu_types.items():
        node = node_type["node_config"]
        assert node["guestAccelerators"][0]["acceleratorCount"] == node_type["resources"]["GPU"], name
        # Compute Engine's Scheduling is an object; a list (as in some Ray examples) is ignored or refused.
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", name


# ---------------------------------------------------------------------------------------------------------
# KubeRay manifests: structure
# ---------------------------------------------------------------------------------------------------------

def cluster_specs() -> dict[str, dict]:
    return {"RayCluster": load_yaml(RAYCLUSTER)["spec"], "RayJob.rayClusterSpec": load_yaml(RAYJOB)["spec"]
            ["rayClusterSpec"]}


def groups(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield str(group.get("groupName")), group


def start_params_problems(where: str, params: Any) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}: rayStartParams must be a mapping"]
    return [f"{where}: rayStartParams[{k!r}] must be a string, got {v!r}" for k, v in params.items()
            if not (isinstance(k, str) and isinstance(v, str))]


def template_problems(where: str, template: Any) -> list[str]:
    containers = (template or {}).get("spec", {}).get("containers")
    if not containers:
        return [f"{where}: template.spec.containers is empty"]
    problems = [f"{where}: container {i} needs a name and an image" for i, c in enumerate(containers)
                if not (c.get("name") and c.get("image"))]
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in containers[0].get("volumeMounts", [])}
    if volumes.get(mounts.get(SHARED_MOUNT), {}).get("persistentVolumeClaim", {}).get("claimName") != SHARED_CLAIM:
        problems.append(f"{where}: the Ray container must mount PVC {SHARED_CLAIM} at {SHARED_MOUNT}")
    if "emptyDir" not in volumes.get(mounts.get("/tmp"), {}):
        problems.append(f"{where}: the Ray container needs an emptyDir at /tmp (its root filesystem is read-only)")
    return problems


def replica_problems(where: str, group: dict) -> list[str]:
    bounds = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
    if not all(is_int(b) for b in bounds):
        return [f"{where}: minReplicas, replicas, maxReplicas must be integers, got {bounds}"]
    low, replicas, high = bounds
    return [] if 0 <= low <= replicas <= high else [f"{where}: need 0 <= minReplicas <= replicas <= maxReplicas"]


def autoscaler_problems(spec: dict) -> list[str]:
    options = spec.get("autoscalerOptions", {})
    problems = [f"autoscalerOptions.{k} is not a KubeRay v1 field" for k in sorted(set(options) - AUTOSCALER_KEYS)]
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if options.get("upscalingMode") not in UPSCALING_MODES:
        problems.append(f"autoscalerOptions.upscalingMode must be one of {sorted(UPSCALING_MODES)}")
    if not (is_int(options.get("idleTimeoutSeconds")) and options["idleTimeoutSeconds"] > 0):
        problems.append("autoscalerOptions.idleTimeoutSeconds must be a positive integer")
    return problems


def cluster_spec_problems(spec: dict) -> list[str]:
    problems = [] if spec.get("rayVersion") == RAY_VERSION else [f"rayVersion must be {RAY_VERSION!r}"]
    problems += autoscaler_problems(spec)
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("head: rayStartParams num-cpus must be \"0\" (no work on the head)")
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append("head: the service stays ClusterIP with no ingress (reach it with kubectl port-forward)")
    names = [name for name, _ in groups(spec)]
    if len(set(names)) != len(names) or "None" in names:
        problems.append(f"worker groups need unique groupNames, got {names[1:]}")
    for name, group in groups(spec):
        problems += start_params_problems(name, group.get("rayStartParams"))
        problems += template_problems(name, group.get("template"))
        if name != "head":
            problems += replica_problems(name, group)
    return problems


@pytest.mark.parametrize("which", ["RayCluster", "RayJob.rayClusterSpec"])
def test_cluster_spec_structure(which):
    assert cluster_spec_problems(cluster_specs()[which]) == []


def _replicas_above_max(spec: dict) -> None:
    spec["workerGroupSpecs"][0]["replicas"] = spec["workerGroupSpecs"][0]["maxReplicas"] + 1


def _integer_start_param(spec: dict) -> None:
    spec["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _unknown_upscaling_mode(spec: dict) -> None:
    spec["autoscalerOptions"]["upscalingMode"] = "Fast"


def _unknown_autoscaler_key(spec: dict) -> None:
    spec["autoscalerOptions"]["idleTimeout"] = 60


def _no_shared_volume(spec: dict) -> None:
    spec["workerGroupSpecs"][-1]["template"]["spec"]["volumes"].pop()


def _load_balancer(spec: dict) -> None:
    spec["headGroupSpec"]["serviceType"] = "LoadBalancer"


@pytest.mark.parametrize("breakage", [_replicas_above_max, _integer_start_param, _unknown_upscaling_mode,
                                      _unknown_autoscaler_key, _no_shared_volume, _load_balancer])
def test_cluster_spec_check_can_fail(breakage):
    spec = copy.deepcopy(cluster_specs()["RayCluster"])
    breakage(spec)
    assert cluster_spec_problems(spec) != []


def test_manifest_kinds_and_versions():
    assert {k: load_yaml(p)["kind"] for k, p in (("c", RAYCLUSTER), ("j", RAYJOB))} == {"c": "RayCluster",
                                                                                       "j": "RayJob"}
    assert load_yaml(RAYCLUSTER)["apiVersion"] == load_yaml(RAYJOB)["apiVersion"] == "ray.io/v1"
    pvc = load_yaml(STORAGE)
    assert (pvc["apiVersion"], pvc["kind"], pvc["metadata"]["name"]) == ("v1", "PersistentVolumeClaim", SHARED_CLAIM)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_gpu_group_lands_on_gpu_nodes():
    gpu_groups = [g for g in cluster_specs()["RayCluster"]["workerGroupSpecs"] if "gpu" in g["groupName"]]
    assert gpu_groups, "a GPU worker group"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        assert pod["nodeSelector"] and any(t["key"] == GPU for t in pod["tolerations"])
        assert pod["containers"][0]["image"].endswith("-gpu")


def rayjob_problems(job: dict) -> list[str]:
    spec = job["spec"]
    problems = [] if spec.get("submissionMode") in SUBMISSION_MODES else ["submissionMode is not a KubeRay mode"]
    if spec.get("submissionMode") != "K8sJobMode":
        problems.append("submissionMode must be K8sJobMode")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true")
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        if not (is_int(spec.get(key)) and spec[key] > 0):
            problems.append(f"{key} must be a positive integer")
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append("entrypoint must be a command")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "null")
    if not isinstance(runtime_env, dict):
        return problems + ["runtimeEnvYAML must parse to a mapping"]
    if runtime_env.get("working_dir") != IMAGE_WORKDIR:
        problems.append(f"runtimeEnvYAML working_dir must be the image's project folder {IMAGE_WORKDIR}")
    env_vars = runtime_env.get("env_vars", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
        problems.append("runtimeEnvYAML env_vars must map strings to strings")
    return problems


def test_rayjob_fields():
    assert rayjob_problems(load_yaml(RAYJOB)) == []


def test_rayjob_check_can_fail():
    job = load_yaml(RAYJOB)
    job["spec"].update(submissionMode="HttpMode", ttlSecondsAfterFinished="600", shutdownAfterJobFinishes=False,
                       runtimeEnvYAML="working_dir: [unclosed")
    with pytest.raises(yaml.YAMLError):
        rayjob_problems(job)
    job["spec"]["runtimeEnvYAML"] = "working_dir: /tmp\nenv_vars: {N: 1}"
    assert len(rayjob_problems(job)) == 6


def test_rayjob_runs_on_the_rayclusters_spec():
    specs = cluster_specs()
    assert specs["RayJob.rayClusterSpec"] == specs["RayCluster"], "edit raycluster.yaml and rayjob.yaml together"


def entrypoint() -> list[str]:
    return shlex.split(load_yaml(RAYJOB)["spec"]["entrypoint"])


def test_rayjob_entrypoint_runs_the_pipeline_script():
    argv = entrypoint()
    assert argv[:2] == ["python", ENTRYPOINT_SCRIPT] and (REPO / ENTRYPOINT_SCRIPT).is_file()
    assert argv[argv.index("--config") + 1] == EXPECTED_CONFIG


def test_rayjob_overrides_are_config_keys_on_the_shared_volume():
    """The dotted overrides build a valid Config (no YAML needed) and put every output on the volume."""
    argv = entrypoint()
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    cfg = load_config(None, overrides)
    for path in (cfg.pipeline.run_dir, cfg.pipeline.artifacts_dir, cfg.cache.root):
        assert path.startswith(SHARED_MOUNT + "/"), path


def test_rayjob_config_file_exists():
    """The config the RayJob names is in the repository (so in the image) and loads with its overrides."""
    path = REPO / EXPECTED_CONFIG
    assert path.is_file(), f"{EXPECTED_CONFIG} (named by cluster/kuberay/rayjob.yaml) is missing"
    argv = entrypoint()
    load_config(path, [a for a in argv[2:] if "=" in a and not a.startswith("-")])


# ---------------------------------------------------------------------------------------------------------
# Security of every pod and container
# ---------------------------------------------------------------------------------------------------------

def pod_specs(manifest: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod spec, cluster spec or {}) for every pod template in a RayCluster or RayJob."""
    spec = manifest["spec"]
    cluster = spec if manifest["kind"] == "RayCluster" else spec["rayClusterSpec"]
    for name, group in groups(cluster):
        yield name, group["template"]["spec"], cluster
    if manifest["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]["spec"], {}


def env_problems(where: str, env: list[dict]) -> list[str]:
    problems = []
    for entry in env or []:
        name, secret_ref = entry["name"], entry.get("valueFrom", {}).get("secretKeyRef")
        if SECRET_NAME.search(name) and ("value" in entry or not secret_ref):
            problems.append(f"{where}: env {name} looks secret; take it from a Secret (valueFrom.secretKeyRef)")
        elif any(p.search(str(entry.get("value", ""))) for p in CREDENTIAL_TEXT):
            problems.append(f"{where}: env {name} holds a credential")
    return problems


def resource_problems(where: str, resources: dict, gpu_group: bool) -> list[str]:
    problems = [f"{where}: resources.{kind}.{res} is missing" for kind in ("requests", "limits")
                for res in ("cpu", "memory") if res not in (resources or {}).get(kind, {})]
    requests, limits = (resources or {}).get("requests", {}), (resources or {}).get("limits", {})
    if gpu_group and not limits.get(GPU):
        problems.append(f"{where}: a GPU group needs a {GPU} limit")
    if GPU in requests and requests[GPU] != limits.get(GPU):
        problems.append(f"{where}: {GPU} requests must equal limits")
    return problems


def security_context_problems(where: str, sc: dict, pod_sc: dict) -> list[str]:
    sc = sc or {}
    problems = []
    if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") == 0:
        problems.append(f"{where}: runAsNonRoot must be true (and runAsUser not 0)")
    if sc.get("privileged") is True:
        problems.append(f"{where}: privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    capabilities = sc.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
        problems.append(f"{where}: capabilities must drop ALL and add none")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem must be true (writable paths are volumes)")
    if (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: seccompProfile must be RuntimeDefault")
    return problems


def pod_problems(where: str, pod: dict) -> list[str]:
    problems = [f"{where}: {key} must not be set" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    problems += [f"{where}: hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    sc = pod.get("securityContext") or {}
    if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") == 0:
        problems.append(f"{where}: pod securityContext must set runAsNonRoot")
    if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod seccompProfile must be RuntimeDefault")
    return problems


def container_problems(where: str, container: dict, pod_sc: dict, gpu_group: bool) -> list[str]:
    problems = security_context_problems(where, container.get("securityContext"), pod_sc)
    problems += resource_problems(where, container.get("resources"), gpu_group)
    problems += env_problems(where, container.get("env"))
    problems += [f"{where}: envFrom must reference a Secret or ConfigMap" for source in container.get("envFrom", [])
                 if not ({"secretRef", "configMapRef"} & set(source))]
    return problems


def security_problems(manifest: dict) -> list[str]:
    problems = []
    for where, pod, cluster in pod_specs(manifest):
        problems += pod_problems(where, pod)
        for container in pod.get("initContainers", []) + pod["containers"]:
            gpu_group = "gpu" in where or container.get("image", "").endswith("-gpu")
            problems += container_problems(f"{where}/{container['name']}", container,
                                           pod.get("securityContext") or {}, gpu_group)
        if where == "head" and cluster.get("enableInTreeAutoscaling"):
            # KubeRay builds the autoscaler container from autoscalerOptions (and the head pod's context).
            autoscaler = {"name": "autoscaler", **cluster.get("autoscalerOptions", {})}
            problems += container_problems("head/autoscaler", autoscaler, pod.get("securityContext") or {}, False)
    if manifest["kind"] == "RayJob":
        runtime_env = yaml.safe_load(manifest["spec"].get("runtimeEnvYAML") or "{}") or {}
        problems += [f"runtimeEnvYAML: env_vars {k} looks secret; a runtime env holds literal values only"
                     for k in runtime_env.get("env_vars", {}) if SECRET_NAME.search(k)]
    return problems


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_every_pod_and_container_is_locked_down(path):
    assert security_problems(load_yaml(path)) == []


def worker_container(manifest: dict) -> dict:
    return manifest["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _privileged(m: dict) -> None:
    worker_container(m)["securityContext"] = {**worker_container(m)["securityContext"], "privileged": True}


def _literal_aws_secret(m: dict) -> None:
    worker_container(m)["env"] = [*worker_container(m)["env"], {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]


def _host_path(m: dict) -> None:
    m["spec"]["headGroupSpec"]["template"]["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}})


def _host_network(m: dict) -> None:
    m["spec"]["headGroupSpec"]["template"]["spec"]["hostNetwork"] = True


def _no_limits(m: dict) -> None:
    worker_container(m)["resources"] = {"requests": worker_container(m)["resources"]["requests"]}


def _gpu_without_limit(m: dict) -> None:
    gpu = m["spec"]["workerGroupSpecs"][-1]["template"]["spec"]["containers"][0]
    gpu["resources"] = {k: {r: v for r, v in q.items() if r != GPU} for k, q in gpu["resources"].items()}


def _root_autoscaler(m: dict) -> None:
    m["spec"]["autoscalerOptions"]["securityContext"] = {**m["spec"]["autoscalerOptions"]["securityContext"],
                                                         "runAsNonRoot": False, "runAsUser": 0}


def _added_capability(m: dict) -> None:
    sc = worker_container(m)["securityContext"]
    worker_container(m)["securityContext"] = {**sc, "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}


@pytest.mark.parametrize("breakage", [_privileged, _literal_aws_secret, _host_path, _host_network, _no_limits,
                                      _gpu_without_limit, _root_autoscaler, _added_capability])
def test_security_check_can_fail(breakage):
    manifest = copy.deepcopy(load_yaml(RAYCLUSTER))
    breakage(manifest)
    assert security_problems(manifest) != []


def test_security_check_sees_the_submitter_and_the_runtime_env():
    job = load_yaml(RAYJOB)
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    job["spec"]["runtimeEnvYAML"] += "  WANDB_API_KEY: abc123\n"
    problems = security_problems(job)
    assert any(p.startswith("submitter/") for p in problems) and any("WANDB_API_KEY" in p for p in problems)


def credential_problems(name: str, text: str) -> list[str]:
    return [f"{name}: matches {p.pattern}" for p in CREDENTIAL_TEXT if p.search(text)]


def test_no_credentials_under_cluster():
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 7
    problems = [q for p in files for q in credential_problems(str(p.relative_to(REPO)), p.read_text("utf-8"))]
    assert problems == []


def test_credential_scan_can_fail():
    planted_key = "AKIA" + "ABCDEFGHIJ234567"
    planted_block = "-----BEGIN " + "OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n"
    assert credential_problems("x", f"aws_access_key_id: {planted_key}") != []
    assert credential_problems("x", planted_block) != []


# ---------------------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def final_user_problems(text: str) -> list[str]:
    users = [args.split(":")[0].strip() for ins, args in dockerfile_instructions(text) if ins == "USER"]
    if not users:
        return ["no USER: the image would run as root"]
    return [] if users[-1] not in {"root", "0"} else [f"the final USER is {users[-1]}"]


def test_dockerfile_runs_as_non_root_and_installs_like_setup_sh():
    text = DOCKERFILE.read_text("utf-8")
    assert final_user_problems(text) == []
    instructions = dockerfile_instructions(text)
    assert instructions[-1][0] == "USER", "USER must be the last instruction"
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    assert args["BASE_IMAGE"] == f"rayproject/ray:{RAY_VERSION}-py311"
    assert ("WORKDIR", IMAGE_WORKDIR) in instructions
    install = next(a for ins, a in instructions if ins == "RUN" and ".[cpu]" in a)
    assert install.index("torch==") < install.index('".[cpu]"') < install.index("pip uninstall -y torchvision")
    assert '".[gpu]"' in install


def test_final_user_check_can_fail():
    assert final_user_problems("FROM x\nUSER 1000\nRUN true\nUSER root\n") != []
    assert final_user_problems("FROM x\nRUN true\n") != []


def values_of(tree: Any, keys: set[str]) -> Iterator[Any]:
    """Every value stored under one of `keys`, anywhere in a parsed YAML tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in keys:
                yield value
            yield from values_of(value, keys)
    elif isinstance(tree, list):
        for item in tree:
            yield from values_of(item, keys)


def test_images_are_the_project_images_of_this_version():
    """Every pod and node runs the project image of pyproject's version (autoscaler: the head's image)."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]["version"]
    expected = {f"ghcr.io/ropo-ray/ropo-ray:{version}-{target}" for target in ("cpu", "gpu")}
    trees = [load_yaml(p) for p in (RAYCLUSTER, RAYJOB, *LAUNCHERS.values())]
    assert {image for tree in trees for image in values_of(tree, {"image", "worker_image"})} == expected
