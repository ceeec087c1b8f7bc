"""A small client of the MagicFace HTTP service (httpx; sync and async).

    from magicface_client import Client, Concept

    with Client("http://localhost:8000", api_key="...") as c:
        job = c.submit("a man with a hat",
                       [Concept("man", "man.jpg", mask="man_mask.png"),
                        Concept("hat", "hat.jpg", mask="hat_mask.png", weight=2)],
                       params={"steps": 50, "seed": 1})
        job = c.wait(job.id, on_progress=lambda p: print(p["percent"]))
        c.download(job.id, "out.png")
"""

from .client import AsyncClient, Client
from .models import Concept, Job, JobFailed, MagicFaceError
from .webhooks import WebhookVerificationError, verify_webhook

__all__ = ["Client", "AsyncClient", "Concept", "Job", "MagicFaceError", "JobFailed",
           "verify_webhook", "WebhookVerificationError"]
__version__ = "0.1.0"
