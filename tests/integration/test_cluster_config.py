"""Cluster deployment files, checked offline: cluster.yaml by Ray's own autoscaler validator, the
KubeRay manifests against KubeRay's CRD schemas, the runtime_env by Ray's RuntimeEnv, the RayService's
Serve config against deploy/serve.yaml, and deploy/submit.sh against the tlcr CLI parser.

    .venv/bin/python -m pytest tests/test_cluster_config.py -q
"""
from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "tests" / "data" / "kuberay-crds"
KUBERAY = REPO / "deploy" / "kuberay"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --- cluster.yaml -------------------------------------------------------------------------------

def test_cluster_yaml_passes_ray_autoscaler_validation():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(REPO / "cluster.yaml")
    # The raw file against Ray's schema first: prepare_config fills defaults that could hide a typo.
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_cluster_yaml_scales_a100_workers_from_zero_with_token_auth():
    import ray

    cfg = _load(REPO / "cluster.yaml")
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert not head["resources"].get("GPU")
    (worker_name, worker), = [(k, v) for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert worker["node_config"]["InstanceType"] == "p4de.24xlarge"  # 8x A100-80GB: what a100-7b.yaml is sized for
    assert worker["resources"]["GPU"] == 8
    assert worker["min_workers"] == 0
    assert worker["max_workers"] == cfg["max_workers"] > 0
    assert cfg["idle_timeout_minutes"] > 0
    # The image's Ray and Python must match the client's, or ray up / job submit break across them.
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options
    token_path = run_options.split("RAY_AUTH_TOKEN_PATH=")[1].split()[0]
    assert token_path in cfg["file_mounts"], "the token file the nodes read must be mounted"
    assert any('tlcr-ray[gpu]' in c for c in cfg["setup_commands"])
    # Every value a user must set is marked.
    assert (REPO / "cluster.yaml").read_text().count("CHANGE ME") >= 5


# --- runtime_env and submit.sh ------------------------------------------------------------------

def test_runtime_env_is_a_valid_ray_runtime_env_with_token_auth():
    from ray.runtime_env import RuntimeEnv

    raw = _load(REPO / "deploy" / "runtime_env.yaml")
    env = RuntimeEnv(**raw)
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"
    assert env["working_dir"] == "."
    assert ".venv/" in env["excludes"]


@pytest.mark.parametrize("stage_args", [
    ["label", "--config", "configs/a100-7b.yaml"],
    ["sft", "--config", "configs/a100-7b.yaml"],
    ["train-disc", "--config", "configs/a100-7b.yaml"],
    ["train-rm", "--config", "configs/a100-7b.yaml"],
    ["ppo", "--config", "configs/a100-7b.yaml", "--set", "reward.mode=fixed"],
    ["eval", "disc", "--config", "configs/a100-7b.yaml"],
    ["pipeline", "--config", "configs/a100-7b.yaml"],
])
def test_submit_sh_builds_a_ray_job_submit_the_cli_accepts(stage_args):
    import shlex

    from tlcr_ray.cli import build_parser

    env = {**os.environ, "TLCR_DRY_RUN": "1", "RAY_ADDRESS": "http://10.0.0.1:8265"}
    env.pop("RAY_AUTH_MODE", None)
    out = subprocess.run(["bash", "deploy/submit.sh", *stage_args], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    argv = shlex.split(out)
    assert argv[:3] == ["ray", "job", "submit"]
    sep = argv.index("--")
    flags = argv[3:sep]
    assert flags[flags.index("--address") + 1] == "http://10.0.0.1:8265"
    assert flags[flags.index("--runtime-env") + 1] == "deploy/runtime_env.yaml"
    assert argv[sep + 1:sep + 4] == ["python", "-m", "tlcr_ray.cli"]
    args = build_parser().parse_args(argv[sep + 4:])
    assert args.command == stage_args[0]


def test_submit_sh_rejects_an_unknown_stage():
    proc = subprocess.run(["bash", "deploy/submit.sh", "train-everything"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown stage 'train-everything'" in proc.stderr


# --- KubeRay manifests --------------------------------------------------------------------------

def _k8s_schema(node):
    """A CRD's OpenAPI v3 schema as JSON Schema: int-or-string accepts both; unknown fields are
    errors unless the schema preserves them (what `kubectl apply --validate=strict` does)."""
    if isinstance(node, list):
        return [_k8s_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _k8s_schema(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache
def _crd_spec_validator(kind_plural: str, version: str = "v1") -> jsonschema.Draft7Validator:
    # The C loader: the CRDs are ~1 MB of YAML each. No check_schema(): it alone takes ~25 s here.
    crd = yaml.load(gzip.open(CRDS / f"ray.io_{kind_plural}.yaml.gz"), Loader=yaml.CSafeLoader)
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(_k8s_schema(ver["schema"]["openAPIV3Schema"]["properties"]["spec"]))


def _ray_containers(cluster_spec: dict):
    yield cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["template"]["spec"]["containers"][0]


def _assert_token_from_secret(env: list[dict], secret: dict):
    by_name = {e["name"]: e for e in env}
    assert by_name["RAY_AUTH_MODE"]["value"] == "token"
    ref = by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


def _assert_autoscaled_gpu_cluster(cluster_spec: dict, secret: dict):
    assert cluster_spec["enableInTreeAutoscaling"] is True
    assert cluster_spec["rayVersion"] == __import__("ray").__version__
    _assert_token_from_secret(cluster_spec["autoscalerOptions"]["env"], secret)
    for container in _ray_containers(cluster_spec):
        _assert_token_from_secret(container["env"], secret)
    gpu_groups = [g for g in cluster_spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] < group["maxReplicas"]


@pytest.fixture(scope="module")
def secret() -> dict:
    doc = _load(KUBERAY / "auth-secret.example.yaml")
    assert doc["kind"] == "Secret" and doc["apiVersion"] == "v1"
    return doc


def test_the_schema_check_catches_bad_manifests():
    """The validator itself: a typo, a wrong type and a missing required field are all errors."""
    validator = _crd_spec_validator("rayjobs")
    good = _load(KUBERAY / "rayjob.yaml")["spec"]
    validator.validate(good)
    for breakage in (lambda s: s.update(entrypiont=s.pop("entrypoint")),
                     lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="two"),
                     lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName")):
        bad = copy.deepcopy(good)
        breakage(bad)
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)


def test_rayjob_manifest_validates_and_runs_ppo_with_autoscaled_gpus(secret):
    doc = _load(KUBERAY / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["metadata"]["name"]
    _crd_spec_validator("rayjobs").validate(doc["spec"])
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m tlcr_ray.cli ppo --config configs/a100-7b.yaml")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The working_dir is the repository copy inside the image, uploaded from the submitter pod.
    working_dir = runtime_env.pop("working_dir")
    assert f"COPY --chown=ray:users . {working_dir}\n" in (KUBERAY / "Dockerfile").read_text()
    from ray.runtime_env import RuntimeEnv

    assert RuntimeEnv(**runtime_env)["env_vars"]["RAY_AUTH_MODE"] == "token"
    _assert_token_from_secret(spec["submitterPodTemplate"]["spec"]["containers"][0]["env"], secret)
    _assert_autoscaled_gpu_cluster(spec["rayClusterSpec"], secret)


def _serve_applications(config: dict) -> dict[str, dict]:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # Ray's own check of a Serve config file
    return {app["name"]: app for app in config["applications"]}


def test_rayservice_manifest_validates_and_serves_the_token_reward_api(secret):
    doc = _load(KUBERAY / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    _crd_spec_validator("rayservices").validate(doc["spec"])
    _assert_autoscaled_gpu_cluster(doc["spec"]["rayClusterConfig"], secret)
    for container in _ray_containers(doc["spec"]["rayClusterConfig"]):
        assert {"name": "TLCR_API_KEY", "valueFrom": {"secretKeyRef": {"name": "tlcr-ray-auth", "key": "api_key"}}} \
            in container["env"], "the API's bearer key must come from the Secret"
    (app,) = _serve_applications(yaml.safe_load(doc["spec"]["serveConfigV2"])).values()
    # The overrides are real config keys with values the Serve app accepts; each scorer has a GPU.
    from serve.app import validate
    from tlcr_ray.config import load_config

    cfg = load_config(REPO / "configs" / Path(app["args"]["config"]).name, app["args"]["overrides"])
    validate(cfg.serve)
    scorer = next(d for d in app["deployments"] if d["name"] == "Scorer")
    assert scorer["ray_actor_options"]["num_gpus"] >= 1
    assert scorer["max_ongoing_requests"] >= cfg.serve.max_batch_size, "Serve would cap every batch"
    gpu_group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert scorer["autoscaling_config"]["max_replicas"] <= gpu_group["maxReplicas"]


def test_rayservice_serves_the_same_application_as_deploy_serve_yaml():
    local = _serve_applications(_load(REPO / "deploy" / "serve.yaml"))
    service = _serve_applications(yaml.safe_load(_load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"]))
    assert local.keys() == service.keys()
    for name, app in service.items():
        for key in ("import_path", "route_prefix"):
            assert app.get(key) == local[name].get(key), f"{name}.{key} differs from deploy/serve.yaml"
        # Paths and sizes differ between a laptop and the cluster; which args and deployment
        # settings exist must not.
        assert set(app.get("args", {})) <= set(local[name].get("args", {})) | {"config", "checkpoint", "overrides"}
        shape = lambda a: {d["name"]: sorted(d) for d in a.get("deployments", [])}  # noqa: E731
        assert shape(app) == shape(local[name])


# --- the configs' resource requests against the cluster -----------------------------------------

GROUPS = ("rollout", "reward", "reference", "learner")


def _nodes_needed(ppo, node_cpus: float, node_gpus: float) -> int:
    """Identical nodes needed for the placement groups `tlcr_ray.placement` lays out, in its order: a
    STRICT_PACK group takes one node whole, a PACK group's bundles go first-fit."""
    from tlcr_ray.placement import ppo_placement

    node = {"CPU": node_cpus, "GPU": node_gpus}
    free: list[dict[str, float]] = []

    def fits(room, need):
        return all(room.get(k, 0.0) + 1e-9 >= v for k, v in need.items())

    def place(need, what):
        assert fits(node, need), f"{what} asks {need}, more than one node holds"
        room = next((r for r in free if fits(r, need)), None)
        if room is None:
            free.append(room := dict(node))
        for k, v in need.items():
            room[k] = room.get(k, 0.0) - v

    for pg in ppo_placement(ppo, "vllm", nodes=[node]).groups:
        if pg.strategy == "STRICT_PACK":
            total: dict[str, float] = {}
            for b in pg.bundles:
                for k, v in b.items():
                    total[k] = total.get(k, 0.0) + v
            place(total, pg.name)
        else:
            for b in pg.bundles:
                place(b, pg.name)
    return len(free)


@pytest.mark.parametrize("name, nodes", [("a100-7b.yaml", 1), ("a100-7b-2node.yaml", 2)])
def test_a100_ppo_configs_fit_the_cluster_they_are_deployed_on(name, nodes):
    from tlcr_ray.config import load_config

    ppo = load_config(REPO / "configs" / name).ppo
    cluster = _load(REPO / "cluster.yaml")
    worker = cluster["available_node_types"]["gpu_8x_a100"]["resources"]
    for group in GROUPS:
        assert getattr(ppo, group).num_gpus > 0, f"ppo.{group} should run on a GPU on the cluster"
    if ppo.colocate == "none":
        assert ppo.rollout.num_gpus >= ppo.vllm_tensor_parallel, "a vLLM engine needs a GPU per tensor-parallel rank"
        # The learner's collective stays inside one node (NVLink): its whole group fits on one.
        assert ppo.learner.num_actors * ppo.learner.num_gpus <= worker["GPU"]
        assert ppo.learner.num_actors * ppo.learner.num_cpus <= worker["CPU"]
    else:  # one bundle per GPU of one node
        assert ppo.learner.num_actors == worker["GPU"]
    needed = _nodes_needed(ppo, worker["CPU"], worker["GPU"])
    assert needed == nodes, f"{name}: PPO needs {needed} nodes"
    assert needed <= cluster["max_workers"], f"PPO needs {needed} nodes, cluster.yaml allows {cluster['max_workers']}"
    job_group = _load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = job_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert _nodes_needed(ppo, float(limits["cpu"]), float(limits["nvidia.com/gpu"])) <= job_group["maxReplicas"]


def test_rayjob_and_cluster_yaml_name_both_a100_layouts():
    text = (KUBERAY / "rayjob.yaml").read_text()
    assert "configs/a100-7b.yaml" in text and "configs/a100-7b-2node.yaml" in text and "--dry-run" in text
    assert "configs/a100-7b-2node.yaml" in (REPO / "cluster.yaml").read_text()


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml"])
def test_laptop_configs_have_the_same_shape_and_ask_for_no_gpu(name):
    from tlcr_ray.config import load_config

    ppo = load_config(REPO / "configs" / name).ppo
    for group in GROUPS:
        assert getattr(ppo, group).num_gpus == 0, f"{name}: ppo.{group} asks for a GPU"
    assert _nodes_needed(ppo, node_cpus=4, node_gpus=0) == 1, f"{name}: PPO should fit one 4-CPU laptop"


# AWS instance type -> the GPU kind `tlcr plan` knows (8 GPUs each).
INSTANCE_GPUS = {"p4d.24xlarge": "a100-40gb", "p4de.24xlarge": "a100-80gb", "p5.48xlarge": "h100-80gb",
                 "p5en.48xlarge": "h200-141gb"}


def test_a100_config_fits_the_gpu_memory_of_the_cluster_worker():
    """Every stage of configs/a100-7b.yaml fits the worker's GPUs by `tlcr plan`, and the config's `gpu`
    (what the stages check themselves against before starting) names that worker's GPU."""
    from tlcr_ray.config import load_config
    from tlcr_ray.plan import format_table, gpu_bytes, plan

    cfg = load_config(REPO / "configs" / "a100-7b.yaml")
    worker = _load(REPO / "cluster.yaml")["available_node_types"]["gpu_8x_a100"]
    assert cfg.gpu == INSTANCE_GPUS[worker["node_config"]["InstanceType"]]
    report = plan(cfg, gpu_bytes(cfg.gpu), gpu=cfg.gpu)
    assert report["fits"], format_table(report, "configs/a100-7b.yaml")
    for name, group in report["groups"].items():  # 10% left for the allocator and the estimate's error
        assert group["margin"] >= 0.1 * report["gpu_memory_bytes"], f"{name}: " + format_table(report)
