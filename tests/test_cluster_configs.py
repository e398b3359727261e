"""The cluster configs in cluster_configs/ and the job runtime envs in jobs/, checked offline.

- Ray cluster-launcher YAMLs (AWS, GCP): Ray's own schema, the one `ray up` applies
  (``ray/autoscaler/ray-schema.json`` via ``prepare_config`` + ``validate_config``; a private API,
  which is why Ray is pinned), and broken copies of them must fail it.
- KubeRay RayCluster / RayJob: the ray.io/v1 CRD schemas (trimmed copy in
  tests/kuberay_crd_v1_trimmed.yaml, unknown fields rejected as Kubernetes does), broken copies
  must fail them too.
- What no schema knows: every image tag and rayVersion is requirements.txt's Ray; every spot
  worker type has an on-demand twin of the same shape; declared CPU/GPU counts match the
  instance types; the setup commands install this repository's requirements; data and
  checkpoint locations come from CCRK_DATA_URI / CCRK_STORAGE_PATH; the runtime envs are valid
  for Ray and their pip lists equal requirements.txt.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "cluster_configs"
LAUNCHER = {"aws": CONFIGS / "aws.yaml", "gcp": CONFIGS / "gcp.yaml"}
RAYCLUSTER = CONFIGS / "kuberay" / "raycluster.yaml"
RAYJOB = CONFIGS / "kuberay" / "rayjob.yaml"
CRD = Path(__file__).with_name("kuberay_crd_v1_trimmed.yaml")

# (vCPUs, GPUs, accelerator) of the machine types the configs use, from the providers' catalogues.
SHAPES = {
    "m6i.2xlarge": (8, 0, None), "m6i.4xlarge": (16, 0, None),
    "g5.2xlarge": (8, 1, "A10G"), "p4d.24xlarge": (96, 8, "A100"),
    "n2-standard-8": (8, 0, None), "n2-standard-16": (16, 0, None),
    "g2-standard-8": (8, 1, "L4"), "a2-highgpu-1g": (12, 1, "A100"),
}
GPU_TYPES = {"aws": {"A10G", "A100"}, "gcp": {"L4", "A100"}}
STORAGE_SCHEME = {"aws": "s3://", "gcp": "gs://"}
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def requirement_lines() -> list[str]:
    lines = [ln.split("#", 1)[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    return [ln for ln in lines if ln]


def pinned_ray_version() -> str:
    (ray_line,) = [ln for ln in requirement_lines() if re.match(r"ray(\[|=)", ln)]
    match = re.fullmatch(r"ray\[[a-z,]+\]==(\d+\.\d+\.\d+)", ray_line)
    assert match, f"requirements.txt must pin ray exactly, got {ray_line!r}"
    return match.group(1)


RAY_VERSION = pinned_ray_version()


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_installed_ray_is_the_pinned_one():
    """The schema used below ships inside the installed ray: it must be the version the configs pin."""
    import ray

    assert ray.__version__ == RAY_VERSION


# ----------------------------------------------------------------------------------------------
# Cluster launcher YAMLs
# ----------------------------------------------------------------------------------------------


def launcher_validate(config: dict) -> dict:
    """What `ray up` does to a config before using it; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_passes_rays_schema(cloud):
    config = load(LAUNCHER[cloud])
    prepared = launcher_validate(config)
    assert prepared["provider"]["type"] == cloud
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0      # filled in by prepare_config


def _unknown_key_in_node_type(c):
    c["available_node_types"]["gpu-a100-spot"]["max_worker"] = 2


def _bad_head_node_type(c):
    c["head_node_type"] = "ray.head.default"


def _fractional_gpu_resource(c):
    c["available_node_types"]["gpu-a100-ondemand"]["resources"]["GPU"] = 0.5


def _string_min_workers(c):
    c["available_node_types"]["cpu-spot"]["min_workers"] = "0"


def _unknown_docker_key(c):
    c["docker"]["images"] = c["docker"]["image"]


def _min_workers_over_global_max(c):
    c["available_node_types"]["cpu-spot"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
@pytest.mark.parametrize("breakage, message", [
    (_unknown_key_in_node_type, "Additional properties are not allowed .'max_worker' was unexpected"),
    (_bad_head_node_type, "`head_node_type` must be one of `available_node_types`"),
    (_fractional_gpu_resource, "0.5 is not of type 'integer'"),
    (_string_min_workers, "'0' is not of type 'integer'"),
    (_unknown_docker_key, "'images' was unexpected"),
    (_min_workers_over_global_max, "global `max_workers` is smaller than the sum of `min_workers`"),
], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_broken_launcher_configs_are_rejected(cloud, breakage, message):
    config = load(LAUNCHER[cloud])
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)) as err:
        launcher_validate(config)
    assert re.search(message, str(err.value)), str(err.value)


