"""The README's quick start, as a new user meets it: its commands are read from the
README (not copied here), name files that exist and run, and, in a fresh clone of the
repository in an empty folder (no `../shared` beside it, no virtual environment), the
main-job commands run as written and print PNGs that exist and decode."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(section: str) -> list[list[str]]:
    """The commands of each ```bash block under the README's `## <section>` heading,
    comments and blank lines dropped."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no '## {section}' section"
    blocks = re.findall(r"```bash\n(.*?)```", match.group(1), re.S)
    out = []
    for block in blocks:
        lines = [ln.split(" #")[0].strip() for ln in block.splitlines()]
        out.append([ln for ln in lines if ln and not ln.startswith("#")])
    return out


def _program(command: str) -> str:
    """The file a command runs: its first word that is not a VAR=value assignment."""
    words = shlex.split(command)
    return next(w for w in words if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w))


def main_job_commands() -> list[str]:
    return _bash_blocks("Quick start")[0]


def test_every_quick_start_command_names_an_executable_in_the_repository():
    blocks = _bash_blocks("Quick start")
    assert len(blocks) >= 2, "the quick start needs its main-job and test commands"
    commands = [c for block in blocks for c in block]
    assert "./scripts/demo.sh" in main_job_commands()
    assert any(_program(c) == "./scripts/test.sh" for c in blocks[-1]), blocks[-1]
    for command in commands:
        program = _program(command)
        if program.startswith(".venv/"):
            # Made by scripts/setup.sh: the console script must be declared instead.
            name = Path(program).name
            declared = (ROOT / "pyproject.toml").read_text() + \
                (ROOT / "server" / "pyproject.toml").read_text()
            assert re.search(rf"^{re.escape(name)} = ", declared, re.M), program
            continue
        path = ROOT / program
        assert path.is_file(), f"{command!r}: {program} does not exist"
        assert os.access(path, os.X_OK), f"{command!r}: {program} is not executable"
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", program], cwd=ROOT,
                                 capture_output=True)
        assert tracked.returncode == 0, f"{program} is not committed: a clone lacks it"


def test_the_scripts_the_quick_start_runs_import_nothing_from_the_tests():
    for path in [*(ROOT / "scripts").iterdir(), *(ROOT / "benchmarks").glob("*.py")]:
        if path.suffix in (".py", ".sh"):
            text = path.read_text()
            assert not re.search(r"^\s*(from|import) tests\b", text, re.M), path


def _fresh_user_env(home: Path) -> dict[str, str]:
    """This process's environment less what ties it to the checkout's venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
           and not k.startswith(("PYTEST_", "MAGICFACE_"))}
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p != venv_bin)
    return env


@pytest.mark.slow
def test_the_quick_start_runs_as_written_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "empty" / "magicface"
    clone.parent.mkdir()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (clone.parent / "shared").exists() and not (clone / ".venv").exists()
    env = _fresh_user_env(tmp_path)
    for command in main_job_commands():
        proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=1500)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command!r} failed:\n{output[-4000:]}"
        pngs = set(re.findall(r"(?:^|\s)(/\S+?\.png)", proc.stdout, re.M))
        assert len(pngs) >= 2, f"{command!r} printed no result paths:\n{proc.stdout}"
        for png in pngs:
            path = Path(png)
            assert path.is_file() and clone in path.parents, png
            with Image.open(path) as im:
                im.load()
                assert im.width >= 64 and im.height >= 64, (png, im.size)
