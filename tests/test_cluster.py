"""cluster/: the launcher YAMLs pass Ray's own config validation, the KubeRay CRDs use only the fields KubeRay
documents and pass the conversion that KubeRay's autoscaler sidecar runs, every launcher turns token auth on
without holding the token, gives its workers cloud credentials and a CPU type for data, listens publicly only where
Ray must, and runs the one image that cluster/Dockerfile builds; `make gpu-check` skips cleanly without CUDA; and
the autoscaler grows a fake GPU worker type from zero for a grid and shrinks it back when the grid is done."""

from __future__ import annotations

import copy
import fnmatch
import functools
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import AutoscalingCluster

from querypose_platform.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER = REPO_ROOT / "cluster"
IMAGE_ROOT = "/home/ray/querypose"  # where cluster/Dockerfile puts the project
IMAGE_NAME = "querypose:0.1"  # every node of every cluster runs this image (registries differ per cloud)
TOKEN_PATH = "~/.ray/auth_token"  # Ray's default token file on a node
TOKEN_SECRET = "querypose-ray-token"  # the Kubernetes Secret the user creates (key auth_token)
LAUNCHERS = ["aws.yaml", "gcp.yaml", "local.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob-ablation.yaml"]
# The oldest Linux driver for each CUDA line of PyTorch's wheel indexes (NVIDIA's CUDA release notes).
MIN_DRIVER = {"cu126": 560, "cu128": 570, "cu129": 575, "cu130": 580}
sys.path.insert(0, str(REPO_ROOT / "experiments"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

# Fields of the ray.io/v1 CRDs as KubeRay documents them (API reference, v1.6).
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                   "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "authOptions"}  # fmt: skip
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
AUTOSCALER_OPTIONS = {"upscalingMode", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources", "env",
                      "envFrom", "securityContext", "volumeMounts", "version"}  # fmt: skip
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress", "headServiceAnnotations"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                "scaleStrategy", "numOfHosts", "suspend", "idleTimeoutSeconds"}  # fmt: skip
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "jobId", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
               "activeDeadlineSeconds", "rayClusterSpec", "clusterSelector", "submitterPodTemplate", "suspend",
               "submissionMode", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "backoffLimit",
               "managedBy", "deletionStrategy", "submitterConfig"}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def kuberay_spec(name: str) -> dict:
    document = load(name)
    return document["spec"]["rayClusterSpec"] if document["kind"] == "RayJob" else document["spec"]


def pods(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [group["template"] for group in spec["workerGroupSpecs"]]


def paths_holding(node, text: str, path: str = "") -> list[str]:
    """Dotted paths of the string values in a parsed YAML document that contain `text`."""
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in paths_holding(value, text, f"{path}.{key}".lstrip("."))]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in paths_holding(value, text, f"{path}[{i}]")]
    return [path] if isinstance(node, str) and text in node else []


def nodes_to_launch(config: dict, demands: list[dict]) -> dict[str, int]:
    """The node types Ray's autoscaler (the v1 resource-demand scheduler, also KubeRay's sidecar's) launches for
    pending resource bundles on a cluster that has only its head."""
    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
    )
    head = config["head_node_type"]
    counts, unmet = get_nodes_for(
        config["available_node_types"], {head: 1}, head, config["max_workers"], demands, lambda r, d, t: scorer(r, d, t)
    )
    assert not unmet, unmet
    return dict(counts)


def autoscaling_config(name: str) -> dict:
    """The autoscaler's view of a cluster file: Ray's prepared launcher config, or for KubeRay the config that its
    autoscaler sidecar derives from the RayCluster (Ray's own conversion, which validates it too)."""
    if name in LAUNCHERS:
        return prepare_config(copy.deepcopy(load(name)))
    cluster = {"metadata": {"name": "querypose", "namespace": "default"}, "spec": kuberay_spec(name)}
    return _derive_autoscaling_config_from_ray_cr(cluster)


# --- launchers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_configs_pass_ray_validation_and_set_up_nodes_by_pulling_the_image(name):
    config = load(name)
    validate_config(prepare_config(copy.deepcopy(config)))
    docker = config["docker"]
    assert docker["image"].rsplit("/", 1)[-1] == IMAGE_NAME and docker["pull_before_run"] is True
    assert not any("docker" in node for node in config.get("available_node_types", {}).values()), "one image"
    # nothing builds Python on a node: the image carries Python 3.11, Ray and the project
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    commands = [command for key in keys for command in config.get(key, [])]
    assert not [c for c in commands if re.search(r"pip install|make |apt(-get)? install|conda |venv", c)], commands


