"""Infra files (issue 7): every manifest, config and image recipe under infra/ checked offline.

- KubeRay: RayCluster / RayJob against the CRD schemas vendored from KubeRay v1.7.0
  (infra/schemas/), closed as Kubernetes closes them; the RayJobs carry the RayCluster's spec;
  each entrypoint is loaded through our own typed config loader.
- Deployment / Service against the Kubernetes 1.33 schemas bundled in ``kubernetes-validate``.
- No literal credential, no LoadBalancer / NodePort / Ingress; every Secret used is one the
  README tells you to create, with the keys used.
- Cluster launcher YAML through Ray's own ``prepare_config`` + ``validate_config``.
- Dockerfiles and .dockerignore: structure (no Docker engine here, nothing is built).
- DeepSpeed presets: through ``deepspeed_config`` and DeepSpeed's own config models, and one
  engine step per preset.
- MLflow: the Deployment's ``mlflow server`` arguments run against the lock's MLflow (sqlite,
  loopback) with basic auth and the host check.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from mvcustom.configs import JOB_CONFIGS, EvaluateConfig, PreprocessConfig, TrainConfig, load_config
from mvcustom.configs.base import from_dict
from mvcustom.training.engine import OWNED_KEYS, deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
IMAGE = "ghcr.io/mvcustom/mvcustom:0.1.0"
K8S_VERSION = "1.33"
LOCK = {
    m.group(1).lower(): m.group(2)
    for m in re.finditer(
        r"^([A-Za-z0-9_.\-]+)==(\S+)$", (ROOT / "requirements/constraints-cpu.txt").read_text(), re.M
    )
}
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL", re.I)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[tuple[Path, dict]]:
    files = sorted(KUBERAY.glob("*.yaml")) + sorted((INFRA / "mlflow").glob("*.yaml"))
    return [(f, d) for f in files for d in _docs(f)]


def _walk(node, path=()):
    """Yield ``(path, dict)`` for every mapping in a YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


# ----------------------------------------------------------------------- KubeRay CRD schemas
def _closed(schema):
    """Kubernetes' reading of a structural CRD schema in JSON Schema terms: an object with
    ``properties`` admits no other field (the API server prunes them; ``kubectl apply`` rejects
    them under strict field validation). Nothing in the KubeRay schemas uses
    ``x-kubernetes-preserve-unknown-fields``; the test asserts it."""
    if isinstance(schema, dict):
        assert not schema.get("x-kubernetes-preserve-unknown-fields")
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


_VALIDATORS: dict[str, jsonschema.Draft7Validator] = {}


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    if kind not in _VALIDATORS:
        raw = json.loads((INFRA / "schemas" / f"{kind.lower()}-ray.io-v1.json").read_text())
        schema = _closed(raw)
        # metadata is the API server's (ObjectMeta); check the part we write
        schema["properties"]["metadata"] = {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        }
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        _VALIDATORS[kind] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[kind]


def crd_errors(doc: dict) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(doc["kind"]).iter_errors(doc)
    ]


def _kuberay() -> dict[str, dict]:
    return {f.name: d for f, d in _manifests() if d.get("apiVersion") == "ray.io/v1"}


def _rayjobs() -> dict[str, dict]:
    return {n: d for n, d in _kuberay().items() if d["kind"] == "RayJob"}


def test_kuberay_manifests_validate_against_the_vendored_crds():
    docs = _kuberay()
    assert {d["kind"] for d in docs.values()} == {"RayCluster", "RayJob"}
    for name, doc in docs.items():
        assert crd_errors(doc) == [], name


@pytest.mark.parametrize(
    "path, value, expect",
    [
        (("spec", "headGroupSpec", "serviceTyp"), "ClusterIP", "Additional properties"),  # typo
        (("spec", "workerGroupSpecs", 0, "maxReplicas"), "four", "is not of type 'integer'"),
        (("spec", "authOptions", "mode"), "password", "is not one of"),
        (("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits", "cpu"),
         "lots", "does not match"),
    ],
)  # fmt: skip
def test_crd_schema_rejects_a_broken_raycluster(path, value, expect):
    doc = copy.deepcopy(_kuberay()["raycluster.yaml"])
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    errors = crd_errors(doc)
    assert errors and any(expect in e for e in errors), errors


