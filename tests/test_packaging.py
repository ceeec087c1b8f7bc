"""The two distributions a user installs: `magicface` (the library, the CLI, the client)
and `magicface-server` (`service` and `worker`, plain top-level packages), one version
string for both, their console scripts and the web page's files; installed on their own,
outside the checkout, the worker and the gateway import each other plainly. pip itself
refuses an RQ the server's code cannot run on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from magicface_core.version import __version__

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ("magicface_core", "magicface_cli", "magicface_client", "service", "worker")


def _top_levels(wheel: Path) -> set[str]:
    names = zipfile.ZipFile(wheel).namelist()
    return {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}


def _entry_points(wheel: Path) -> str:
    z = zipfile.ZipFile(wheel)
    return z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    # Built from a copy of the packaged files: setuptools' build/ folder in the checkout
    # would otherwise keep files the tree no longer has.
    src = tmp_path_factory.mktemp("src")
    for rel in ["pyproject.toml", "README.md", "server/pyproject.toml", "server/README.md"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, src / rel)
    for folder in PACKAGED:
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(src), str(src / "server")], check=True, capture_output=True)
    return {"library": next(out.glob("magicface-*.whl")),
            "server": next(out.glob("magicface_server-*.whl"))}


def test_the_library_wheel_holds_the_method_the_cli_and_the_client(wheels):
    wheel = wheels["library"]
    assert wheel.name.startswith(f"magicface-{__version__}-")
    assert _top_levels(wheel) == {"magicface_core", "magicface_cli", "magicface_client"}
    assert "magicface = magicface_cli:main" in _entry_points(wheel)


def test_the_server_wheel_holds_the_gateway_and_the_worker(wheels):
    wheel = wheels["server"]
    assert wheel.name.startswith(f"magicface_server-{__version__}-")
    assert _top_levels(wheel) == {"service", "worker"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "service/static/index.html" in names and "worker/tasks.py" in names
    scripts = _entry_points(wheel)
    for line in ("magicface-gateway = service.__main__:main",
                 "magicface-worker = worker.__main__:main",
                 "magicface-serve = service.stack:main"):
        assert line in scripts
    meta = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: rq<4,>=3.0" in meta, meta


def test_installed_gateway_and_worker_import_each_other_plainly(wheels, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheels["library"]), str(wheels["server"])],
                   check=True, capture_output=True)
    code = (
        "import service.jobs as j, service.app as a, worker.tasks as t, worker.worker as w\n"
        "import magicface_client, magicface_core\n"
        f"assert j.__file__.startswith({str(target)!r}), j.__file__\n"
        "assert j.JOB_FUNC == 'worker.tasks.generate', j.JOB_FUNC\n"
        "assert t.jobs is j and w.jobs is j\n"
        "assert (a.STATIC / 'index.html').is_file()\n"
        f"assert magicface_core.__version__ == magicface_client.__version__ == {__version__!r}\n"
        "assert a.create_app.__module__ == 'service.app'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    # Run outside the checkout: its folders must not be what gets imported.
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_no_module_reaches_the_gateway_through_importlib():
    """Plain imports only between the server's packages (readers and type checkers
    follow them): no importlib indirection and no re-exporting shim."""
    for folder in ("service", "worker"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "import_module(" not in text, path
    assert not (ROOT / "worker" / "_service.py").exists()
    assert not (ROOT / "server_namespace").exists()


def _fake_rq_wheel(folder: Path, version: str) -> Path:
    """A metadata-only `rq` of the given version: what pip's resolver sees of a release,
    offline. Installing it is never the point; resolving against it is."""
    src = folder / f"rq-{version}"
    (src / "rq_placeholder").mkdir(parents=True)
    (src / "rq_placeholder" / "__init__.py").write_text("")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = '
        '"setuptools.build_meta"\n'
        f'[project]\nname = "rq"\nversion = "{version}"\n'
        '[tool.setuptools]\npackages = ["rq_placeholder"]\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(folder), str(src)], check=True, capture_output=True)
    return next(folder.glob(f"rq-{version}-*.whl"))


def test_pip_refuses_rq_2_beside_the_server(wheels, tmp_path):
    """RQ 2.x lacks the worker lifecycle the server uses: its bound makes pip refuse the
    pair at install time instead of every job raising TypeError at run time."""
    links = tmp_path / "links"
    links.mkdir()
    _fake_rq_wheel(links, "2.6.0")
    shutil.copy(wheels["server"], links)
    base = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-q",
            "--find-links", str(links)]
    refused = subprocess.run([*base, "magicface-server", "rq==2.6.0"], capture_output=True,
                             text=True)
    assert refused.returncode != 0
    assert "rq" in refused.stderr and "conflict" in refused.stderr.lower(), refused.stderr
    # The control: the same resolution with the RQ this environment runs goes through.
    import rq

    allowed = subprocess.run([*base, "magicface-server", f"rq=={rq.__version__}"],
                             capture_output=True, text=True)
    assert allowed.returncode == 0, allowed.stderr
