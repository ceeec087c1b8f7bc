"""The worker rides on RQ's public API only: no name RQ keeps private (a leading
underscore anywhere in RQ's source) is read, called or overridden in worker/, so an RQ
release within the bound cannot break it by renaming internals."""

from __future__ import annotations

import re
from pathlib import Path

import rq

ROOT = Path(__file__).resolve().parents[2]


def _rq_private_names() -> set[str]:
    names: set[str] = set()
    for path in Path(rq.__file__).parent.rglob("*.py"):
        names |= set(re.findall(r"\b(_[a-z]\w*)", path.read_text()))
    return names


def test_no_private_rq_name_is_used_in_the_worker():
    private = _rq_private_names()
    assert {"_finalize_success", "_stop_requested", "_result"} <= private  # the test sees
    found = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        text = path.read_text()
        used = set(re.findall(r"\.(_[a-z]\w*)", text)) | set(re.findall(r"def (_[a-z]\w*)",
                                                                           text))
        used |= set(re.findall(r"getattr\(\w+, \"(_[a-z]\w*)\"", text))
        found += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(used & private)]
    assert found == [], found


def test_batch_outcomes_are_not_module_state():
    from worker import tasks

    assert not hasattr(tasks.Runtime, "outcomes")
    assert "outcomes" not in {f for f in tasks.Runtime.__dataclass_fields__}
