"""Decoding images and masks, letterboxing, and automatic masks from segment-anything."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MagicFaceInputError

__all__ = ["load_image", "binarize_mask", "letterbox", "sam_mask", "load_sam_predictor",
           "MAX_IMAGE_PIXELS"]

# Larger images are refused before decoding (a decompression bomb guard).
MAX_IMAGE_PIXELS = 64_000_000


def _from_array(source: Any, what: str) -> Image.Image:
    """A numpy array or torch tensor as an image: (H, W) grey, (H, W, 3|4) or
    (3|4, H, W) colour, optionally with a leading batch of one (diffusers' image
    tensors are (1, 3, H, W)); uint8 or bool as is, floats in [0, 1]."""
    if hasattr(source, "detach"):
        t = source.detach().cpu()
        # numpy has no bfloat16; every float is rescaled to uint8 below anyway.
        arr = (t.float() if t.is_floating_point() else t).numpy()
    else:
        arr = np.asarray(source)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # channels first (a torch image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise MagicFaceInputError(f"{what}: an array must be (H, W), (H, W, 3|4) or "
                                  f"(3|4, H, W), got shape {tuple(source.shape)}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MagicFaceInputError(f"{what}: empty image")
    if arr.shape[0] * arr.shape[1] > MAX_IMAGE_PIXELS:  # the same limit as a file's
        raise MagicFaceInputError(f"{what}: {arr.shape[1]}x{arr.shape[0]} exceeds the "
                                  f"{MAX_IMAGE_PIXELS} pixel limit")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise MagicFaceInputError(f"{what}: a float array must hold values in [0, 1]")
        arr = (arr * 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise MagicFaceInputError(f"{what}: an array must be uint8, bool or float in "
                                  f"[0, 1], got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def load_image(source: Any, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image, a path, bytes, a numpy array or a torch tensor,
    fully decoded. `what` names the input in errors."""
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray) or hasattr(source, "detach"):
        return _from_array(source, what)
    else:
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                img = Image.open(io.BytesIO(bytes(source)))
            elif isinstance(source, (str, Path)):
                img = Image.open(Path(source))
            else:
                raise MagicFaceInputError(f"{what}: expected a PIL image, a path, bytes, a "
                                          f"numpy array or a tensor, got "
                                          f"{type(source).__name__}")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise MagicFaceInputError(f"{what}: {img.width}x{img.height} exceeds the "
                                          f"{MAX_IMAGE_PIXELS} pixel limit")
            img.load()
        except FileNotFoundError as e:
            raise MagicFaceInputError(f"{what}: file not found: {source}") from e
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
            raise MagicFaceInputError(f"{what}: could not decode the image ({e})") from e
    if img.width < 1 or img.height < 1:
        raise MagicFaceInputError(f"{what}: empty image")
    # As displayed: a photo's EXIF orientation turns it (and its mask, drawn on the
    # displayed photo, must then match).
    return ImageOps.exif_transpose(img)


def binarize_mask(mask: Image.Image) -> np.ndarray:
    """Bool array: a pixel is in the mask when its grey level is at least 50%.

    (The authors' code keeps only exact 255; JPEG-compressed masks then lose
    pixels along every edge, so we threshold.)"""
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.uint16)
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.uint16)
        return (grey * alpha // 255) >= 128
    return np.asarray(mask.convert("L")) >= 128


def letterbox(
    image: Image.Image, width: int, height: int, fill: int | tuple[int, ...] = 0,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Fit `image` inside width x height keeping its aspect ratio; pad the rest."""
    scale = min(width / image.width, height / image.height)
    w = max(1, round(image.width * scale))
    h = max(1, round(image.height * scale))
    resized = image.resize((w, h), resample)
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(resized, ((width - w) // 2, (height - h) // 2))
    return canvas


def load_sam_predictor(checkpoint: str, model_type: str = "vit_h", device: str = "cpu"):
    """A segment-anything predictor from a checkpoint file."""
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("automatic masks need segment-anything: "
                           "pip install 'magicface[sam]'") from e
    if model_type not in sam_model_registry:
        raise MagicFaceInputError(f"sam_model_type must be one of {sorted(sam_model_registry)}, "
                         f"got {model_type!r}")
    if not Path(checkpoint).is_file():
        raise MagicFaceInputError(f"sam_checkpoint: file not found: {checkpoint}")
    sam = sam_model_registry[model_type](checkpoint=checkpoint)
    sam.to(device).eval()
    return SamPredictor(sam)


def sam_mask(predictor, image: Image.Image,
             box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The best single SAM mask for `image`, prompted by `box` (default: the whole
    image). Returns a bool array of the image's size (H, W)."""
    import torch

    rgb = np.asarray(image.convert("RGB"))
    if box is None:
        box = (0.0, 0.0, float(image.width), float(image.height))
    with torch.inference_mode():
        predictor.set_image(rgb)
        masks, scores, _ = predictor.predict(box=np.asarray(box, dtype=np.float32),
                                             multimask_output=False)
    return np.asarray(masks[int(np.argmax(scores))], dtype=bool)
