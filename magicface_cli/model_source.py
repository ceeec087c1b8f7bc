"""Where the model will load from, decided before anything loads (`--model`, `--tiny`):
a local diffusers folder, the Hugging Face cache, or the hub when downloads are allowed
and it answers. A model that cannot be had fails at once with the offline hint, not
after the hub client's 30 s of retries. Then `load_model`, the only place the CLI loads
a pipeline. Torch and diffusers are imported by `load_model` alone (locating needs
huggingface_hub for the cache only).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from magicface_core.errors import MagicFaceInputError

from .checks import fail
from .progress import Progress, silence_library_bars

__all__ = ["ModelSource", "ModelUnavailable", "locate_model", "offline_hint",
           "hub_reachable", "cached_snapshot", "PROBE_TIMEOUT_S", "load_model"]

# The five components models.load_components reads (it never reads model_index.json, so
# a model our loader downloaded has only these in the cache).
_COMPONENT_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                    "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DEFAULT_ENDPOINT = "https://huggingface.co"
# A reachable hub accepts a TCP connection well within this; an unreachable one is what
# the hub client would otherwise retry for about 30 s before failing.
PROBE_TIMEOUT_S = 3.0


class ModelUnavailable(MagicFaceInputError):
    """The model cannot be had here: not in the cache while the hub is off or
    unreachable, or its download failed. The message is the offline hint."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user gave it: "tiny", a folder or a hub id (what reports show)
    path: str  # what to load: "tiny", a local folder (maybe a cached snapshot), or the id
    download: bool  # True: loading goes to the hub


def offline_hint(model: str, why: str) -> str:
    return (f"--model {model}: {why}; use --tiny (random weights, no download) or "
            "--model /path/to/local/diffusers/folder (with HF_HUB_OFFLINE=1, hub ids load "
            "from the local Hugging Face cache only)")


def _hub_offline() -> bool:
    # The hub client's own rule for the variable; read here, not from
    # huggingface_hub.constants, which froze it when first imported.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of `repo_id` when every component's config is in the
    Hugging Face cache (missing weights surface in the load itself)."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in _COMPONENT_FILES:
        try:
            got = try_to_load_from_cache(repo_id, name)
        except Exception:  # an id the cache cannot hold, a broken cache: not cached
            return None
        if not isinstance(got, str):
            return None
        found.append(Path(got))
    return str(found[0].parents[1])


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host (HF_ENDPOINT) accepts a TCP connection within `timeout`.
    Behind a proxy a direct connection proves nothing: then say yes and let the hub
    client try."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                       "http_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def locate_model(model: str, tiny: bool = False) -> ModelSource:
    """Where the model will load from, decided before anything loads: a local folder
    must hold the five components; a hub id loads from the cache when it is there, and
    from the hub only when downloads are allowed and the hub answers."""
    if tiny:
        return ModelSource("tiny", "tiny", False)
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise fail(f"--model {model}: not a folder (give a diffusers folder or a hub id)")
        missing = [f.split("/")[0] for f in _COMPONENT_FILES if not (local / f).is_file()]
        if missing:
            raise fail(f"--model {model}: not a diffusers Stable Diffusion folder (no "
                        f"{', '.join(missing)})")
        return ModelSource(model, str(local), False)
    if model.startswith((".", "/", "~", "\\")) or not _REPO_ID.match(model):
        raise fail(f"--model {model}: no such folder, and not a hub id (org/name)")
    snapshot = cached_snapshot(model)
    if snapshot is not None:
        return ModelSource(model, snapshot, False)
    if _hub_offline():
        raise ModelUnavailable(offline_hint(
            model, "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"))
    endpoint = os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT
    if not hub_reachable():
        raise ModelUnavailable(offline_hint(
            model, f"not in the local Hugging Face cache, and {endpoint} cannot be reached"))
    return ModelSource(model, model, True)


def load_model(args: argparse.Namespace, source: ModelSource, progress: Progress) -> Any:
    """Load the pipeline located by `locate_model` with the model options (--device,
    --dtype, --fold-bias, --compile): the only place the CLI loads one."""
    started = time.perf_counter()  # torch's import is part of what the user waits for
    import torch

    from magicface_core import pipeline

    if args.quiet:
        silence_library_bars()
    if args.tiny:
        progress.say("magicface: --tiny uses random weights: the whole method runs, but the "
                     "image is noise, not a picture.")
    where = "" if source.path in (source.name, "tiny") else f" (from {source.path})"
    progress.say(f"loading {source.name}{where} ...")
    try:
        pipe = pipeline.load_pipeline(source.path, device=args.device,
                                      dtype=getattr(torch, args.dtype) if args.dtype else None)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if source.download:  # the hub answered but the download failed
            raise ModelUnavailable(offline_hint(source.name, f"could not be loaded ({first})")) \
                from None
        raise MagicFaceInputError(f"--model {source.name}: could not load it ({first})") \
            from None
    # A cached snapshot loads by its folder; reports and the K/V cache keep the id.
    if source.path != "tiny":
        pipe.model_name = source.name
    progress.say(f"loaded {source.name} on {pipe.device} ({str(pipe.dtype).split('.')[-1]}) "
                 f"in {time.perf_counter() - started:.1f} s")
    pipe.fold_attention_bias = args.fold_bias
    if args.compile:
        pipe.enable_compile()
    return pipe