def test_crd_schema_rejects_missing_required_and_unknown_rayjob_fields():
    job = copy.deepcopy(_rayjobs()["rayjob-train-backbone.yaml"])
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    job["spec"]["shutdownAfterJobFinished"] = True  # the real field ends in -es
    errors = crd_errors(job)
    assert any("'groupName' is a required property" in e for e in errors), errors
    assert any("shutdownAfterJobFinished" in e for e in errors), errors


def test_rayjobs_carry_the_rayclusters_spec_and_kuberays_rules():
    cluster = _kuberay()["raycluster.yaml"]["spec"]
    jobs = _rayjobs()
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in jobs.values()} == {
        "preprocess",
        "train",
        "evaluate",
    }
    for name, job in jobs.items():
        spec = job["spec"]
        assert spec["rayClusterSpec"] == cluster, f"{name}: rayClusterSpec drifted from raycluster.yaml"
        # the rules of KubeRay v1.7.0's ray-operator/controllers/ray/utils/validation.go we rely on
        assert "clusterSelector" not in spec, name  # we chose a cluster per job
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0, name
        assert spec["backoffLimit"] >= 0 and spec["activeDeadlineSeconds"] > 0, name
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", name
        assert "runtimeEnvYAML" not in spec, f"{name}: the image holds everything; nothing installed at start"


