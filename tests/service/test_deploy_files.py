"""docker-compose.yml and Dockerfile are checked statically (no Docker engine here)."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_redis_minio_api_and_a_gpu_worker():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert set(services) == {"redis", "minio", "api", "worker"}
    assert services["api"]["command"] == ["python", "-m", "service"]
    assert services["worker"]["command"] == ["python", "-m", "worker"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    known = {name.upper() for name in Settings.model_fields}
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["STORAGE_URL"].startswith("s3://") and env["REDIS_URL"].startswith("redis://")
        # Every variable set for our processes is one the settings read (or AWS's own).
        for key in env:
            assert key in known or key.startswith("AWS_") or key == "HF_HOME", key
    for dep in ("redis", "minio"):
        assert services["api"]["depends_on"][dep]["condition"] == "service_healthy"
    # A process that exits (a worker outlasting REDIS_RETRY_S, say) is started again.
    assert services["api"]["restart"] == services["worker"]["restart"] == "unless-stopped"


def test_dockerfile_installs_the_project_and_runs_the_gateway():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:")
    for needed in ("COPY magicface_core", "COPY service", "COPY worker", '.[service,sam]',
                   'CMD ["python", "-m", "service"]', "USER magicface", "EXPOSE 8000"):
        assert needed in text, needed
    # Every COPY source exists in the repository.
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), src