def test_ray_validation_rejects_a_broken_config():
    config = load("aws.yaml")
    config["available_node_types"]["worker.gpu8"]["min_wrokers"] = 0
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_turn_token_auth_on_with_a_token_file_they_do_not_hold(name):
    config = load(name)
    # RAY_AUTH_MODE=token in the container's environment reaches `ray start`, the autoscaler and job drivers
    assert "--env=RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # the token reaches Ray's default token path on every node from a file outside the repository (a path under
    # the user's home on the machine running `ray up`): the YAML holds its location only
    source = config["file_mounts"][TOKEN_PATH]
    assert source.startswith("~/") and source != TOKEN_PATH
    text = (CLUSTER / name).read_text()
    assert "RAY_AUTH_TOKEN" not in text and "RAY_AUTH_MODE=disabled" not in text


def test_aws_nodes_carry_instance_profiles_and_the_head_may_hand_the_workers_theirs():
    config = load("aws.yaml")
    types, head = config["available_node_types"], config["head_node_type"]
    arns = {name: node["node_config"]["IamInstanceProfile"]["Arn"] for name, node in types.items()}
    pattern = r"arn:aws:iam::(\d{12}):instance-profile/([\w+=,.@-]+)"
    assert all(re.fullmatch(pattern, arn) for arn in arns.values()), arns
    # Launching a worker with a profile needs iam:PassRole on its role (cluster/README.md names role and profile
    # alike); Ray's default head role has no such grant, so the head carries the project's own profile.
    worker_roles = {arn.replace(":instance-profile/", ":role/") for name, arn in arns.items() if name != head}
    head_policy = json.loads((CLUSTER / "iam" / "aws-head-policy.json").read_text())["Statement"]
    assert worker_roles <= {s["Resource"] for s in head_policy if s["Action"] == "iam:PassRole"}
    worker_policy = json.loads((CLUSTER / "iam" / "aws-worker-policy.json").read_text())["Statement"]
    granted = {
        action for s in worker_policy for action in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])
    }
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= granted  # shards in, checkpoints out


def test_gcp_workers_carry_a_service_account():
    config = load("gcp.yaml")
    project = config["provider"]["project_id"]
    for name, node in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue  # Ray's launcher gives the head its own account (ray-autoscaler-sa-v1)
        (account,) = node["node_config"]["serviceAccounts"]
        assert account["email"].endswith(f"@{project}.iam.gserviceaccount.com"), name
        assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"], name


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", *KUBERAY])
def test_data_tasks_start_cpu_workers_and_the_trainer_one_gpu_node(name):
    config = autoscaling_config(name)
    types = config["available_node_types"]
    gpu = [t for t, node in types.items() if node["resources"].get("GPU") == 8]
    cpu = [t for t, node in types.items() if not node["resources"].get("GPU") and node["max_workers"] > 0]
    assert len(gpu) == len(cpu) == 1 and types[gpu[0]]["min_workers"] == types[cpu[0]]["min_workers"] == 0
    # Ray Data's read/decode tasks ask for fractional CPUs (data.cpus_per_task): CPU nodes, never 8-GPU ones
    launched = nodes_to_launch(config, [{"CPU": 0.5}] * 200)
    assert set(launched) == {cpu[0]}, launched
    # coco_r50.yaml's trainer: 8 workers of 1 GPU and 8 CPUs fit one 8-GPU node
    assert nodes_to_launch(config, [{"CPU": 8, "GPU": 1}] * 8) == {gpu[0]: 1}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_vm_launchers_listen_on_all_interfaces_only_where_ray_must(name):
    # GCS (6379) and the raylet's ports take no bind address: other nodes must reach them, so they listen on every
    # interface behind the cloud's firewall (security group / VPC rules admit the cluster's nodes) and the token.
    # The dashboard and job server need no other node: loopback, reached through `ray dashboard` (an SSH tunnel).
    config = load(name)
    assert paths_holding(config, "0.0.0.0") == []
    starts = [command for command in config["head_start_ray_commands"] if "ray start" in command]
    assert starts and all("--dashboard-host=127.0.0.1" in command for command in starts)


