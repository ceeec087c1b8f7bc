"""The README's curl examples, run as written (bash, curl) against a real gateway and
worker: `localhost:8000` becomes the stack's address and `<id>` the job the first
command made; the files they name are drawn here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from ..helpers.examples import trio_job

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## HTTP API"):text.index("| route | does |")]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    commands, current, heredoc = [], [], None
    for line in block.splitlines():
        if heredoc is None and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current.append(line)
        if heredoc is None and (m := re.search(r"<<(\w+)$", line)):
            heredoc = m.group(1)
            continue
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
                commands.append("\n".join(current))
                current = []
            continue
        if not line.endswith("\\"):
            commands.append("\n".join(current))
            current = []
    return commands


def test_the_readme_curl_examples_work_as_written(file_stack, tmp_path):
    assert shutil.which("curl"), "curl is needed to run the README's examples"
    file_stack.start_worker()
    job = trio_job(2)
    # The files the examples name, from the drawn example (JPEG references, PNG masks).
    for name, src in (("man.jpg", job["images"][0]), ("hat.jpg", job["images"][1])):
        Image.open(src).convert("RGB").resize((128, 128)).save(tmp_path / name)
    for name, src in (("man_mask.png", job["masks"][0]), ("hat_mask.png", job["masks"][1])):
        Image.open(src).convert("L").resize((128, 128)).save(tmp_path / name)
    commands = readme_commands()
    assert len(commands) == 6, commands
    job_id = None
    for cmd in commands:
        # The examples sample 50 steps at 512 px; the tiny model on 2 cores runs them
        # at the test's size to stay quick (the commands are otherwise as written).
        cmd = cmd.replace("localhost:8000", file_stack.base_url)
        cmd = cmd.replace('"width":512,"height":512', '"width":64,"height":64')
        cmd = cmd.replace('"steps":50', '"steps":4')
        cmd = cmd.replace('"steps": 50, "seed": 1}', '"steps": 4, "seed": 1, "width": 64, '
                                                     '"height": 64}')
        if job_id:
            cmd = cmd.replace("<id>", job_id)
        if "Prefer: wait" in cmd:
            cmd = cmd.replace("-F 'concepts", "-F 'params={\"steps\":4,\"width\":64,"
                                               "\"height\":64}' -F 'concepts")
        out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True,
                             timeout=120)
        assert out.returncode == 0, (cmd, out.stderr)
        if "-X POST" in cmd:
            view = json.loads(out.stdout)
            assert "id" in view, (cmd, view)
            job_id = job_id or view["id"]
            if "Prefer" in cmd:
                assert view["status"] == "succeeded", view
        elif "/events" in cmd:
            events = re.findall(r"^event: (\w+)$", out.stdout.decode(), re.MULTILINE)
            assert events[0] == "queued" and events[-1] == "succeeded", events
        elif "-o out.png" in cmd:
            assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
        else:
            assert json.loads(out.stdout)["id"] == job_id