def _spot(cloud: str, node_config: dict) -> bool:
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


def _machine(cloud: str, node_config: dict) -> str:
    return node_config["InstanceType" if cloud == "aws" else "machineType"]


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_node_types_gpu_shapes_autoscaling_and_spot_fallback(cloud):
    config = load(LAUNCHER[cloud])
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    head = types[config["head_node_type"]]
    # a CPU head that takes no work, and says so to `ray start` as well as to the autoscaler
    assert SHAPES[_machine(cloud, head["node_config"])][1] == 0 and head["resources"] == {"CPU": 0}
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in start and "--num-cpus=0" in start and "--autoscaling-config=" in start

    seen_gpus = set()
    for name, t in workers.items():
        cpus, gpus, accel = SHAPES[_machine(cloud, t["node_config"])]
        expected = {"CPU": cpus, **({"GPU": gpus, f"accelerator_type:{accel}": 1} if gpus else {})}
        assert t["resources"] == expected, name                   # the autoscaler's view = the machine
        assert 0 == t["min_workers"] < t["max_workers"] <= config["max_workers"], name   # scales from zero
        if gpus:
            seen_gpus.add(accel)
    assert seen_gpus == GPU_TYPES[cloud]

    spot = {n for n, t in workers.items() if _spot(cloud, t["node_config"])}
    on_demand = set(workers) - spot
    assert spot and {n.replace("-spot", "-ondemand") for n in spot} == on_demand
    for name in spot:
        twin = workers[name.replace("-spot", "-ondemand")]
        assert _machine(cloud, twin["node_config"]) == _machine(cloud, workers[name]["node_config"])
        assert twin["resources"] == workers[name]["resources"]
        assert workers[name]["priority"] > twin["priority"], "spot must be tried first"


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_images_pin_the_required_ray(cloud):
    docker = load(LAUNCHER[cloud])["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert len(images) >= 2
    for image in images:
        repo, tag = image.rsplit(":", 1)
        assert repo == "rayproject/ray" and tag.split("-")[0] == RAY_VERSION, image
        assert "-py311" in tag, image                                   # the project's Python
    assert docker["image"].endswith("-gpu") and docker["head_image"].endswith("-cpu")


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_setup_installs_this_repository(cloud):
    config = load(LAUNCHER[cloud])
    (remote,) = [r for r, local in config["file_mounts"].items() if local == "."]
    assert config["setup_commands"] == [f"pip install -q -r {remote}/requirements.txt",
                                        f"pip install -q --no-deps -e {remote}"]
    assert "ray stop" not in " ".join(config["setup_commands"])
    # what travels with the repository: no virtualenv, no .git, no outputs
    assert {".venv", "out"} <= set(config["rsync_exclude"]) and ".gitignore" in config["rsync_filter"]


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_storage_and_auth_come_from_config(cloud):
    config = load(LAUNCHER[cloud])
    env = {}
    for opt in config["docker"]["run_options"]:
        words = shlex.split(opt)
        if words[0] == "--env":
            key, value = words[1].split("=", 1)
            env[key] = value
    assert env["CCRK_DATA_URI"].startswith(STORAGE_SCHEME[cloud])
    assert env["CCRK_STORAGE_PATH"].startswith(STORAGE_SCHEME[cloud])
    assert env["CCRK_DATA_URI"] != env["CCRK_STORAGE_PATH"]
    # token auth on every node, with the token file `ray get-auth-token --generate` writes
    assert env["RAY_AUTH_MODE"] == "token"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    if cloud == "gcp":                     # one project everywhere it is named
        project = config["provider"]["project_id"]
        emails = {sa["email"] for t in config["available_node_types"].values()
                  for sa in t["node_config"].get("serviceAccounts", [])}
        assert emails == {f"ray-autoscaler-sa-v1@{project}.iam.gserviceaccount.com"}


# ----------------------------------------------------------------------------------------------
# KubeRay manifests against the CRD schema
# ----------------------------------------------------------------------------------------------


def strict(schema):
    """A CRD structural schema as JSON Schema with Kubernetes' rule for unknown fields: an object
    that lists ``properties`` (and does not preserve unknown fields) accepts no others."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "definitions"):
            out[key] = {name: strict(sub) for name, sub in value.items()}
        else:
            out[key] = strict(value)
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators():
    crd = load(CRD)
    definitions = strict(crd["definitions"])
    validators = {}
    for kind in ("RayCluster", "RayJob"):
        schema = {**strict(crd[kind]), "definitions": definitions}
        jsonschema.Draft7Validator.check_schema(schema)
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def crd_errors(validators, manifest: dict) -> list[str]:
    errors = []
    if manifest.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {manifest.get('apiVersion')!r} is not ray.io/v1")
    kind = manifest.get("kind")
    if kind not in validators:
        return errors + [f"kind {kind!r} is not RayCluster or RayJob"]
    name = manifest.get("metadata", {}).get("name", "")
    if not (K8S_NAME.match(name) and len(name) <= 63):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label")
    for e in validators[kind].iter_errors(manifest):
        errors.append(f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}")
    return errors


def test_strict_rejects_unknown_fields_only_where_fields_are_listed():
    schema = strict({"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "m": {"type": "object", "additionalProperties": {"type": "string"}},
        "o": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}})
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"a": {"b": "x"}, "m": {"any": "x"}, "o": {"any": {"deep": 1}}})
    assert not v.is_valid({"a": {"b": "x", "c": 1}})
    assert not v.is_valid({"z": 1})
    assert not v.is_valid({"m": {"any": 1}})


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifests_match_the_crd(crd_validators, path):
    manifest = load(path)
    assert crd_errors(crd_validators, manifest) == []


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _worker(m):
    return cluster_spec(m)["workerGroupSpecs"][1]


def _container(m):
    return _worker(m)["template"]["spec"]["containers"][0]


BROKEN_MANIFESTS = {
    "old_api_version": (lambda m: m.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    "bad_name": (lambda m: m["metadata"].update(name="CCRK_Ray"), "DNS-1123"),
    "typo_in_worker_group": (lambda m: _worker(m).update(maxReplica=4), "'maxReplica' was unexpected"),
    "no_group_name": (lambda m: _worker(m).pop("groupName"), "'groupName' is a required property"),
    "no_max_replicas": (lambda m: _worker(m).pop("maxReplicas"), "'maxReplicas' is a required property"),
    "string_replicas": (lambda m: _worker(m).update(minReplicas="0"), "'0' is not of type 'integer'"),
    "no_head_template": (lambda m: cluster_spec(m)["headGroupSpec"].pop("template"),
                         "'template' is a required property"),
    "no_head": (lambda m: cluster_spec(m).pop("headGroupSpec"), "'headGroupSpec' is a required property"),
    "non_string_ray_start_param": (lambda m: cluster_spec(m)["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0}), "0 is not of type 'string'"),
    "bad_auth_mode": (lambda m: cluster_spec(m)["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
    "typo_in_container": (lambda m: _container(m).update(imagePullPolicyy="Always"),
                          "'imagePullPolicyy' was unexpected"),
    "container_without_name": (lambda m: _container(m).pop("name"), "'name' is a required property"),
    "typo_in_pod_spec": (lambda m: _worker(m)["template"]["spec"].update(nodeSelectors={}),
                         "'nodeSelectors' was unexpected"),
    "bad_quantity": (lambda m: _container(m)["resources"]["limits"].update(memory="28 GB"), "does not match"),
    "env_without_name": (lambda m: _container(m)["env"].append({"value": "x"}), "'name' is a required property"),
    "autoscaler_typo": (lambda m: cluster_spec(m)["autoscalerOptions"].update(idleTimeoutSecond=60),
                        "'idleTimeoutSecond' was unexpected"),
}


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
@pytest.mark.parametrize("breakage", sorted(BROKEN_MANIFESTS))
def test_broken_manifests_are_rejected(crd_validators, path, breakage):
    manifest = load(path)
    change, message = BROKEN_MANIFESTS[breakage]
    change(manifest)
    errors = crd_errors(crd_validators, manifest)
    assert any(re.search(message, e) for e in errors), errors


def test_broken_rayjob_spec_fields_are_rejected(crd_validators):
    manifest = load(RAYJOB)
    manifest["spec"]["entrypointNumCpus"] = "1"
    manifest["spec"]["shutdownAfterJobFinish"] = True
    errors = crd_errors(crd_validators, manifest)
    assert any("'1' is not of type 'number'" in e for e in errors), errors
    assert any("'shutdownAfterJobFinish' was unexpected" in e for e in errors), errors


# ----------------------------------------------------------------------------------------------
# KubeRay manifests: what the CRD does not check
# ----------------------------------------------------------------------------------------------


def containers(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]["containers"][0]


def test_raycluster_pins_ray_autoscales_and_has_gpu_groups_with_on_demand_fallback():
    spec = load(RAYCLUSTER)["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"        # the head takes no work
    env_seen = set()
    for group, container in containers(spec):
        repo, tag = container["image"].rsplit(":", 1)
        assert repo == "rayproject/ray" and tag.split("-")[0] == RAY_VERSION and "-py311" in tag, group
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, group                                   # guaranteed QoS, no overcommit
        gpu = "nvidia.com/gpu" in limits
        assert tag.endswith("-gpu") == gpu, group
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        env_seen.add((env.get("CCRK_DATA_URI"), env.get("CCRK_STORAGE_PATH")))
    (data_uri, storage),  = env_seen                                       # the same on every pod
    assert data_uri.startswith("gs://") and storage.startswith("gs://") and data_uri != storage

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) == len(spec["workerGroupSpecs"])
    for name, g in groups.items():
        assert 0 == g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1, name
    spot = {n for n, g in groups.items() if g["template"]["spec"].get("nodeSelector", {}).get(
        "cloud.google.com/gke-spot") == "true"}
    assert spot and all(n.endswith("-spot") for n in spot)
    accelerators = set()
    for name in spot:
        twin = groups[name.replace("-spot", "-ondemand")]
        a, b = groups[name]["template"]["spec"], twin["template"]["spec"]
        assert a["containers"][0]["resources"] == b["containers"][0]["resources"], name
        accel = a["nodeSelector"]["cloud.google.com/gke-accelerator"]
        assert b["nodeSelector"] == {"cloud.google.com/gke-accelerator": accel}, name
        assert {t["key"] for t in a["tolerations"]} == {"nvidia.com/gpu", "cloud.google.com/gke-spot"}
        assert {t["key"] for t in b["tolerations"]} == {"nvidia.com/gpu"}
        accelerators.add(accel)
    assert accelerators == {"nvidia-l4", "nvidia-tesla-a100"}


def test_rayjob_runs_a_job_entrypoint_on_the_same_cluster_spec():
    job, cluster = load(RAYJOB), load(RAYCLUSTER)
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]          # one cluster definition, two manifests
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "python" and (REPO / words[1]).is_file() and words[1].startswith("jobs/")
    assert "'${CCRK_DATA_URI}/xflickrco-test'" in job["spec"]["entrypoint"]   # read on the cluster
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["submissionMode"] == "K8sJobMode"


# ----------------------------------------------------------------------------------------------
# Runtime envs (jobs/) and the RayJob's
# ----------------------------------------------------------------------------------------------


def check_runtime_env(env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"unknown runtime_env fields {unknown}"
    RuntimeEnv(**env)                                                    # Ray's own type checks


def test_runtime_envs_are_valid_and_keep_big_folders_out():
    local = load(REPO / "jobs" / "runtime_env.yaml")
    cluster = load(REPO / "jobs" / "runtime_env.cluster.yaml")
    for env in (local, cluster):
        check_runtime_env(env)
        assert "working_dir" not in env                     # given by `ray job submit --working-dir .`
        assert {".git/", ".venv/", "/out/"} <= set(env["excludes"])
    assert "pip" not in local and "conda" not in local      # nodes that already have the requirements
    assert {k: v for k, v in cluster.items() if k != "pip"} == local


def test_pip_lists_equal_requirements_txt_without_ray():
    expected = [ln for ln in requirement_lines() if not re.match(r"ray(\[|=)", ln)]
    cluster = load(REPO / "jobs" / "runtime_env.cluster.yaml")
    assert cluster["pip"]["packages"] == expected
    rayjob_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    check_runtime_env(rayjob_env)
    assert rayjob_env["pip"] == cluster["pip"] and rayjob_env["env_vars"] == cluster["env_vars"]
    assert rayjob_env["working_dir"].startswith(("https://", "s3://", "gs://")) and rayjob_env[
        "working_dir"].endswith(".zip")                     # a remote package: no laptop in the loop


def test_broken_runtime_env_is_rejected():
    env = load(REPO / "jobs" / "runtime_env.yaml")
    with pytest.raises(AssertionError, match="excludez"):
        check_runtime_env({**env, "excludez": env["excludes"]})
    with pytest.raises(TypeError, match="env_vars"):
        check_runtime_env({**env, "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": 1}})