# --- KubeRay -------------------------------------------------------------------------------------------------


def _check_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER_OPTIONS
    assert spec["autoscalerOptions"]["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in spec["workerGroupSpecs"]]:
        assert all(isinstance(value, str) for value in params.values()), "rayStartParams values are strings"
    images = set()
    for pod in pods(spec):
        (container,) = pod["spec"]["containers"]
        assert container["resources"]["limits"] and "MLFLOW_TRACKING_URI" in {e["name"] for e in container["env"]}
        images.add(container["image"])
        # object-store credentials come from the pod's Kubernetes service account (workload identity)
        assert pod["spec"]["serviceAccountName"].startswith("querypose-ray-")
    (image,) = images
    assert image.rsplit("/", 1)[-1] == IMAGE_NAME, "one image for every pod"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_specs_use_documented_fields_and_convert_for_the_autoscaler(name):
    _check_cluster_spec(kuberay_spec(name))
    config = autoscaling_config(name)  # raises if Ray's autoscaler could not read the cluster
    assert config["available_node_types"]["gpu8"]["resources"]["GPU"] == 8


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_token_auth_reaches_every_component(name):
    spec = kuberay_spec(name)
    # KubeRay >= v1.6.0 reads the token from this Secret and sets RAY_AUTH_MODE and RAY_AUTH_TOKEN on the Ray
    # container of every pod, the autoscaler sidecar, the workers' wait-gcs-ready init container and a RayJob's
    # submitter. It leaves a variable a manifest already sets alone, so a hand-written one (RAY_AUTH_MODE=disabled,
    # a literal token) would win: there is none.
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    assert set(spec["authOptions"]) <= AUTH_OPTIONS
    containers = [c for pod in pods(spec) for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])]
    for env in [c.get("env", []) for c in containers] + [spec["autoscalerOptions"].get("env", [])]:
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & {e["name"] for e in env}
    if name.endswith("rayjob-ablation.yaml"):
        job = load(name)["spec"]
        assert job["submissionMode"] == "K8sJobMode" and "submitterPodTemplate" not in job  # the operator's submitter


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_listens_on_the_pod_ip_only_for_the_dashboard_behind_a_cluster_internal_service(name):
    # The head Service forwards to the pod's IP and the RayJob submitter reaches the job server through it, so the
    # dashboard binds 0.0.0.0 there (KubeRay's default too); the Service stays ClusterIP and has no Ingress.
    spec = kuberay_spec(name)
    assert paths_holding(spec, "0.0.0.0") == ["headGroupSpec.rayStartParams.dashboard-host"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)


def test_kuberay_rayjob_runs_the_raycluster_spec_and_a_grid_config_that_loads():
    job = load("kuberay/rayjob-ablation.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["submissionMode"] in SUBMISSION_MODES and spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"] == load("kuberay/raycluster.yaml")["spec"], "the job's cluster is raycluster.yaml's"
    # the entrypoint names a script and a config of this repository, and its overrides are valid
    python, script, flag, config, *overrides = shlex.split(spec["entrypoint"])
    assert python == "python" and flag == "--config"
    assert (REPO_ROOT / Path(script).relative_to(IMAGE_ROOT)).is_file()
    cfg = load_config(REPO_ROOT / Path(config).relative_to(IMAGE_ROOT), overrides)
    assert cfg.tune.grid_cells() and cfg.data.root.startswith("s3://")


# --- secrets -------------------------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": r"\bA(KIA|SIA)[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "hex token": r"\b[0-9a-fA-F]{32,}\b",
    "base64 token": r"[A-Za-z0-9+]{40,}={0,2}",
    "assigned secret": r"(?i)(token|secret|password|passwd)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9+/=_-]{16,}",
}


def secrets_in(text: str) -> list[str]:
    return [kind for kind, pattern in SECRET_PATTERNS.items() if re.search(pattern, text)]


def test_no_secret_in_the_cluster_files():
    files = [path for path in CLUSTER.rglob("*") if path.is_file()] + [REPO_ROOT / ".dockerignore"]
    assert len(files) >= 10
    found = {str(path.relative_to(REPO_ROOT)): secrets_in(path.read_text()) for path in files}
    assert not {path: kinds for path, kinds in found.items() if kinds}
    # the scan finds what it looks for
    assert secrets_in("RAY_AUTH_TOKEN: 3f2a9c0d8e7b6a5f4e3d2c1b0a9f8e7d") and secrets_in("auth_token=Zm9vYmFyYmF6cXV4")
    assert secrets_in("aws_access_key_id = AKIAABCDEFGHIJKLMNOP")


