"""The gateway package the worker shares job records, keys, settings and storage with,
under whichever name it has: `service` in a checkout or the image, and
`magicface_server.service` when installed from the wheel (which keeps generic names
like `service` and `worker` out of a user's site-packages)."""

from __future__ import annotations

import importlib

_root = (__package__ or "worker").rpartition(".")[0]
PACKAGE = f"{_root}.service" if _root else "service"


def _module(name: str):
    return importlib.import_module(f"{PACKAGE}.{name}")


events, jobs, keys, metrics, remote, schemas, settings, storage, validation, webhooks = (
    _module(n) for n in ("events", "jobs", "keys", "metrics", "remote", "schemas",
                         "settings", "storage", "validation", "webhooks"))

Settings = settings.Settings
Storage, StorageError, StorageNotFound = storage.Storage, storage.StorageError, \
    storage.StorageNotFound
open_storage, input_key, output_key, output_prefix, request_key = (
    storage.open_storage, storage.input_key, storage.output_key, storage.output_prefix,
    storage.request_key)
ErrorCode, EventType, JobState = schemas.ErrorCode, schemas.EventType, schemas.JobState
Params = validation.Params
