"""The deployment files, checked offline (no Docker engine or cluster here): the
compose file through `docker-compose config` (Debian's docker-compose, installed by
.ci/run), the Kubernetes manifests through kubernetes-validate's bundled schemas, the
Dockerfile's two images, and the bucket init step against a real (moto) S3."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.settings import Settings

from ..helpers.stack import OwnS3

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KNOWN = {name.upper() for name in Settings.model_fields}


# The compose file requires REDIS_PASSWORD (no default): `config` fails without it.
REDIS_PASSWORD = "0123abcd" * 8


def compose_config(path: Path, *, password: str | None = REDIS_PASSWORD,
                   quiet: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose (Debian's package) is needed to check the compose file"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_PASSWORD"}
    if password is not None:
        env["REDIS_PASSWORD"] = password
    return subprocess.run([exe, "-f", str(path), "config", *(["-q"] if quiet else [])],
                          capture_output=True, text=True, cwd=ROOT, env=env)


def test_compose_file_is_valid_and_a_typo_is_caught(tmp_path):
    proc = compose_config(ROOT / "docker-compose.yml")
    assert proc.returncode == 0, proc.stderr
    bad = tmp_path / "docker-compose.yml"
    bad.write_text((ROOT / "docker-compose.yml").read_text().replace(
        "    restart: unless-stopped  # a worker", "    restartt: unless-stopped  # a worker"))
    assert compose_config(bad).returncode != 0
    # A copy (tmp_path has no .env): without REDIS_PASSWORD compose refuses to start.
    plain = tmp_path / "plain" / "docker-compose.yml"
    plain.parent.mkdir()
    plain.write_text((ROOT / "docker-compose.yml").read_text())
    proc = compose_config(plain, password=None)
    assert proc.returncode != 0 and "REDIS_PASSWORD" in proc.stderr, proc.stderr


def test_compose_services_as_an_operator_needs_them():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert set(services) == {"redis", "minio", "init", "api", "worker"}
    for name in ("redis", "minio"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image  # pinned
    assert "ports" not in services["minio"]  # not published
    assert services["api"]["build"]["target"] == services["init"]["build"]["target"] == \
        "gateway"
    assert services["worker"]["build"]["target"] == "worker"
    assert services["init"]["command"] == ["python", "-m", "service.init_storage"]
    for name in ("api", "worker"):
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["depends_on"]["init"]["condition"] == \
            "service_completed_successfully"
        env = services[name]["environment"]
        assert env["S3_CREATE_BUCKET"] == "false"  # only the init step creates it
        for key in env:  # every variable is one our settings read (or AWS's, HF's, torch's)
            assert key in KNOWN or key.startswith(("AWS_", "HF_", "TORCHINDUCTOR_")), key
    worker = services["worker"]
    assert worker["environment"]["REQUIRE_GPU"].endswith(":-true}")
    assert worker["environment"]["MAGICFACE_MODEL"] == "${MAGICFACE_MODEL:-}"  # no default
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "hf-cache:/data/hf" in worker["volumes"]


def test_compose_redis_requires_the_password_and_every_client_sends_it():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    redis = services["redis"]
    assert "ports" not in redis  # not published
    cmd = redis["command"]
    assert cmd[0] == "redis-server" and "--requirepass" in cmd
    # Required (`:?`), never a default a deployment could run with.
    assert cmd[cmd.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?"), cmd
    # The healthcheck authenticates, and wants PONG (redis-cli exits 0 on NOAUTH).
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert "PONG" in " ".join(redis["healthcheck"]["test"])
    users = {name for name, s in services.items() if "REDIS_URL" in s.get("environment", {})}
    assert {"api", "worker"} <= users
    for name in users:
        url = services[name]["environment"]["REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("@redis:6379/0"), \
            (name, url)
    # And as compose resolves it.
    proc = compose_config(ROOT / "docker-compose.yml", quiet=False)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)["services"]
    cmd = resolved["redis"]["command"]
    assert cmd[cmd.index("--requirepass") + 1] == REDIS_PASSWORD
    assert "ports" not in resolved["redis"]
    for name in users:
        assert resolved[name]["environment"]["REDIS_URL"] == \
            f"redis://:{REDIS_PASSWORD}@redis:6379/0", name


def _stages(text: str) -> dict[str, str]:
    parts = text.split("\nFROM ")
    out = {}
    for part in parts[1:]:
        header, _, body = part.partition("\n")
        out[header.split(" AS ")[-1].strip()] = header + "\n" + body
    return out


def test_dockerfile_builds_a_slim_gateway_and_a_gpu_worker():
    text = (ROOT / "Dockerfile").read_text()
    stages = _stages(text)
    assert set(stages) == {"source", "gateway", "worker"}
    gw, wk = stages["gateway"], stages["worker"]
    assert gw.startswith("python:3.11")
    installs = [ln for ln in gw.splitlines() if "pip install" in ln]
    assert installs and not any("torch" in ln for ln in installs)
    assert "pip install --no-deps . ./server" in gw and "requirements-gateway.txt" in gw
    assert 'CMD ["python", "-m", "service"]' in gw and "/healthz" in gw
    # torch is installed before any source is copied: an edit never reinstalls it.
    assert wk.index("pip install -c constraints.txt torch") < wk.index("COPY --from=source")
    assert "COPY --from=source" in gw
    assert 'CMD ["python", "-m", "worker"]' in wk
    assert '"worker.healthcheck"' in wk.split("HEALTHCHECK")[1]
    # The cache volume paths exist in the image and belong to the app user.
    assert "mkdir -p /data/hf" in wk and "chown -R magicface /data" in wk
    assert "USER magicface" in gw and "USER magicface" in wk
    for ln in text.splitlines():
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_pip_install_in_the_images_is_pinned_by_the_constraints():
    text = (ROOT / "Dockerfile").read_text()
    installs = [ln for ln in text.replace("\\\n", " ").splitlines() if "pip install" in ln]
    assert len(installs) == 5, installs  # the last: facenet-pytorch, --no-deps
    for ln in installs:
        assert "-c constraints.txt" in ln or "--no-deps" in ln, ln
        assert "==" not in ln, f"a version literal beside constraints.txt: {ln}"
    for stage in _stages(text).values():
        if "pip install" in stage:
            assert "COPY constraints.txt" in stage or "COPY --from=source" in stage
    assert {"torch", "torchvision", "rq", "fastapi", "diffusers"} <= set(_constraints())


def test_the_worker_image_base_matches_torchs_cuda_build():
    """The worker's CUDA comes from torch's wheels (nvidia-cuda-runtime in the
    constraints). A CUDA base image, if one is used, must be the same major.minor;
    a plain Python base must be the constraints' Python."""
    pins = _constraints()
    cuda = ".".join(pins["nvidia-cuda-runtime"].split(".")[:2])
    base = _stages((ROOT / "Dockerfile").read_text())["worker"].split()[0]
    if base.startswith("nvidia/cuda:"):
        assert base.split(":")[1].startswith(cuda + "."), (base, cuda)
    else:
        assert base.startswith("python:3.11"), base
        wk = _stages((ROOT / "Dockerfile").read_text())["worker"]
        assert "NVIDIA_VISIBLE_DEVICES=all" in wk and "compute" in wk
    # And torch's own pin agrees with the runtime wheels' CUDA (a cu13 torch needs the
    # CUDA 13 runtime; the constraints were frozen from an install that ran).
    assert any(name.endswith("-cu" + cuda.split(".")[0]) for name in pins), sorted(pins)


