"""One table of limits (magicface_core.limits), read the same way by the library, the
CLI and the gateway: a value just inside every limit is accepted by all three, a value
just outside is refused by all three, naming the field."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from magicface_core import Concept, GenerationConfig, MagicFaceInputError
from magicface_core.limits import LIMITS
from service.app import create_app
from service.settings import Settings
from service.storage import LocalStorage

from .helpers.images import png
from .helpers.multipart import job_form

# Fields of GenerationConfig / Params (the concept weight is checked on its own).
PARAMS = ["steps", "guidance_scale", "alpha", "width", "height", "ca_scale"]


def outside(name: str) -> list[float]:
    lim = LIMITS[name]
    step = 8 if lim.multiple_of else (1 if name == "steps" else 0.01)
    return [lim.low - step if not lim.low_open else lim.low, lim.high + step]


def inside(name: str) -> list[float]:
    lim = LIMITS[name]
    low = lim.low + (0.01 if lim.low_open else 0)
    if name in ("width", "height"):
        low = lim.low
    return [int(low) if name == "steps" or lim.multiple_of else low, lim.high]


def library_refuses(name: str, value) -> bool:
    try:
        GenerationConfig(**{name: value})
    except MagicFaceInputError as e:
        assert name in str(e)
        return True
    return False


@pytest.fixture
def gateway(redis_server, redis_db, tmp_path):
    app = create_app(Settings(redis_url=redis_server, storage_url=f"file://{tmp_path}"),
                     storage=LocalStorage(tmp_path))
    with TestClient(app) as client:
        yield client


def gateway_refuses(client, params=None, weight=3.0) -> bool:
    r = client.post("/v1/jobs", **job_form("a man", [{"word": "man", "weight": weight}],
                                           [png()], [png()], params or {}))
    if r.status_code == 422:
        return True
    assert r.status_code == 202, r.text
    return False


def cli_refuses(tmp_path, args: list[str]) -> bool:
    from magicface_cli import main

    img = tmp_path / "face.png"
    img.write_bytes(png())
    code = main(["generate", "--tiny", "--prompt", "a man", "--out", str(tmp_path / "o.png"),
                 "--concept", f"man={img},mask={img}", "--steps", "1", "--width", "64",
                 "--height", "64", *args])
    return code == 2


@pytest.mark.parametrize("name", PARAMS)
def test_every_interface_reads_the_one_table(name, gateway, tmp_path):
    for v in outside(name):
        assert library_refuses(name, v), (name, v)
        assert gateway_refuses(gateway, {name: v}), (name, v)
    for v in inside(name):
        assert not library_refuses(name, v), (name, v)
        assert not gateway_refuses(gateway, {name: v}), (name, v)


@pytest.mark.parametrize("value", outside("weight"))
def test_concept_weight_limit_everywhere(value, gateway, tmp_path):
    with pytest.raises(MagicFaceInputError, match="weight"):
        Concept(image=png(), word="man", weight=value)
    assert gateway_refuses(gateway, weight=value)
    img = tmp_path / "w.png"
    img.write_bytes(png())
    from magicface_cli import main

    code = main(["generate", "--tiny", "--prompt", "a man", "--out", str(tmp_path / "o.png"),
                 "--concept", f"man={img},mask={img},weight={value}", "--steps", "1"])
    assert code == 2


def test_cli_refuses_out_of_range_steps(tmp_path):
    assert cli_refuses(tmp_path, ["--steps", str(int(LIMITS["steps"].high) + 1)])


def test_service_limits_default_to_the_table_and_only_go_lower():
    s = Settings()
    assert (s.max_steps, s.max_size, s.max_concepts) == (
        LIMITS["steps"].high, LIMITS["width"].high, LIMITS["concepts"].high)
    assert Settings(max_steps=50).max_steps == 50
    with pytest.raises(ValueError, match="MAX_STEPS"):
        Settings(max_steps=int(LIMITS["steps"].high) + 1)
