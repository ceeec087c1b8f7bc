"""Bring up Redis (the machine's, or a redis-server of our own), the gateway and one
worker on the embedded defaults, submit the shipped synthetic example over HTTP,
wait, and print where the result PNG is. Everything started here is stopped at the end.

    python scripts/demo_service.py   (scripts/demo.sh sets up the venv first)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.stack import Stack, redis_url  # noqa: E402


def main() -> int:
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    url, redis_proc = redis_url(db=0)
    model = os.environ.get("MAGICFACE_MODEL", "tiny")
    steps = int(os.environ.get("STEPS", "30" if model == "tiny" else "50"))
    size = 256 if model == "tiny" else 512
    print(f"redis: {url}{' (started for the demo)' if redis_proc else ''}; model: {model}")
    stack = Stack({"REDIS_URL": url, "STORAGE_URL": f"file://{out / 'storage'}",
                   "MAGICFACE_MODEL": model, "MAGICFACE_DEMO": "true",
                   "QUEUE_NAME": "magicface-demo"}, out / "logs")
    try:
        stack.start_gateway()
        print(f"gateway: {stack.base_url} (docs at {stack.base_url}/docs)")
        stack.start_worker()
        ex = ROOT / "examples" / "synthetic"
        spec = json.loads((ex / "example.json").read_text())
        concepts = [{k: c[k] for k in ("word", "weight", "reference_prompt")}
                    for c in spec["concepts"]]
        r = stack.submit(spec["prompt"], concepts, [ex / c["image"] for c in spec["concepts"]],
                         [ex / c["mask"] for c in spec["concepts"]],
                         {"steps": steps, "seed": spec["seed"], "width": size, "height": size})
        r.raise_for_status()
        job = r.json()
        print(f"submitted job {job['id']}: POST /v1/jobs -> {r.status_code}, "
              f"Location {r.headers['location']}")
        t0 = time.monotonic()
        last = -1
        while True:
            view = stack.client.get(f"/v1/jobs/{job['id']}").json()
            if view["progress"]["step"] != last:
                last = view["progress"]["step"]
                print(f"  {view['status']}: step {last}/{view['progress']['total']}")
            if view["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.3)
        if view["status"] != "succeeded":
            print(f"job {view['status']}: {view['error']}", file=sys.stderr)
            return 1
        png = stack.client.get(view["result"]["image_url"]).content
        (out / "demo.png").write_bytes(png)
        smap = stack.client.get(view["result"]["semantic_map_url"]).content
        (out / "demo_semantic_map.png").write_bytes(smap)
        print(f"done in {time.monotonic() - t0:.1f} s")
        if model == "tiny":
            print("(tiny random-weight model: the image is noise; set MAGICFACE_MODEL to a "
                  "checkpoint for a real picture)")
        print(f"result: {out / 'demo.png'}")
        print(f"semantic map: {out / 'demo_semantic_map.png'}")
        return 0
    finally:
        stack.stop()
        if redis_proc is not None:
            redis_proc.terminate()


if __name__ == "__main__":
    sys.exit(main())
