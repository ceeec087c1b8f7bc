"""`python -m service`: run the gateway with uvicorn on HOST:PORT (and, with
METRICS_PORT, keyless Prometheus metrics on that port for the scraper)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from . import metrics
from .app import create_app
from .settings import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The event loop shares the GIL with the threads that decode and store uploads: a
    # shorter switch interval lets it answer probes and new requests sooner.
    sys.setswitchinterval(0.001)
    settings = Settings()
    app = create_app(settings)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.host, app.state.redis, app.state.queue)
    # Idle keep-alive connections are closed after 5 s; a stalled body is dropped after
    # BODY_TIMEOUT_S (the app's middleware).
    # h11's own bound on an incomplete request head (used when uvicorn runs h11); the
    # middleware answers 431 past MAX_HEADER_BYTES whatever the HTTP implementation.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_keep_alive=5,
                h11_max_incomplete_event_size=settings.max_header_bytes + 16 * 2**10)


if __name__ == "__main__":
    main()
