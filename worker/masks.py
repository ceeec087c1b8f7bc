"""The worker's mask proposals (`service.masks`): the image and the concept word in,
the mask out as a PNG data URI with its box, score and source. Nothing found is the
client's answer (`{"ok": false, "error": {...}}`), not a failed job."""

from __future__ import annotations

import base64
import io
import logging

from service.schemas import ErrorCode

from . import tasks

__all__ = ["propose", "load_proposer"]

log = logging.getLogger("magicface.worker")


def load_proposer(settings, device: str):
    """The MaskProposer the settings ask for, or None (MASK_DETECTOR and MASK_FACES
    unset): its models load once, here, beside the pipeline."""
    if not settings.proposes_masks:
        return None
    from magicface_core.auto_masks import MaskProposer

    return MaskProposer.from_settings(
        detector=settings.mask_detector, sam_checkpoint=settings.sam_checkpoint,
        sam_model_type=settings.sam_model_type, faces=settings.mask_faces,
        device=str(device), threshold=settings.mask_threshold)


def propose(request: dict) -> dict:
    """RQ's call for one proposal."""
    from magicface_core import MagicFaceInputError

    rt = tasks.RUNTIME
    if rt is None or rt.proposer is None:
        raise RuntimeError("this worker proposes no masks (MASK_DETECTOR, MASK_FACES)")
    try:
        image = base64.b64decode(request["image"], validate=True)
        p = rt.proposer(image, request["word"],
                        reference_prompt=request.get("reference_prompt"))
    except MagicFaceInputError as e:
        return {"ok": False, "error": {"code": ErrorCode.INVALID_INPUT.value,
                                       "message": str(e)}}
    buf = io.BytesIO()
    p.mask.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"ok": True, "proposal": {"mask": uri, "box": [int(v) for v in p.box],
                                     "score": round(float(p.score), 4), "source": p.source}}
