"""`python -m worker`: load the model once, then serve jobs from the queue."""

from __future__ import annotations

import logging
import time

from redis import Redis

from service.queueing import open_queue
from service.settings import Settings
from service.storage import open_storage
from service.validation import Params

from . import tasks
from .masks import load_proposer
from .warmup import open_compile_cache, parse_shapes, plans_needed, save_compile_cache, warm_up
from .worker import MagicFaceWorker


def load_pipeline(settings: Settings):
    """The model once, with the worker's fast-path settings."""
    if settings.compile_cache_dir:
        # Before torch compiles anything: inductor reads its cache location once.
        open_compile_cache(settings.compile_cache_dir)
    import torch

    from magicface_core import load_pipeline as load

    pipe = load(settings.model_to_load(), device=settings.device,
                dtype=getattr(torch, settings.dtype) if settings.dtype else None)
    pipe.enable_kv_cache(settings.kv_cache_device_bytes, settings.kv_cache_host_bytes)
    pipe.fold_attention_bias = settings.fold_attention_bias
    if settings.fuse_qkv_projections:
        pipe.fuse_qkv_projections()
    if settings.torch_compile:
        pipe.enable_compile()
    shapes = parse_shapes(settings.warmup_shapes)
    pipe.fast_sampler.max_plans = max(pipe.fast_sampler.max_plans,
                                      plans_needed(shapes, settings.batch_max) + 4)
    return pipe


def warm(pipe, settings: Settings, log) -> float:
    """WARMUP_SHAPES run (compiled and captured) with the service's default
    parameters; the compile cache saved after. Returns the seconds it took."""
    shapes = parse_shapes(settings.warmup_shapes)
    if not shapes:
        return 0.0

    def config_for(shape):
        return Params(width=shape.width, height=shape.height,
                      steps=settings.warmup_steps).to_config(
            reference_seed=settings.reference_seed, sam_checkpoint=settings.sam_checkpoint)

    took = warm_up(pipe, shapes, config_for, settings.batch_max)
    if settings.compile_cache_dir and pipe.is_compiled:
        try:
            save_compile_cache(settings.compile_cache_dir)
        except OSError as e:  # a read-only volume: the next start compiles again
            log.warning("compile cache not saved: %s", e)
    return took


def load_safety_checker(settings: Settings, device, log):
    """The safety checker SAFETY_CHECKER asks for, or None (off, or no weights)."""
    if settings.safety_checker == "off":
        return None
    from magicface_core.safety import SafetyChecker, find_safety_checker

    # The checkpoint's own checker, if it has one (check_startup has already made sure
    # a model is named or demo mode is on; "tiny" has none).
    source = find_safety_checker(settings.magicface_model or "tiny",
                                 settings.safety_checker_model)
    if source is None:
        log.warning("SAFETY_CHECKER=%s but no checker weights were found (set "
                    "SAFETY_CHECKER_MODEL): images are not checked", settings.safety_checker)
        return None
    return SafetyChecker.from_pretrained(source, device=device)


def check_startup(settings: Settings) -> str:
    """The model to load, once the settings allow this worker to start: a model named
    (or demo mode), and a usable GPU when REQUIRE_GPU is set. Raises SystemExit with
    the reason."""
    try:
        model = settings.model_to_load()
    except ValueError as e:
        raise SystemExit(f"worker: {e}") from None
    if settings.require_gpu:
        import torch

        device = settings.device or "cuda"
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise SystemExit(
                "worker: REQUIRE_GPU=true but no usable CUDA GPU "
                f"(DEVICE={settings.device or 'unset'}, torch.cuda.is_available()="
                f"{torch.cuda.is_available()}): check the container's GPU reservation and "
                "the NVIDIA runtime, or set REQUIRE_GPU=false to run on the CPU")
    return model


def main() -> None:
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    model = check_startup(settings)
    try:
        parse_shapes(settings.warmup_shapes)
    except ValueError as e:
        raise SystemExit(f"worker: {e}") from None
    if settings.worker_threads:
        import torch

        # Several workers on one machine's cores: each gets its share, not all of them.
        torch.set_num_threads(settings.worker_threads)
    redis = Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5,
                           health_check_interval=10)
    storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url,
                           region=settings.s3_region, public_url=settings.s3_public_url,
        create_bucket=settings.s3_create_bucket)
    pipe = load_pipeline(settings)
    log = logging.getLogger("magicface.worker")
    tasks.RUNTIME = tasks.Runtime(pipe=pipe, settings=settings, storage=storage, redis=redis,
                                  safety=load_safety_checker(settings, pipe.device, log),
                                  weights_sha256=pipe.weights_sha256(),
                                  proposer=load_proposer(settings, pipe.device))
    log.info("model %s loaded on %s", model, pipe.device)
    ready = {"warm": False}
    # RQ's loop ends on an error it does not handle (a Redis outage outlasting
    # REDIS_RETRY_S, say): start it again, model still loaded, unless asked to stop.
    while True:
        # Mask proposals first: short jobs a client waits on, ahead of generations.
        queues = ([open_queue(settings.mask_queue_name, redis)] if settings.proposes_masks
                  else []) + [open_queue(settings.queue_name, redis)]
        worker = MagicFaceWorker(queues,
                                 settings=settings, connection=redis,
                                 model=model, storage=storage)
        if not ready["warm"]:
            # Registered as warming (not ready) while the shapes compile.
            worker.start_announcing(warm=False)
            took = warm(pipe, settings, log)
            ready["warm"] = True
            worker.mark_warm(time.monotonic() - started)
            log.info("worker ready in %.1f s (warm-up %.1f s)", time.monotonic() - started,
                     took)
        worker.work(with_scheduler=False)
        if worker.stop_requested:
            break
        log.warning("worker loop ended without a stop request; starting it again")
        time.sleep(2)


if __name__ == "__main__":
    main()
