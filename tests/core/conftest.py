"""Fixtures of the library's tests: the shared tiny pipeline and a small config."""

from __future__ import annotations

import pytest

from magicface_core import GenerationConfig, MagicFacePipeline


@pytest.fixture(scope="session")
def pipe() -> MagicFacePipeline:
    return MagicFacePipeline.tiny(seed=0)


@pytest.fixture
def small_config() -> GenerationConfig:
    return GenerationConfig(steps=5, height=128, width=128, seed=7)