# --- the image -----------------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile in order: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, str]:
    return {dep.split("==")[0].split("[")[0]: dep.split("==")[1] for dep in pyproject()["dependencies"]}


def test_dockerfile_builds_the_project_on_a_ray_gpu_image_with_one_cuda():
    steps = dockerfile()
    (cuda_default,) = [args.split("=", 1)[1] for keyword, args in steps if keyword == "ARG" and "=" in args]
    (base,) = [args for keyword, args in steps if keyword == "FROM"]
    assert re.fullmatch(r"cu\d{3}", cuda_default) and cuda_default in MIN_DRIVER
    # Ray's own image of the pinned Ray, for the Python that pyproject.toml requires, in the chosen CUDA variant
    assert base == f"rayproject/ray:{pins()['ray']}-py311-${{CUDA}}"
    assert pyproject()["requires-python"] == ">=3.11,<3.12"
    runs = [args for keyword, args in steps if keyword == "RUN"]
    (deps,) = [run for run in runs if "pyproject.toml" in run]
    # torch and torchvision from PyTorch's index for the same CUDA, checked after the install
    assert "--index-url https://download.pytorch.org/whl/${CUDA}" in deps and "torch.version.cuda" in deps
    assert ("COPY", "--chown=ray:users . .") in steps
    assert any("pip install --no-cache-dir --no-deps -e ." in run for run in runs)
    make_pin = re.search(r"^XTCOCOTOOLS := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    assert any(f"--no-binary xtcocotools --no-build-isolation {make_pin}" in run for run in runs), "as make installs it"
    assert ("WORKDIR", IMAGE_ROOT) in steps and ("ENV", "RAY_AUTH_MODE=token") in steps
    assert [args for keyword, args in steps if keyword == "USER"][-1] == "ray", "Ray runs as the image's user"
    # the driver that the default CUDA needs is what the docs promise
    for doc in (CLUSTER / "Dockerfile", CLUSTER / "README.md"):
        assert f"driver >= {MIN_DRIVER[cuda_default]}" in doc.read_text(), doc


def test_dockerfile_installs_exactly_the_pins_of_pyproject(tmp_path):
    """Run the Dockerfile's own pin-splitting code on pyproject.toml: torch/torchvision for PyTorch's index, the
    rest for PyPI, every pin once."""
    (deps,) = [args for keyword, args in dockerfile() if keyword == "RUN" and "pyproject.toml" in args]
    code = re.search(r'python -c "(.*?)"', deps).group(1).replace("/tmp/", f"{tmp_path}/")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
    torch_pins = (tmp_path / "torch.txt").read_text().split()
    other_pins = (tmp_path / "deps.txt").read_text().split()
    assert torch_pins == [f"torch=={pins()['torch']}", f"torchvision=={pins()['torchvision']}"]
    assert sorted(torch_pins + other_pins) == sorted(pyproject()["dependencies"])


def dockerignored(path: str) -> bool:
    """Whether `docker build` leaves `path` (relative to the context) out: the last .dockerignore pattern matching
    it or a folder above it decides; `!pattern` takes a path back in."""
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    parts, excluded = path.split("/"), False
    for pattern in [p for p in patterns if p and not p.startswith("#")]:
        keep, glob_ = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        candidates = [glob_, glob_[3:]] if glob_.startswith("**/") else [glob_]
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, c) for prefix in prefixes for c in candidates):
            excluded = not keep
    return excluded


