"""The wheel a user installs: the library, the client and the server under the
distribution's own names (`magicface_server.service`, `magicface_server.worker`), no
generic top-level `service` or `worker`, the console scripts, the web page's files;
installed on its own, the gateway and the worker find each other under those names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the packaged files: setuptools' build/ folder in the checkout
    # would otherwise keep files the tree no longer has.
    src = tmp_path_factory.mktemp("src")
    for rel in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / rel, src / rel)
    for folder in ("magicface_core", "magicface_client", "server_namespace", "service",
                   "worker"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    return next(out.glob("magicface-*.whl"))


def test_the_wheel_has_no_generic_top_level_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"magicface_core", "magicface_client", "magicface_server"}, tops
    assert "magicface_server/service/static/index.html" in names
    assert "magicface_server/worker/tasks.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for line in ("magicface = magicface_core.cli:main",
                 "magicface-gateway = magicface_server.service.__main__:main",
                 "magicface-worker = magicface_server.worker.__main__:main"):
        assert line in scripts


def test_installed_gateway_queues_the_installed_worker(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    code = (
        "import importlib.util, magicface_server.service.jobs as j, "
        "magicface_server.worker._service as s, magicface_server.service.app as a\n"
        f"assert j.__file__.startswith({str(target)!r}), j.__file__\n"
        "assert j.JOB_FUNC == 'magicface_server.worker.tasks.generate', j.JOB_FUNC\n"
        "assert s.PACKAGE == 'magicface_server.service' and s.jobs is j\n"
        "assert (a.STATIC / 'index.html').is_file()\n"
        "assert importlib.util.find_spec('service') is None\n"
        "assert importlib.util.find_spec('worker') is None\n"
        "import magicface_server.worker.tasks as t\n"
        "assert t.jobs is j\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    # Run outside the checkout: its folders must not be what gets imported.
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
