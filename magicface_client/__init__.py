"""The Python client of the MagicFace HTTP service (httpx; sync and asyncio).

    from magicface_client import Client, Concept

    with Client("http://localhost:8000", api_key="...") as c:
        job = c.submit("a man with a hat",
                       [Concept("man", "man.jpg", mask="man_mask.png"),
                        Concept("hat", "hat.jpg", mask="hat_mask.png", weight=2)],
                       params={"steps": 50, "seed": 1})
        job = c.wait(job.id, on_progress=lambda p: print(f"{p['percent']:.0f}%"))
        c.download(job.id, "out.png")

`verify_webhook` checks the signature of a webhook delivery (Standard Webhooks).
"""

from .client import VERSION, AsyncClient, Client
from .models import Concept, Job, JobFailed, MagicFaceError
from .sse import Event
from .webhooks import WebhookVerificationError, verify_webhook

__all__ = ["Client", "AsyncClient", "Concept", "Job", "Event", "MagicFaceError", "JobFailed",
           "verify_webhook", "WebhookVerificationError"]
__version__ = VERSION
