"""One rule book (magicface_core.rules): the same odd prompts and concept words, fed to
the library's call, the CLI and both API bodies (multipart and JSON), get the same
problem from each, the one `concept_problems` / `prompt_problems` finds, and requests
the rule book accepts are accepted by all four."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from magicface_cli import main
from magicface_core import Concept, GenerationConfig, MagicFaceInputError, MagicFacePipeline
from magicface_core.limits import TEXT_LIMITS
from magicface_core.rules import (
    DEFAULT_WEIGHT,
    concept_problems,
    normalize_word,
    prompt_problems,
)
from service.app import create_app
from service.settings import Settings
from service.storage import LocalStorage

from .helpers.images import mask_image, noise_image, png
from .helpers.multipart import job_form

LONG = "x" * (TEXT_LIMITS["word"] + 1)

# (prompt, concepts): each has exactly one thing wrong with its text.
BAD = [
    ("a man with a red hat", [{"word": "man"}, {"word": "Red  Hat"}, {"word": "red hat"}]),
    ("a man with a hat", [{"word": "man"}, {"word": "MAN"}]),
    ("a man with a hat", [{"word": "man"}, {"word": "  "}]),
    ("a man with a hat", [{"word": "scarf"}]),
    ("a woman with a hat", [{"word": "man"}]),
    ("a man with a hat", [{"word": "hat"}, {"word": 7}]),
    ("a man with a hat", [{"word": "hat", "weight": 0}]),
    ("a man with a hat", [{"word": "hat", "weight": 20.5}]),
    ("a man with a hat", [{"word": "hat", "weight": True}]),
    ("a man with a hat", [{"word": "hat", "weight": "2"}]),
    ("a man with a hat", [{"word": "hat", "weight": 10**400}]),
    ("a man with a hat", [{"word": "hat",
                           "reference_prompt": "y" * (TEXT_LIMITS["reference_prompt"] + 1)}]),
    (f"a man {LONG}", [{"word": LONG}]),
    ("a man, a hat, a dog, a cat and a vase",
     [{"word": w} for w in ("man", "hat", "dog", "cat", "vase")]),
    ("   ", [{"word": "man"}]),
    ("a " * 600, [{"word": "a"}]),
]
GOOD = [
    ("a MAN with a  red\that", [{"word": "man"}, {"word": "Red Hat", "weight": 20}]),
    ("a c++ coder", [{"word": "c++", "weight": 0.5}]),
]


def rule_problem(prompt, concepts):
    found = prompt_problems(prompt) or concept_problems(prompt, concepts)
    return found[0] if found else None


def test_each_bad_case_has_one_problem_and_good_ones_none():
    for prompt, concepts in BAD:
        found = prompt_problems(prompt) or concept_problems(prompt, concepts)
        assert len(found) == 1, (prompt, concepts, found)
    for prompt, concepts in GOOD:
        assert rule_problem(prompt, concepts) is None
    assert normalize_word(" Red \t HAT ") == "red hat"


# -- the four ways in -------------------------------------------------------------------

def library_error(pipe, prompt, concepts) -> str | None:
    try:
        made = [Concept(image=noise_image(i), mask=mask_image(), word=c["word"],
                        weight=c.get("weight", DEFAULT_WEIGHT),
                        reference_prompt=c.get("reference_prompt"))
                for i, c in enumerate(concepts)]
        pipe.generate(prompt, made, GenerationConfig(steps=1, width=64, height=64))
    except MagicFaceInputError as e:
        return str(e)
    return None


def cli_error(tmp_path, capsys, prompt, concepts) -> str | None:
    image, mask = tmp_path / "ref.png", tmp_path / "ref_mask.png"
    noise_image(0).save(image)
    mask_image().save(mask)
    argv = ["generate", "--tiny", "--prompt", prompt, "--steps", "1", "--width", "64",
            "--height", "64", "--out", str(tmp_path / "out.png")]
    for c in concepts:
        spec = f"{c['word']}={image},mask={mask}"
        if "weight" in c:
            spec += f",weight={c['weight']}"
        if "reference_prompt" in c:
            spec += f",reference_prompt={c['reference_prompt']}"
        argv += ["--concept", spec]
    code = main(argv)
    err = capsys.readouterr().err
    return err if code == 2 else None


@pytest.fixture
def gateway(redis_server, redis_db, tmp_path):
    settings = Settings(redis_url=redis_server, storage_url=f"file://{tmp_path}/store")
    with TestClient(create_app(settings, storage=LocalStorage(tmp_path / "store"))) as c:
        yield c


def multipart_error(gateway, prompt, concepts) -> str | None:
    form = job_form(prompt, concepts, [png() for _ in concepts], [png() for _ in concepts],
                    {"steps": 1, "width": 64, "height": 64})
    r = gateway.post("/v1/jobs", **form)
    assert r.status_code in (202, 422), r.text
    return r.json()["error"]["code"] + " " + r.json()["error"]["message"] \
        if r.status_code == 422 else None


def json_error(gateway, prompt, concepts) -> str | None:
    uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    body = {"prompt": prompt, "concepts": [{**c, "image": uri, "mask": uri} for c in concepts],
            "params": {"steps": 1, "width": 64, "height": 64}}
    r = gateway.post("/v1/jobs", json=body)
    assert r.status_code in (202, 422), r.text
    return r.json()["error"]["code"] + " " + r.json()["error"]["message"] \
        if r.status_code == 422 else None


@pytest.fixture(scope="module")
def pipe():
    return MagicFacePipeline.tiny(seed=0)


@pytest.mark.parametrize("case", range(len(BAD)))
def test_every_way_in_reports_the_rule_books_problem(case, pipe, gateway, tmp_path,
                                                     capsys):
    prompt, concepts = BAD[case]
    problem = rule_problem(prompt, concepts)
    texts = {"multipart": multipart_error(gateway, prompt, concepts),
             "json": json_error(gateway, prompt, concepts)}
    # The CLI's command line carries text only: a number or a boolean as a word or a
    # weight is a JSON body's (and a library caller's) mistake.
    # A blank word is a spec without `word=` there (refused as such); a weight there is
    # text read as a float, so 10**400 is inf (refused as not finite).
    if all(isinstance(c["word"], str) and c["word"].strip()
           and not isinstance(c.get("weight", 1.0), (bool, str))
           and abs(c.get("weight", 1.0)) < 1e308 for c in concepts):
        texts["cli"] = cli_error(tmp_path, capsys, prompt, concepts)
    texts["library"] = library_error(pipe, prompt, concepts)
    for way, text in texts.items():
        assert text is not None, f"{way} accepted {prompt!r} {concepts}"
        assert problem.message in text, (way, problem, text)
    assert texts["multipart"].startswith(problem.code + " " + problem.field)
    assert texts["json"].startswith(problem.code + " " + problem.field)


@pytest.mark.parametrize("case", range(len(GOOD)))
def test_every_way_in_accepts_what_the_rule_book_accepts(case, pipe, gateway, tmp_path,
                                                         capsys):
    prompt, concepts = GOOD[case]
    assert multipart_error(gateway, prompt, concepts) is None
    assert json_error(gateway, prompt, concepts) is None
    assert library_error(pipe, prompt, concepts) is None
    assert cli_error(tmp_path, capsys, prompt, concepts) is None


def test_an_image_over_the_pixel_limit_is_refused_by_the_cli_and_the_api(gateway, tmp_path,
                                                                         capsys):
    from PIL import Image

    from magicface_core.limits import IMAGE_LIMITS

    side = int(IMAGE_LIMITS["pixels"] ** 0.5) + 1
    big = tmp_path / "big.png"
    Image.new("RGB", (side, side), (90, 90, 90)).save(big)
    Image.new("L", (side, side), 255).save(tmp_path / "big_mask.png")
    code = main(["generate", "--tiny", "--prompt", "a man", "--out", str(tmp_path / "o.png"),
                 "--concept", f"man={big},mask={tmp_path / 'big_mask.png'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{side}x{side} exceeds the {IMAGE_LIMITS['pixels']}-pixel" in err, err
    form = job_form("a man", [{"word": "man"}], [big], [tmp_path / "big_mask.png"])
    r = gateway.post("/v1/jobs", **form)
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
    assert f"{side}x{side} exceeds the {IMAGE_LIMITS['pixels']}-pixel" in r.text
