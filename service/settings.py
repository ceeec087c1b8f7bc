"""Process configuration from the environment (one Settings object per process)."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from magicface_core.limits import IMAGE_LIMITS, LIMITS


class Settings(BaseSettings):
    """Read from environment variables of the same name, upper-case (REDIS_URL, ...)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    # Shared by gateway and worker.
    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = "file://./data"
    s3_endpoint_url: str | None = None
    s3_public_url: str | None = Field(
        default=None, description="S3 endpoint as clients reach it; set to redirect "
                                  "image downloads to presigned URLs")
    s3_region: str = "us-east-1"
    # Create the bucket at start when missing (race-safe). A deployment with an init
    # step (compose's `init`, the Kubernetes Job) sets it false.
    s3_create_bucket: bool = True
    queue_name: str = "magicface"
    # A hub id or a local diffusers folder. Unset, a worker refuses to start unless
    # MAGICFACE_DEMO=true (then: "tiny", the random-weight model that draws noise).
    magicface_model: str | None = None
    magicface_demo: bool = False

    # Gateway.
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str = ""  # comma-separated; empty: no auth
    max_image_bytes: int = IMAGE_LIMITS["bytes"]
    max_request_bytes: int = 40 * 2**20
    max_header_bytes: int = 32 * 2**10  # all request headers together (431 beyond)
    max_image_pixels: int = IMAGE_LIMITS["pixels"]
    # The library's limits (magicface_core.limits) by default; an operator may lower them.
    max_concepts: int = int(LIMITS["concepts"].high)
    max_steps: int = int(LIMITS["steps"].high)
    max_size: int = int(LIMITS["width"].high)
    job_timeout_s: int = 600
    result_ttl_s: int = 7 * 86400
    idempotency_ttl_s: int = 86400
    presign_expires_s: int = 300
    public_docs: bool = False  # /docs and /openapi.json without a key (when keys are set)
    metrics_port: int | None = None  # also serve /metrics, keyless, on this port
    body_timeout_s: float = 30.0  # a request body that stalls this long is dropped (408)
    upload_concurrency: int = Field(default=2, ge=1)  # job submissions read at once
    max_queued: int = Field(default=1000, ge=1)  # beyond this many queued jobs: 429
    max_queued_per_key: int = Field(default=100, ge=1)  # one API key's queued jobs (429)
    queue_ttl_s: int = Field(default=86400, ge=1)  # a job not started by then: expired
    max_wait_s: int = Field(default=60, ge=0, le=300)  # the longest `Prefer: wait=N`
    # https image inputs in JSON bodies: the hosts allowed (empty: URL inputs are off).
    input_url_allowlist: str = ""
    input_url_timeout_s: float = 10.0
    input_url_allow_private: bool = False  # let URL inputs reach private addresses

    # Webhooks (signed by the workers' deliverer).
    webhook_secret: str = ""  # comma-separated: each signs (rotation: add new, drop old)
    webhook_allow_private: bool = False  # let webhooks reach private/loopback addresses
    webhook_timeout_s: float = 10.0  # per delivery attempt
    webhook_backoff_s: float = 5.0  # first retry delay; then x3 per attempt, capped
    webhook_backoff_max_s: float = 1800.0
    webhook_retry_for_s: float = 86400.0  # a delivery is retried this long (>= 1 h)
    webhook_delivery: bool = True  # workers run a deliverer thread (or run
    #                               `python -m worker.webhooks` on its own)

    # Worker.
    device: str | None = None  # default: cuda if available
    require_gpu: bool = False  # refuse to start on a machine without a usable CUDA GPU
    # The worker touches this file at every heartbeat; `python -m worker.healthcheck`
    # (the container's healthcheck) reads its age.
    heartbeat_file: str = "/tmp/magicface-worker.heartbeat"
    dtype: str | None = None  # float16 / bfloat16 / float32
    kv_cache_device_bytes: int = 4 * 2**30
    kv_cache_host_bytes: int = 8 * 2**30
    reference_seed: int | None = None  # pin to share cached K/V across seeds
    torch_compile: bool = False  # inductor-compile the UNet (minutes of warm-up per shape)
    fold_attention_bias: bool = True  # RSA/RBA bias in extra head dims (mask-free SDPA)
    fuse_qkv_projections: bool = False  # one matmul for Q/K/V (diffusers' fused projections)
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_h"  # the checkpoint's architecture: vit_h, vit_l or vit_b
    # Masks from the concept word (POST /v1/masks, jobs sent without masks): a worker
    # proposes them when it has a text-prompted detector (a Grounding DINO hub id or
    # folder) or MASK_FACES (facenet-pytorch's MTCNN, for person words), or both.
    mask_detector: str | None = None
    mask_faces: bool = False
    mask_threshold: float = Field(default=0.3, ge=0, le=1)
    max_queued_masks: int = Field(default=32, ge=1)  # beyond this many waiting: 429
    mask_ttl_s: int = Field(default=600, ge=60)  # a proposal is kept this long
    worker_heartbeat_ttl_s: int = 10
    worker_maintenance_interval_s: int = 5
    worker_name: str | None = None
    worker_threads: int | None = None  # torch CPU threads per worker (unset: torch's)
    redis_retry_s: int = 300  # how long a worker waits for Redis to record a job's end
    storage_retry_s: int = 60  # how long a worker retries a storage read or write
    keep_inputs: bool = False  # keep a job's uploads after it ends
    sweep_interval_s: int = 300  # how often a worker deletes expired jobs' objects
    orphan_grace_s: int = 3600  # objects with no job record, older than this, are deleted
    # Batching across requests: up to BATCH_MAX queued jobs of one call shape run as one
    # UNet batch. The worker takes what is queued when it starts a job and waits up to
    # BATCH_WAIT_MS for more (0: never waits, so a lone job is not delayed).
    batch_max: int = Field(default=4, ge=1, le=64)
    batch_wait_ms: int = Field(default=0, ge=0, le=10_000)
    # Call shapes compiled and captured before the worker reports ready, e.g.
    # "512x512:1,2,3" (size: concept counts), several separated by ";"; see
    # worker/warmup.py. COMPILE_CACHE_DIR keeps inductor's compiled code across starts.
    warmup_shapes: str = ""
    warmup_steps: int = Field(default=2, ge=1, le=50)
    compile_cache_dir: str | None = None
    safety_checker: str = "off"  # off | warn | block (needs the checkpoint's checker)
    safety_checker_model: str | None = None  # the checker's folder or hub id

    def model_to_load(self) -> str:
        """MAGICFACE_MODEL, or "tiny" in demo mode; raises ValueError when neither."""
        if self.magicface_model:
            return self.magicface_model
        if self.magicface_demo:
            return "tiny"
        raise ValueError("MAGICFACE_MODEL is not set: name a diffusers checkpoint (a hub "
                         "id or a local folder), or set MAGICFACE_DEMO=true to run the "
                         "random-weight tiny model (it draws noise)")

    @property
    def mask_queue_name(self) -> str:
        """Mask proposals wait on a queue of their own: short jobs that must not queue
        behind generations (a worker that proposes masks takes them first)."""
        return f"{self.queue_name}-masks"

    @property
    def proposes_masks(self) -> bool:
        return bool(self.mask_detector or self.mask_faces)

    @property
    def reaper_settle_s(self) -> float:
        """How long a restarted Redis is left alone before abandoned jobs are failed:
        a heartbeat TTL (three beats of every live worker) plus a maintenance round."""
        return float(self.worker_heartbeat_ttl_s + self.worker_maintenance_interval_s)

    @property
    def input_url_hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.input_url_allowlist.split(",")
                         if h.strip())

    @property
    def webhook_secrets(self) -> list[bytes]:
        from .webhooks import secret_bytes

        return [secret_bytes(s.strip()) for s in self.webhook_secret.split(",") if s.strip()]

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    @field_validator("webhook_secret")
    @classmethod
    def _standard_webhook_secrets(cls, v: str) -> str:
        from .webhooks import secret_bytes

        for secret in (s.strip() for s in v.split(",")):
            if secret:
                secret_bytes(secret)  # ValueError names the setting and the fix
        return v

    @field_validator("max_concepts", "max_steps", "max_size")
    @classmethod
    def _within_library_limits(cls, v: int, info) -> int:
        name = {"max_concepts": "concepts", "max_steps": "steps", "max_size": "width"}[
            info.field_name]
        lim = LIMITS[name]
        if not lim.low <= v <= lim.high:
            raise ValueError(f"{info.field_name.upper()} must be in [{lim.low:g}, "
                             f"{lim.high:g}] (the library's limit), got {v}")
        return v

    @field_validator("safety_checker")
    @classmethod
    def _safety_mode(cls, v: str) -> str:
        if v not in ("off", "warn", "block"):
            raise ValueError("SAFETY_CHECKER must be off, warn or block")
        return v
