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


def compose_config(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose (Debian's package) is needed to check the compose file"
    return subprocess.run([exe, "-f", str(path), "config", "-q"], capture_output=True,
                          text=True, cwd=ROOT)


def test_compose_file_is_valid_and_a_typo_is_caught(tmp_path):
    proc = compose_config(ROOT / "docker-compose.yml")
    assert proc.returncode == 0, proc.stderr
    bad = tmp_path / "docker-compose.yml"
    bad.write_text((ROOT / "docker-compose.yml").read_text().replace(
        "    restart: unless-stopped  # a worker", "    restartt: unless-stopped  # a worker"))
    assert compose_config(bad).returncode != 0


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
    assert len(installs) == 4, installs
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
            "HorizontalPodAutoscaler"} <= kinds
    for _, doc in docs:
        if doc["kind"] == "ScaledObject":  # a KEDA CRD: checked below
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
    assert trigger["metadata"]["listName"] == f"rq:queue:{config['QUEUE_NAME']}"
    assert trigger["metadata"]["address"].split(":")[0] == "magicface-redis"
    assert ("Service", "magicface-redis") in docs
    job = docs["Job", "magicface-init-storage"]["spec"]["template"]["spec"]
    assert job["containers"][0]["command"] == ["python", "-m", "service.init_storage"]
    gw = docs["Deployment", "magicface-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(gw["resources"])
    hpa = docs["HorizontalPodAutoscaler", "magicface-gateway"]["spec"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"


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