def test_the_gateway_requirements_are_the_servers_dependencies():
    import tomllib

    server = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())
    deps = {d.replace(" ", "") for d in server["project"]["dependencies"]} - {"magicface"}
    lines = (ROOT / "deploy" / "requirements-gateway.txt").read_text().splitlines()
    listed = {ln.replace(" ", "") for ln in lines if ln.strip() and not ln.startswith("#")}
    assert listed == deps


def _manifests() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(p.read_text()) if doc]


def test_kubernetes_manifests_validate_and_a_typo_is_caught():
    docs = _manifests()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "Job", "ConfigMap", "Secret", "ScaledObject",
            "TriggerAuthentication", "HorizontalPodAutoscaler"} <= kinds
    for _, doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):  # KEDA's CRDs: checked below
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    bad = next(d for _, d in docs if d["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(bad))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


def test_workers_scale_on_the_queue_with_one_gpu_each():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _manifests()}
    config = docs["ConfigMap", "magicface-config"]["data"]
    for key in config:
        assert key in KNOWN, key
    worker = docs["Deployment", "magicface-worker"]["spec"]["template"]["spec"]
    c = worker["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["livenessProbe"]["exec"]["command"] == ["python", "-m", "worker.healthcheck"]
    scaled = docs["ScaledObject", "magicface-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "magicface-worker"
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "redis"
    # KEDA's redis scaler reads listName from the trigger only (no listNameFromEnv), so
    # it is a literal: it must be RQ's list for the ConfigMap's QUEUE_NAME.
    assert trigger["metadata"]["listName"] == f"rq:queue:{config['QUEUE_NAME']}"
    assert trigger["metadata"]["address"].split(":")[0] == "magicface-redis"
    assert ("Service", "magicface-redis") in docs
    job = docs["Job", "magicface-init-storage"]["spec"]["template"]["spec"]
    assert job["containers"][0]["command"] == ["python", "-m", "service.init_storage"]
    gw = docs["Deployment", "magicface-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(gw["resources"])
    hpa = docs["HorizontalPodAutoscaler", "magicface-gateway"]["spec"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"


def _secret_ref(env: dict) -> tuple[str, str] | None:
    ref = env.get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def _containers(docs: dict) -> list[tuple[str, dict]]:
    return [(f"{kind}/{name}/{c['name']}", c) for (kind, name), d in docs.items()
            if kind in ("Deployment", "Job") for c in d["spec"]["template"]["spec"]["containers"]]


def test_kubernetes_redis_requires_the_secrets_password_and_every_client_sends_it():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _manifests()}
    redis = docs["Deployment", "magicface-redis"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in redis["env"]}
    secret = _secret_ref(env["REDIS_PASSWORD"])
    assert secret, "Redis's password comes from a Secret"
    args = redis["args"]
    assert args[0] == "redis-server" and args[args.index("--requirepass") + 1] == \
        "$(REDIS_PASSWORD)", args
    # The probe authenticates, and wants PONG (redis-cli exits 0 on NOAUTH).
    assert env["REDISCLI_AUTH"]["value"] == "$(REDIS_PASSWORD)"
    probe = " ".join(redis["readinessProbe"]["exec"]["command"])
    assert "redis-cli ping" in probe and "PONG" in probe
    service = docs["Service", "magicface-redis"]["spec"]["ports"][0]["port"]
    # Every container with a REDIS_URL builds it from a variable defined (before it) from
    # the same Secret; none gets a password-less one from a ConfigMap or Secret literal.
    for _, d in _manifests():
        if d["kind"] in ("ConfigMap", "Secret"):
            assert "REDIS_URL" not in {**d.get("data", {}), **d.get("stringData", {})}
    users = set()
    for where, c in _containers(docs):
        names = [e["name"] for e in c.get("env", [])]
        if "REDIS_URL" not in names:
            continue
        users.add(where.split("/")[1])
        url = c["env"][names.index("REDIS_URL")]["value"]
        var = url.removeprefix("redis://:").split("@")[0]
        assert var.startswith("$(") and var.endswith(")"), (where, url)
        assert var[2:-1] in names[:names.index("REDIS_URL")], (where, "defined after")
        assert _secret_ref(c["env"][names.index(var[2:-1])]) == secret, where
        assert url.endswith(f"@magicface-redis:{service}/0"), (where, url)
    assert {"magicface-gateway", "magicface-worker"} <= users
    # KEDA authenticates with the same Secret, through a TriggerAuthentication.
    trigger = docs["ScaledObject", "magicface-worker"]["spec"]["triggers"][0]
    assert "password" not in trigger["metadata"]
    auth = docs["TriggerAuthentication", trigger["authenticationRef"]["name"]]["spec"]
    assert {"parameter": "password", "name": secret[0], "key": secret[1]} in \
        auth["secretTargetRef"]
    # The Secret is created by the operator (deploy/README.md), not shipped with a
    # placeholder that re-applying would write over the real password.
    assert ("Secret", secret[0]) not in docs
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert f"kubectl create secret generic {secret[0]}" in readme
    assert f"--from-literal={secret[1]}=" in readme


def test_bucket_init_is_idempotent_against_s3(tmp_path):
    s3 = OwnS3()
    s3.start()
    try:
        env = {**os.environ, "STORAGE_URL": "s3://init-test", "S3_ENDPOINT_URL": s3.url,
               "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-m", "service.init_storage"], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
        import boto3

        client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id="x",
                              aws_secret_access_key="x", region_name="us-east-1")
        assert "init-test" in [b["Name"] for b in client.list_buckets()["Buckets"]]
    finally:
        s3.stop()


@pytest.mark.slow
def test_the_gateway_installs_and_imports_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), "-r",
                    str(ROOT / "deploy" / "requirements-gateway.txt")],
                   check=True, capture_output=True, timeout=900)
    subprocess.run([*pip, "--no-deps", str(ROOT), str(ROOT / "server")], check=True,
                   capture_output=True, timeout=300)
    code = ("import importlib.util as u, service.app as a\n"
            "a.create_app\n"
            "assert u.find_spec('torch') is None, 'torch is installed'\n"
            "assert u.find_spec('diffusers') is None\n")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
