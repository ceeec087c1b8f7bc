"""A client generated from openapi/openapi.json by openapi-python-client submits a job
(its typed multipart body: files as files; then its JSON body type) and follows it to
the image, against the real stack: the OpenAPI document is good enough for generators."""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..helpers.examples import trio_job
from ..helpers.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_a_generated_client_submits_and_follows_a_job(redis_db, redis_server, tmp_path):
    out = tmp_path / "gen" / "magicface_api"
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bin_dir / "openapi-python-client"), "generate", "--path",
         str(ROOT / "openapi" / "openapi.json"), "--output-path", str(out), "--meta", "none"],
        capture_output=True, text=True, env={**os.environ, "PATH": f"{bin_dir}:"
                                             f"{os.environ.get('PATH', '')}"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sys.path.insert(0, str(out.parent))
    try:
        api = importlib.import_module("magicface_api")
        create_job = importlib.import_module("magicface_api.api.default.create_job")
        get_job = importlib.import_module("magicface_api.api.default.get_job")
        get_image = importlib.import_module("magicface_api.api.default.get_image")
        models = importlib.import_module("magicface_api.models")
        types = importlib.import_module("magicface_api.types")
        stack = Stack({"REDIS_URL": redis_server, "STORAGE_URL": f"file://{tmp_path / 's'}",
                       "API_KEYS": "gen-key"}, tmp_path / "logs")
        stack.start_gateway()
        try:
            stack.client.headers["Authorization"] = "Bearer gen-key"
            stack.start_worker()
            job = trio_job(1)
            client = api.AuthenticatedClient(base_url=stack.base_url, token="gen-key")

            def file(path) -> object:
                return types.File(payload=io.BytesIO(Path(path).read_bytes()),
                                  file_name=Path(path).name, mime_type="image/png")

            body = models.CreateJobFilesBody(
                prompt=job["prompt"], concepts=json.dumps(job["concepts"]),
                images=[file(p) for p in job["images"]], masks=[file(p) for p in job["masks"]],
                params=json.dumps({"steps": 4, "width": 64, "height": 64}))
            r = create_job.sync_detailed(client=client, body=body)
            assert r.status_code == 202, r.content
            view = r.parsed
            assert isinstance(view, models.JobView) and view.status.value in ("queued", "running")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                view = get_job.sync(view.id, client=client)
                if view.status.value in ("succeeded", "failed", "canceled", "expired"):
                    break
                time.sleep(0.3)
            assert view.status.value == "succeeded", view
            assert view.result.semantic_map_legend[0].word == job["concepts"][0]["word"]
            png = get_image.sync_detailed(view.id, client=client)
            assert png.status_code == 200 and png.content[:4] == b"\x89PNG"

            # The JSON body type (data: URIs, typed params) and a header parameter.
            def data_uri(path) -> str:
                return "data:image/png;base64," + base64.b64encode(
                    Path(path).read_bytes()).decode()

            c = job["concepts"][0]
            body = models.JobCreate(
                prompt=job["prompt"],
                concepts=[models.JsonConcept(word=c["word"], weight=c["weight"],
                                             reference_prompt=c["reference_prompt"],
                                             image=data_uri(job["images"][0]),
                                             mask=data_uri(job["masks"][0]))],
                params=models.Params(steps=4, width=64, height=64, seed=3))
            r = create_job.sync_detailed(client=client, body=body, prefer="wait=30")
            assert r.status_code in (201, 202), r.content  # 202: not done within 30 s
            view, deadline = r.parsed, time.monotonic() + 120
            while view.status.value not in ("succeeded", "failed", "canceled", "expired"):
                assert time.monotonic() < deadline, view
                time.sleep(0.3)
                view = get_job.sync(view.id, client=client)
            assert view.status.value == "succeeded", view
        finally:
            stack.stop()
    finally:
        sys.path.remove(str(out.parent))
        for name in [m for m in sys.modules if m.startswith("magicface_api")]:
            del sys.modules[name]