def test_raycluster_settings():
    spec = _kuberay()["raycluster.yaml"]["spec"]
    assert spec["rayVersion"] == LOCK["ray"] == "2.60.0"
    assert spec["authOptions"] == {"mode": "token", "secretName": "mvcustom-ray-auth"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress") and "headService" not in head
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0"  # in-pod, behind ClusterIP
    (gpu,) = spec["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] >= 1
    assert spec["enableInTreeAutoscaling"] is True
    pod = gpu["template"]["spec"]
    (worker,) = pod["containers"]
    res = worker["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) >= 1
    assert res["requests"] == res["limits"], "GPU workers: requests = limits (Guaranteed QoS)"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    shm = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert shm[mount["name"]]["emptyDir"]["medium"] == "Memory"
    workdir = _dockerfile_workdir(INFRA / "docker" / "Dockerfile")
    for group in (head, gpu):
        sec = group["template"]["spec"]["securityContext"]
        assert sec["runAsNonRoot"] is True and sec["runAsUser"] == 1000
        (c,) = group["template"]["spec"]["containers"]
        assert c["image"] == IMAGE and c["workingDir"] == workdir
        refs = {r["secretRef"]["name"] for r in c["envFrom"]}
        assert refs == {"mvcustom-s3", "mvcustom-mlflow-client"}
        assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]
        assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]


# ----------------------------------------------------------------------- RayJob entrypoints
def _entrypoint_args(entrypoint: str) -> tuple[str, str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], argv
    module = argv[2]
    assert module.startswith("jobs.") and importlib.util.find_spec(module) is not None, module
    rest, config, sets = argv[3:], None, []
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--config":
            assert config is None
            config = value
        elif flag == "--set":
            sets.append(value)
        else:
            raise AssertionError(f"unexpected argument {flag!r} in {entrypoint!r}")
    assert config and config.startswith("jobs/configs/") and (ROOT / config).is_file(), config
    return module.removeprefix("jobs."), config, sets


def _load_entrypoint(entrypoint: str):
    job, config, sets = _entrypoint_args(entrypoint)
    return load_config(JOB_CONFIGS[job], ROOT / config, sets), sets


def _debug_leaks(cfg, cls) -> list[str]:
    """Fields where the config still holds a value of ``cls.debug()`` that differs from the default."""
    from mvcustom.configs import flatten, to_dict

    debug, default, got = (flatten(to_dict(c)) for c in (cls.debug(), cls(), cfg))
    return [k for k in debug if debug[k] != default[k] and got[k] == debug[k]]


def test_rayjob_entrypoints_load_through_the_typed_configs():
    seen = {}
    for name, job in _rayjobs().items():
        cfg, sets = _load_entrypoint(job["spec"]["entrypoint"])
        seen[name] = cfg
        assert cfg.ray.address == "auto", name
        assert _debug_leaks(cfg, type(cfg)) == [], name
        urls = {"input", "output", "shards", "init_from", "model", "spec"}
        for s in sets:
            key, _, value = s.partition("=")
            if key in urls:
                assert all(
                    u.startswith("s3://") for u in re.findall(r"[\w+.-]+://[^\s,\]]+|[^\s,\[\]]+", value)
                )
    pre = [c for c in seen.values() if isinstance(c, PreprocessConfig)]
    assert {c.source for c in pre} == {"co3d", "webvid"}
    trains = {c.stage: c for c in seen.values() if isinstance(c, TrainConfig)}
    assert set(trains) == {"backbone", "customize"}
    assert trains["customize"].init_from == trains["backbone"].output.rstrip("/") + "/export"
    for c in trains.values():
        assert c.model.size == "sd15" and c.scaling.use_gpu and c.deepspeed.config_file
    (ev,) = [c for c in seen.values() if isinstance(c, EvaluateConfig)]
    assert ev.model == trains["customize"].output + "/export"
    assert ev.metric_models.clip and ev.depth_model and ev.num_gpus > 0  # no tiny random scorers


def test_rayjob_entrypoints_quote_what_a_shell_would_expand():
    """The submitter pod runs the entrypoint through a shell (KubeRay's BuildJobSubmitCommand)."""
    for name, job in _rayjobs().items():
        lex = shlex.shlex(job["spec"]["entrypoint"], posix=False)
        lex.whitespace_split = True
        for token in lex:
            if re.search(r"[*?\[\]$`;&|<>(){}]", token):
                assert token[0] == token[-1] and token[0] in "'\"", f"{name}: unquoted {token!r}"


def test_training_entrypoints_deepspeed_file_loads_for_gpu():
    workdir = _dockerfile_workdir(INFRA / "docker" / "Dockerfile")
    for name, job in _rayjobs().items():
        cfg, _ = _load_entrypoint(job["spec"]["entrypoint"])
        if not isinstance(cfg, TrainConfig):
            continue
        path = cfg.deepspeed.config_file
        assert path.startswith(workdir + "/"), f"{name}: Ray Train workers need an absolute path"
        local = from_dict(
            TrainConfig,
            {
                "deepspeed": {
                    "zero_stage": cfg.deepspeed.zero_stage,
                    "config_file": str(ROOT / path[len(workdir) + 1 :]),
                }
            },
        )
        ds = deepspeed_config(local, torch.device("cuda", 0))
        assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
        _accepted_by_deepspeed(ds)


# ----------------------------------------------------------------------- built-in kinds, secrets
def test_deployment_and_service_validate_against_kubernetes_schemas():
    import kubernetes_validate

    builtin = [(f, d) for f, d in _manifests() if d.get("apiVersion") != "ray.io/v1"]
    assert {d["kind"] for _, d in builtin} == {"Deployment", "Service", "NetworkPolicy"}
    for f, doc in builtin:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION, f
    broken = copy.deepcopy(next(d for _, d in builtin if d["kind"] == "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = copy.deepcopy(next(d for _, d in builtin if d["kind"] == "Deployment"))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_network_policies_fence_every_ray_and_mlflow_pod_to_the_namespace():
    """Ray's internal ports listen on every interface: each Ray and MLflow pod template must be
    selected by a policy that admits only pods of the namespace."""
    policies = [d for _, d in _manifests() if d["kind"] == "NetworkPolicy"]
    assert policies
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress"]
        assert all(src == {"podSelector": {}} for rule in p["spec"]["ingress"] for src in rule["from"])

    def fenced(labels: dict) -> bool:
        return any(
            all(labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())
            for p in policies
        )

    templates = [
        node["template"]["metadata"]["labels"]
        for _, doc in _manifests()
        for _, node in _walk(doc)
        if isinstance(node.get("template"), dict) and "metadata" in node["template"]
    ]
    assert len(templates) >= 3 and all(fenced(t) for t in templates), templates
    assert not fenced({"app.kubernetes.io/name": "something-else"})


def _readme_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the README's ``kubectl create secret generic`` commands."""
    text = (INFRA / "README.md").read_text().replace("\\\n", " ")
    out = {}
    for m in re.finditer(r"kubectl (?:-n \S+ )?create secret generic (\S+)([^\n]*)", text):
        out[m.group(1)] = set(re.findall(r"--from-(?:literal|file)=([A-Za-z0-9_.\-]+)=", m.group(2)))
    return out


def test_no_literal_credentials_no_exposure_and_every_secret_is_documented():
    created = _readme_secrets()
    used: dict[str, set[str]] = {}
    for f, doc in _manifests():
        assert doc["kind"] not in ("Secret", "Ingress", "ConfigMap"), f"{f.name}: {doc['kind']}"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f.name
        for path, node in _walk(doc):
            if "name" in node and "value" in node and path and path[-2:-1] == ("env",):
                assert not SECRETISH.search(node["name"]), f"{f.name}: literal {node['name']}"
            if "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                used.setdefault(ref["name"], set()).add(ref["key"])
            if "secretRef" in node:
                used.setdefault(node["secretRef"]["name"], set())
            if "secretName" in node and isinstance(node["secretName"], str):
                used.setdefault(node["secretName"], set())
            if "items" in node and path and path[-1] == "secret":
                used.setdefault(node["secretName"], set()).update(i["key"] for i in node["items"])
        text = f.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f.name  # an AWS access key id
    assert used, "no Secret referenced at all?"
    for name, keys in used.items():
        assert name in created, f"Secret {name} is used but infra/README.md never creates it"
        assert keys <= created[name], f"Secret {name}: keys {keys - created[name]} not created"
    assert "auth_token" in created["mvcustom-ray-auth"]  # KubeRay's authOptions.secretName key


# ----------------------------------------------------------------------- cluster launcher
def _launcher() -> dict:
    return yaml.safe_load((INFRA / "launcher" / "aws.yaml").read_text())


def test_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _launcher()
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before touching AWS
    broken = copy.deepcopy(cfg)
    broken["docker"]["run_option"] = []  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_launcher_settings():
    cfg = _launcher()
    assert cfg["docker"]["image"] == IMAGE
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    for key in ("file_mounts", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "initialization_commands", "cluster_synced_files"):  # fmt: skip
        assert not cfg[key], f"{key}: the image holds everything, no secrets are mounted"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    region = cfg["provider"]["region"]
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        line = next(c for c in cmds if "node_secrets.py" in c)
        assert f"--region {region}" in line and "ray start" in line
    gpu = cfg["available_node_types"]["gpu"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0
    assert (INFRA / "launcher" / "node_secrets.py").is_file()


def test_node_secrets_writes_private_files_from_secrets_manager(tmp_path, monkeypatch):
    import moto  # pinned (test extra): a broken install must fail, not skip

    spec = importlib.util.spec_from_file_location("node_secrets", INFRA / "launcher" / "node_secrets.py")
    node_secrets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node_secrets)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    monkeypatch.setenv("HOME", str(tmp_path))
    value = {
        "ray_auth_token": "tok-123\n",
        "MLFLOW_TRACKING_PASSWORD": "p w'$x",
        "MLFLOW_TRACKING_USERNAME": "jobs",
    }
    with moto.mock_aws():
        import botocore.session

        sm = botocore.session.get_session().create_client("secretsmanager", region_name="us-west-2")
        sm.create_secret(Name="mvcustom/ray-cluster", SecretString=json.dumps(value))
        sm.create_secret(Name="bad", SecretString=json.dumps({"ray_auth_token": "t", "not-env": "x"}))
        assert node_secrets.main(["--secret-id", "mvcustom/ray-cluster", "--region", "us-west-2"]) == 0
        with pytest.raises(ValueError, match="environment variable names"):
            node_secrets.main(["--secret-id", "bad", "--region", "us-west-2"])
    token, env = tmp_path / ".ray" / "auth_token", tmp_path / ".mvcustom" / "env"
    assert token.read_text() == "tok-123"
    assert token.stat().st_mode & 0o777 == 0o600 and env.stat().st_mode & 0o777 == 0o600
    out = subprocess.run(
        [
            "bash",
            "-c",
            f'set -a && . {env} && set +a && printf %s "$MLFLOW_TRACKING_PASSWORD|$MLFLOW_TRACKING_USERNAME"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "p w'$x|jobs"


# ----------------------------------------------------------------------- Dockerfiles
def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def _dockerfile_workdir(path: Path) -> str:
    return [arg for ins, arg in _instructions(path) if ins == "WORKDIR"][-1].strip()


def _check_common_dockerfile(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    for kind, arg in ins:
        if kind in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", arg) or [arg.split("=")[0].strip()]
            assert not any(SECRETISH.search(n) for n in names), f"{path.name}: {kind} {arg}"
        assert kind != "ADD", f"{path.name}: ADD fetches and unpacks; use COPY"
    users = [i for i, (k, _) in enumerate(ins) if k == "USER"]
    assert users, f"{path.name}: no USER"
    user = ins[users[-1]][1].strip()
    assert user not in ("root", "0") and not user.startswith("0:"), user
    last_run = max(i for i, (k, _) in enumerate(ins) if k == "RUN")
    assert users[-1] > last_run, f"{path.name}: USER must come after the installs"
    return ins


def test_dockerfile_structure():
    path = INFRA / "docker" / "Dockerfile"
    ins = _check_common_dockerfile(path)
    args = dict(a.split("=", 1) if "=" in a else (a, None) for k, a in ins if k == "ARG")
    (base,) = [a for k, a in ins if k == "FROM"]
    base = args[base.strip()[2:-1]] if base.startswith("${") else base
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?(runtime|devel)-ubuntu\d\d\.\d\d", base), base
    assert args["TORCH_VERSION"] == LOCK["torch"] == "2.13.0"
    assert "TORCH_INDEX_URL" in args  # the PyTorch CUDA index, a build arg
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert '--index-url "$TORCH_INDEX_URL"' in runs and "torch==${TORCH_VERSION}" in runs
    assert "pip install -c requirements/constraints-cpu.txt" in runs and "pip check" in runs
    assert "python3.11" in runs and "g++" in runs
    assert "useradd" in runs and "--uid 1000" in runs
    # DreamSim (metric_models.distance=dreamsim) with the torchvision build matching torch
    assert '"torchvision==${TORCHVISION_VERSION}" --index-url "$TORCH_INDEX_URL"' in runs
    assert args["DREAMSIM_VERSION"] and '"dreamsim==${DREAMSIM_VERSION}"' in runs
    # ... and its checkpoints where the at-scale evaluation config looks for them
    at_scale = yaml.safe_load((ROOT / "jobs" / "configs" / "evaluate_sd15.yaml").read_text())
    assert at_scale["metric_models"]["distance"] == "dreamsim"
    assert args["DREAMSIM_WEIGHTS_DIR"] == at_scale["metric_models"]["dreamsim"]
    assert "dreamsim(pretrained=True" in runs and "cache_dir=sys.argv[1]" in runs
    assert _dockerfile_workdir(path) == "/app"
    envs = " ".join(a for k, a in ins if k == "ENV")
    assert "RAY_USAGE_STATS_ENABLED=0" in envs  # as the launcher's ray start --disable-usage-stats
    # the lock's pin admits the CUDA build (PEP 440: no local label in the specifier)
    from packaging.specifiers import SpecifierSet

    assert "2.13.0+cu128" in SpecifierSet(f"=={LOCK['torch']}")


def test_mlflow_dockerfile_structure():
    ins = _check_common_dockerfile(INFRA / "mlflow" / "Dockerfile")
    (base,) = [a for k, a in ins if k == "FROM"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert f'"mlflow[auth]=={LOCK["mlflow"]}"' in runs and "-c /tmp/constraints.txt" in runs
    assert "flask-wtf" in LOCK  # the [auth] extra's package is in the lock, so the version is pinned
    assert "psycopg2-binary==" in runs and "pip check" in runs


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching (patterns relative to the context root; ``**`` spans
    directories; a match excludes everything below it)."""
    p = pattern.strip().lstrip("/")
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(f"^{out}(?:/.*)?$")


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        if _dockerignore_regex(p.lstrip("!")).match(path):
            ignored = not neg
    return ignored


def test_dockerignore_mirrors_submit_excludes_and_keeps_the_code():
    sys.path.insert(0, str(INFRA))
    try:
        from submit import EXCLUDES
    finally:
        sys.path.remove(str(INFRA))
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for ex in EXCLUDES:
        name = ex.rstrip("/").removeprefix("**/").lstrip("/")
        expected = {f"/{name}"} if ex.startswith("/") else {f"**/{name}"}
        assert expected & set(patterns), f"{ex}: no {expected} in .dockerignore"
    for path in (".venv/bin/python", ".git/config", "mvcustom/__pycache__/x.pyc", "jobs/x.db", "runs/a",
                 ".demo/data/co3d", "data/x.mp4", "a/b/c.safetensors", "mvcustom.egg-info/PKG-INFO",
                 "x/.env", "keys/id.pem", "mlruns/0/meta.yaml"):  # fmt: skip
        assert _dockerignored(path, patterns), path
    for path in ("mvcustom/data/reader.py", "mvcustom/data/generator/__init__.py", "pyproject.toml",
                 "README.md", "requirements/constraints-cpu.txt", "jobs/configs/train_backbone_sd15.yaml",
                 "infra/deepspeed/zero2.json", "infra/launcher/node_secrets.py", "pipelines/shards.py"):  # fmt: skip
        assert not _dockerignored(path, patterns), path


# ----------------------------------------------------------------------- DeepSpeed presets
PRESETS = {"zero0": (0, False), "zero2": (2, False), "zero2_offload": (2, True), "zero3": (3, False)}


def _preset_cfg(name: str, **deepspeed) -> TrainConfig:
    stage, offload = PRESETS[name]
    ds = {
        "zero_stage": stage,
        "offload_optimizer": offload,
        "config_file": str(INFRA / "deepspeed" / f"{name}.json"),
    }
    return from_dict(TrainConfig, {"preset": "debug", "deepspeed": {**ds, **deepspeed}}, "test")


def _accepted_by_deepspeed(ds: dict) -> None:
    """DeepSpeed's own config parsing (no process group needed), plus the strict ZeRO model."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert "auto" not in json.dumps(ds)
    DeepSpeedZeroConfig(**ds["zero_optimization"])  # pydantic, extra keys forbidden
    parsed = DeepSpeedConfig(copy.deepcopy(ds))
    assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]
    # DeepSpeed ignores unknown top-level keys silently: every key must be one it defines
    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    known |= {
        "zero_optimization",
        "bf16",
        "fp16",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
    }
    assert set(ds) <= known, set(ds) - known


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_loads_through_deepspeed_config(name):
    raw = json.loads((INFRA / "deepspeed" / f"{name}.json").read_text())
    cfg = _preset_cfg(name, raw_override={"zero_optimization": {"reduce_bucket_size": 12345}})
    for device, bf16 in ((torch.device("cpu"), False), (torch.device("cuda", 0), True)):
        ds = deepspeed_config(cfg, device)
        _accepted_by_deepspeed(ds)
        assert ds["bf16"]["enabled"] is bf16  # "auto" -> the typed precision on that device
        assert ds["train_micro_batch_size_per_gpu"] == cfg.batch_size
        assert ds["gradient_accumulation_steps"] == cfg.optim.grad_accum
        assert ds["gradient_clipping"] == cfg.optim.grad_clip
        assert ds["zero_optimization"]["reduce_bucket_size"] == 12345  # raw_override still wins
        for key, value in raw["zero_optimization"].items():  # the preset's tuning arrives
            if key not in ("stage", "offload_optimizer", "reduce_bucket_size"):
                assert ds["zero_optimization"][key] == value, key
    if PRESETS[name][1]:
        assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    if name == "zero3":  # the typed debug value of stage3_max_reuse_distance is kept
        assert ds["zero_optimization"]["stage3_max_reuse_distance"] == 0


def test_presets_own_keys_are_auto_and_their_stage_is_explicit():
    owned = {k for k, _ in OWNED_KEYS}
    for name, (stage, _) in PRESETS.items():
        raw = json.loads((INFRA / "deepspeed" / f"{name}.json").read_text())
        assert raw["zero_optimization"]["stage"] == stage, name
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert raw[key] == "auto", (name, key)
        assert raw["bf16"]["enabled"] == "auto", name
        assert "zero_optimization.stage" in owned


@pytest.mark.parametrize(
    "name, override, key, set_key",
    [
        ("zero2", {"zero_stage": 3}, "zero_optimization.stage", "deepspeed.zero_stage"),
        ("zero2_offload", {"offload_optimizer": False}, "zero_optimization.offload_optimizer.device",
         "deepspeed.offload_optimizer"),
    ],
)  # fmt: skip
def test_preset_contradicting_the_typed_config_is_refused(name, override, key, set_key):
    with pytest.raises(ValueError) as e:
        deepspeed_config(_preset_cfg(name, **override), torch.device("cpu"))
    msg = str(e.value)
    assert f"{name}.json" in msg and key in msg and f"--set {set_key}" in msg and "typed config" in msg


def test_preset_file_values_checked_and_read_through_fsspec():
    import fsspec

    base = json.loads((INFRA / "deepspeed" / "zero2.json").read_text())
    cfg_of = lambda url: from_dict(TrainConfig, {"preset": "debug", "deepspeed": {"config_file": url}}, "t")  # noqa: E731
    cases = {
        "same.json": ({"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1}, None),  # equal values pass
        "micro.json": ({"train_micro_batch_size_per_gpu": 4}, ("train_micro_batch_size_per_gpu", "4", "1", "batch_size")),
        "clip.json": ({"gradient_clipping": 0.5}, ("gradient_clipping", "0.5", "1.0", "optim.grad_clip")),
        "bf16.json": ({"bf16": {"enabled": True}}, ("bf16.enabled", "True", "False", "deepspeed.precision")),
        "fp16.json": ({"fp16": {"enabled": True}}, ("fp16.enabled", "True", "False", "deepspeed.precision")),
        "int_bool.json": ({"bf16": {"enabled": 0}}, ("bf16.enabled", "0", "False", "deepspeed.precision")),
    }  # fmt: skip
    for fname, (over, expect) in cases.items():
        url = f"memory://presets/{fname}"
        with fsspec.open(url, "w") as f:
            json.dump({**base, **over}, f)
        if expect is None:
            ds = deepspeed_config(cfg_of(url), torch.device("cpu"))
            assert (
                ds["train_micro_batch_size_per_gpu"] == 1 and ds["zero_optimization"]["overlap_comm"] is True
            )
            continue
        with pytest.raises(ValueError) as e:
            deepspeed_config(cfg_of(url), torch.device("cpu"))
        key, file_value, typed, set_key = expect
        msg = str(e.value)
        assert (
            url in msg and key in msg and file_value in msg and typed in msg and f"--set {set_key}" in msg
        ), msg
    with pytest.raises(ValueError, match="not found"):
        deepspeed_config(cfg_of("memory://presets/missing.json"), torch.device("cpu"))


@pytest.mark.slow
def test_every_preset_builds_an_engine_and_steps(tmp_path):
    """One rank, CPU, gloo, in a subprocess (its process group must not leak into other tests)."""
    script = tmp_path / "step.py"
    script.write_text(
        f"""
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", DS_ACCELERATOR="cpu")
sys.path.insert(0, {str(ROOT)!r})
import deepspeed, torch
from tests.test_infra import _preset_cfg, PRESETS
from mvcustom.training.engine import deepspeed_config
deepspeed.init_distributed(dist_backend="gloo")
out = {{}}
for name in sorted(PRESETS):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=deepspeed_config(_preset_cfg(name), torch.device("cpu")))
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    out[name] = {{"stage": engine.zero_optimization_stage(), "offload": bool(engine.zero_use_cpu_optimizer()),
                 "losses": losses}}
print("RESULT " + json.dumps(out))
"""
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=400, cwd=ROOT
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[7:])
    for name, (stage, offload) in PRESETS.items():
        assert out[name]["stage"] == stage and out[name]["offload"] is offload, (name, out[name])
        assert out[name]["losses"][-1] < out[name]["losses"][0], (name, out[name])


# ----------------------------------------------------------------------- MLflow server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_deployment() -> dict:
    return next(d for d in _docs(INFRA / "mlflow" / "mlflow.yaml") if d["kind"] == "Deployment")


def _render_auth_ini(tmp_path: Path, db_uri: str) -> Path:
    text = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    settings = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "${MLFLOW_AUTH_DATABASE_URI}" in settings and not re.search(r"://[^$\s]*:[^@\s]+@", settings)
    out = tmp_path / "basic_auth.ini"
    out.write_text(text.replace("${MLFLOW_AUTH_DATABASE_URI}", db_uri))
    return out


def test_mlflow_deployment_settings(tmp_path, monkeypatch):
    from mlflow.cli import server
    from mlflow.server.auth.config import read_auth_config

    (c,) = _mlflow_deployment()["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[:3] == ["server", "--app-name", "basic-auth"] and "--serve-artifacts" in args
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")
    assert args[args.index("--host") + 1] == "0.0.0.0"
    env = {e["name"]: e for e in c["env"]}
    # --backend-store-uri is read from this env var by MLflow itself (click's envvar)
    (opt,) = [p for p in server.params if "--backend-store-uri" in p.opts]
    assert opt.envvar == "MLFLOW_BACKEND_STORE_URI" and "secretKeyRef" in env[opt.envvar]["valueFrom"]
    assert "secretKeyRef" in env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "auth-config")
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == mount["mountPath"] + "/basic_auth.ini"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    pod = _mlflow_deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    ini = _render_auth_ini(tmp_path, "postgresql://mlflow:pw@db:5432/mlflow_auth")
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-secret")
    auth = read_auth_config()
    assert auth.database_uri.startswith("postgresql://") and auth.admin_username == "admin"
    assert auth.admin_password == "from-the-secret" and auth.default_permission == "READ"


@pytest.mark.slow
def test_mlflow_server_runs_the_deployments_arguments(tmp_path):
    """The Deployment's own ``mlflow server`` arguments, with only the URIs and the bind address
    swapped for local ones: basic auth refuses anonymous calls, admits the admin, and the host
    check admits the Service's name but not a stranger's."""
    (c,) = _mlflow_deployment()["spec"]["template"]["spec"]["containers"]
    args = list(c["args"])
    port = _free_port()
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    args[args.index("--workers") + 1] = "1"
    args[args.index("--artifacts-destination") + 1] = (tmp_path / "artifacts").as_uri()
    password = "admin-pw-for-this-test-only"
    # the pod's environment, built from the manifest: a Secret key the Deployment forgets to pass
    # makes the server fail here as it would in the pod
    from_secret = {
        "backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "admin-password": password,
        "flask-secret-key": "csrf-key-for-this-test-only",
    }
    local = {
        "MLFLOW_AUTH_CONFIG_PATH": str(_render_auth_ini(tmp_path, f"sqlite:///{tmp_path / 'auth.db'}")),
        "HOME": str(tmp_path),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for e in c["env"]:
        if "valueFrom" in e:
            env[e["name"]] = from_secret[e["valueFrom"]["secretKeyRef"]["key"]]
        else:
            env[e["name"]] = local.get(e["name"], e["value"])
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == local["MLFLOW_AUTH_CONFIG_PATH"]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(mlflow_bin), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)  # fmt: skip

    def get(path, host="mlflow:5000", user=None):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
        if user:
            req.add_header("Authorization", "Basic " + b64encode(f"{user[0]}:{user[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        deadline = time.time() + 120
        while True:
            try:
                if get("/health", host=f"127.0.0.1:{port}") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(search) == 401
        assert get(search, user=("admin", "wrong")) == 401
        assert get(search, user=("admin", password)) == 200
        assert get(search, host="localhost:5000", user=("admin", password)) == 200  # port-forward
        assert get(search, host="evil.example.com", user=("admin", password)) in (400, 403)
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """End the server and its workers (its own process group, started by this test)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.poll()
