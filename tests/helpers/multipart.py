"""The multipart body of POST /v1/jobs, built one way for every test client."""

from __future__ import annotations

import json
from pathlib import Path


def _file(field: str, i: int, item: bytes | str | Path) -> tuple:
    if isinstance(item, bytes):
        return field, (f"{field[0]}{i}.png", item)
    path = Path(item)
    return field, (path.name, path.read_bytes())


def job_form(prompt: str, concepts: list | str, images, masks=(), params=None) -> dict:
    """`data` and `files` for httpx / TestClient: images and masks are bytes or paths;
    `concepts` and `params` are JSON-encoded unless already strings."""
    files = [_file("images", i, b) for i, b in enumerate(images)]
    files += [_file("masks", i, b) for i, b in enumerate(masks)]
    data = {"prompt": prompt,
            "concepts": concepts if isinstance(concepts, str) else json.dumps(concepts)}
    if params is not None:
        data["params"] = params if isinstance(params, str) else json.dumps(params)
    return {"data": data, "files": files}