def test_dockerignore_keeps_environments_data_and_runs_out_of_the_image():
    for path in [".git/config", ".venv/lib/python3.11/site-packages/torch/__init__.py", "data/synthetic/x.parquet",
                 "mlruns.db", "mlruns/0/meta.yaml", "mlartifacts/1/a.png", "ray_results/grid/state.json",
                 "outputs/model.pt", "benchmarks/results/latency.json", "querypose/__pycache__/model.cpython-311.pyc"]:  # fmt: skip
        assert dockerignored(path), path
    # what the Dockerfile copies and installs stays in (README.md too: pyproject.toml names it as the readme)
    kept = ["pyproject.toml", "README.md", "Makefile", "cluster/Dockerfile"] + [
        str(path.relative_to(REPO_ROOT))
        for package in ("querypose", "querypose_platform", "experiments", "benchmarks")
        for path in (REPO_ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    ]
    assert len(kept) > 30 and not [path for path in kept if dockerignored(path)]


# --- make gpu-check ------------------------------------------------------------------------------------------


def test_gpu_check_skips_cleanly_without_a_cuda_device(tmp_path):
    report = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device on any machine, this one included
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--json", str(report)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu-check: skipped: no CUDA device" in result.stdout
    content = json.loads(report.read_text())
    assert content["ok"] is True and "no CUDA device" in content["skipped"] and content["steps"] == {}


def test_gpu_check_fails_when_a_gpu_is_there_but_torch_cannot_use_it(tmp_path, monkeypatch):
    import gpu_check
    import torch

    fake = tmp_path / "nvidia-smi"  # a GPU whose driver is too old for torch's CUDA
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 535.54.03, 81559 MiB'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason, failed = gpu_check.why_no_cuda()
    assert failed and "driver 535.54.03" in reason and f"CUDA {torch.version.cuda}" in reason
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_check.why_no_cuda() == ("no CUDA device (CUDA_VISIBLE_DEVICES='' hides every GPU)", False)


def test_make_gpu_check_runs_the_script():
    dry_run = subprocess.run(["make", "-n", "gpu-check"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json" in dry_run.stdout


# --- the autoscaler on a fake multi-node cluster ---------------------------------------------------------------


class FakeAutoscalingCluster(AutoscalingCluster):
    """ray.cluster_utils.AutoscalingCluster with the config given here: the wheel lacks the example file it reads
    (fake_multi_node/example.yaml)."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        empty_launcher_keys = {key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")}  # fmt: skip
        return {
            "cluster_name": "fake-querypose",
            "max_workers": 4,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.05,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },  # fmt: skip
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "file_mounts_sync_continuously": False,
            **empty_launcher_keys,
            "head_node_type": "ray.head.default",
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
            },
            **config_kwargs,
        }


def fake_gpu_nodes(ray) -> list[str]:
    return [node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("fake_gpu")]


def test_grid_scales_fake_gpu_workers_up_from_zero_and_back_down(tmp_path, monkeypatch):
    import ablation_grid
    import ray
    from test_grid import TINY

    ray.shutdown()  # AutoscalingCluster runs `ray stop --force`: the session's local Ray goes first
    bin_dir = Path(sys.executable).parent
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # the autoscaler calls `ray`
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = FakeAutoscalingCluster(
        head_resources={"CPU": 2},
        worker_node_types={
            "fake_gpu": {"resources": {"CPU": 1, "fake_gpu": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}
        },
    )
    cluster.start()
    try:
        ray.init(address="auto", log_to_driver=False)
        assert fake_gpu_nodes(ray) == [], "the GPU type starts at zero nodes"
        code = ablation_grid.main([
            "--config", str(REPO_ROOT / "experiments" / "configs" / "ablation_synthetic.yaml"), *TINY,
            f"data.root={tmp_path / 'shards'}", f"run.storage_path={tmp_path / 'ray_results'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", f"tracking.artifact_location={tmp_path / 'art'}",
            "tune.cells=[{part_dim: 32}]", "scaling.num_workers=2", "train.batch_size=2",
            "scaling.extra_resources={fake_gpu: 1}",
        ])  # fmt: skip
        assert code == 0
        # the checkpoint records the node of each rank: two nodes the autoscaler added for the trainer
        cells = tmp_path / "ray_results" / "ablation_synthetic" / "cells"
        (checkpoint,) = [path for path in glob.glob(str(cells / "*" / "checkpoint_*")) if Path(path).is_dir()]
        ranks = [json.loads((Path(checkpoint) / "data" / f"rank{r}.json").read_text()) for r in (0, 1)]
        head = ray.get_runtime_context().get_node_id()
        assert len({rank["node_id"] for rank in ranks}) == 2 and head not in {rank["node_id"] for rank in ranks}

        deadline = time.time() + 90
        while fake_gpu_nodes(ray) and time.time() < deadline:
            time.sleep(2)
        assert fake_gpu_nodes(ray) == [], "idle GPU nodes are removed after idle_timeout_minutes"
    finally:
        ray.shutdown()
        cluster.shutdown()
