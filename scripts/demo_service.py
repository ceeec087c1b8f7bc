"""Bring up the local stack (Redis when none answers, the gateway, one worker) on the
embedded defaults, submit the shipped synthetic example over HTTP with the Python
client, follow it to the end and print where the result PNGs are. Everything started
here is stopped at the end.

    python scripts/demo_service.py   (scripts/demo.sh sets up the venv first)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from magicface_client import Client, Concept, JobFailed
from service.stack import Stack, StackError

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    model = os.environ.get("MAGICFACE_MODEL", "tiny")
    steps = int(os.environ.get("STEPS", "30" if model == "tiny" else "50"))
    size = 256 if model == "tiny" else 512
    stack = Stack({"STORAGE_URL": f"file://{out / 'storage'}", "MAGICFACE_MODEL": model,
                   "MAGICFACE_DEMO": "true", "QUEUE_NAME": "magicface-demo"},
                  log_dir=out / "logs")
    try:
        url = stack.ensure_redis()
        print(f"redis: {url}{' (started for the demo)' if stack.redis_proc else ''}; "
              f"model: {model}; logs: {out / 'logs'}")
        stack.start_gateway()
        print(f"gateway: {stack.base_url} (docs at {stack.base_url}/docs)")
        stack.start_worker()
        ex = ROOT / "examples" / "synthetic"
        spec = json.loads((ex / "example.json").read_text())
        concepts = [Concept(c["word"], ex / c["image"], mask=ex / c["mask"],
                            weight=c["weight"], reference_prompt=c["reference_prompt"])
                    for c in spec["concepts"]]
        t0 = time.monotonic()
        with Client(stack.base_url) as client:
            job = client.submit(spec["prompt"], concepts,
                                params={"steps": steps, "seed": spec["seed"],
                                        "width": size, "height": size})
            print(f"submitted job {job.id} ({job.status})")
            def progress(p: dict) -> None:  # events come at most every 0.5 s
                print(f"  {p['stage']}: step {p['step']}/{p['total']}")

            try:
                client.wait(job.id, on_progress=progress, timeout=600)
            except JobFailed as e:
                print(f"job failed: {e}", file=sys.stderr)
                return 1
            client.download(job.id, out / "demo.png")
            client.download(job.id, out / "demo_semantic_map.png", what="semantic_map")
        print(f"done in {time.monotonic() - t0:.1f} s")
        if model == "tiny":
            print("(tiny random-weight model: the image is noise; set MAGICFACE_MODEL to a "
                  "checkpoint for a real picture)")
        print(f"result: {out / 'demo.png'}")
        print(f"semantic map: {out / 'demo_semantic_map.png'}")
        return 0
    except StackError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
