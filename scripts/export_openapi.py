"""Write the gateway's OpenAPI document to openapi/openapi.json.

    python scripts/export_openapi.py          # write
    python scripts/export_openapi.py --check  # exit 1 if the file is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "openapi" / "openapi.json"


def document() -> dict:
    # The document does not depend on Redis or storage; nothing is connected here.
    import tempfile

    from redis import Redis

    from service.app import create_app
    from service.settings import Settings
    from service.storage import LocalStorage

    app = create_app(Settings(), redis=Redis(), storage=LocalStorage(tempfile.mkdtemp()))
    return app.openapi()


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/export_openapi.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
