"""What a job's walk through the worker shares: the process's loaded runtime and the two
ways a job stops early."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import Redis

from service.schemas import JobState
from service.settings import Settings
from service.storage import Storage

__all__ = ["Runtime", "JobCanceled", "JobFailed"]


@dataclass
class Runtime:
    """The worker process's loaded pipeline, settings, storage and Redis."""

    pipe: Any
    settings: Settings
    storage: Storage
    redis: Redis
    safety: Any = None  # a SafetyChecker when SAFETY_CHECKER is warn or block
    weights_sha256: str | None = None  # of the loaded model, for the job's record
    proposer: Any = None  # a MaskProposer when MASK_DETECTOR or MASK_FACES is set


class JobCanceled(Exception):
    """Raised from the step callback when the job's cancel flag is set; `state` is the
    flag's value: canceled (a client) or expired (a deadline)."""

    def __init__(self, state: JobState = JobState.CANCELED):
        super().__init__(state.value)
        self.state = state


class JobFailed(Exception):
    """A failure whose code and message are already in the job's record."""
