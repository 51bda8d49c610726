"""One manifest sample → its shard member: resized image, ROI crops, normalised boxes, tokens.

This is the per-image work of ``make_shards``; ``bench/shards.py`` measures it against a bare
decode/resize/encode loop.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from sapretrain import storage
from sapretrain.data.manifest import BadSample
from sapretrain.shards.schema import PARTS
from sapretrain.shards.tokens import SpanTokenizer

BOX_TOLERANCE_PX = 1.0  # boxes may overshoot the image by rounding; more than this is bad input
ROI_FILL = (124, 116, 104)  # ~CLIP's mean colour: padding that normalises to ~0


@dataclass(frozen=True)
class ImageSpec:
    image_size: int  # shorter side of the stored image
    roi_size: int  # side of the square ROI crops
    roi_context: float  # ROI square side = roi_context x the box's longer side
    jpeg_quality: int
    max_pixels: int  # larger images are refused as decompression bombs
    draft: bool  # let libjpeg decode at reduced scale when that loses nothing we keep


def process_sample(sample: dict[str, Any], spec: ImageSpec, tokenizer: SpanTokenizer) -> tuple[dict, dict]:
    """``(meta, jpegs)`` of one sample; raises BadSample with the skip reason."""
    meta = {
        "id": sample["id"],
        "image_key": image_key(sample),
        "source": sample["source"],
        "kind": sample["triplet"]["rel"]["kind"],
        "relation": sample.get("relation", sample["triplet"]["rel"].get("text", "")),
        **tokenize(sample["caption"], sample["triplet"], tokenizer, "caption"),
        "negative": tokenize(sample["negative"]["caption"], sample["negative"]["triplet"], tokenizer, "negative"),
    }
    for optional in ("license", "meta"):
        if optional in sample:
            meta[optional] = sample[optional]
    image = open_image(sample, spec)
    width, height = image.info["original_size"]
    boxes = {part: checked_box(sample["boxes"][part], width, height, part) for part in ("subj", "obj")}
    meta["boxes"] = {part: [round(v, 6) for v in normalise(box, width, height)] for part, box in boxes.items()}
    meta["orig_size"] = [width, height]
    jpegs = crop_and_encode(image, boxes, spec)
    return meta, jpegs


def image_key(sample: dict[str, Any]) -> str:
    """The side-car's ``image_key``: the manifest's own (e.g. a COCO image id), else a hash of the
    resolved image reference, so every caption of one image file shares it. A hash, not the
    reference itself: a path or a signed URL does not belong in shards that get shared."""
    if sample.get("image_key") is not None:
        return str(sample["image_key"])
    return "image-" + hashlib.blake2b(sample["image"].encode("utf-8"), digest_size=8).hexdigest()


def tokenize(caption: str, triplet: dict, tokenizer: SpanTokenizer, where: str) -> dict[str, Any]:
    spans = {part: (triplet[part]["start"], triplet[part]["end"]) for part in PARTS}
    try:
        tokenized = tokenizer(caption, spans)
    except ValueError as e:  # e.g. a huge caption whose text cleaning cannot be aligned
        raise BadSample("bad_caption", f"{where}: {e}") from None
    lost = [part for part in PARTS if not tokenized.spans[part]]
    if lost:
        raise BadSample(
            "span_truncated", f"{where}: {', '.join(lost)} has no token within {tokenizer.context_length}"
        )
    return {
        "caption": caption,
        "char_spans": {part: list(spans[part]) for part in PARTS},
        "tokens": tokenized.ids,
        "spans": tokenized.spans,
        "truncated": tokenized.truncated,
    }


def open_image(sample: dict[str, Any], spec: ImageSpec) -> Image.Image:
    """Decode the sample's image, at reduced JPEG scale when nothing we keep needs more pixels.

    The returned image carries ``info["original_size"]`` (full-resolution width, height).
    """
    try:
        data = storage.read_bytes(sample["image"])
    except FileNotFoundError:
        raise BadSample("missing_image", f"{sample['image']} does not exist") from None
    except OSError as e:
        raise BadSample("missing_image", f"{sample['image']}: {e}") from None
    try:
        with warnings.catch_warnings():
            # PIL only warns between max_pixels and 2x max_pixels: make it an error throughout.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > spec.max_pixels:
                raise BadSample("decompression_bomb", f"{sample['image']}: {width}x{height} pixels > {spec.max_pixels}")
            if sample.get("width", width) != width or sample.get("height", height) != height:
                raise BadSample(
                    "size_mismatch",
                    f"{sample['image']}: manifest says {sample['width']}x{sample['height']}, image is {width}x{height}",
                )
            if spec.draft and image.format == "JPEG":
                scale = draft_scale(sample["boxes"], width, height, spec)
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            image = image.convert("RGB")  # decodes now: truncated data raises here
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("decompression_bomb", f"{sample['image']}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSample("unreadable_image", f"{sample['image']}: {e}") from None
    image.info["original_size"] = (width, height)
    return image


def draft_scale(boxes: dict, width: int, height: int, spec: ImageSpec) -> float:
    """The smallest decode scale that still gives every output its full resolution."""
    needed = spec.image_size / min(width, height)
    for part in ("subj", "obj"):
        x0, y0, x1, y1 = boxes[part]
        side = max(x1 - x0, y1 - y0, 1.0) * spec.roi_context
        needed = max(needed, spec.roi_size / side)
    return min(1.0, needed)


def checked_box(box: list[float], width: int, height: int, part: str) -> tuple[float, ...]:
    x0, y0, x1, y1 = box
    tol = BOX_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise BadSample("box_outside_image", f"{part} box {box} outside the {width}x{height} image")
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        raise BadSample("box_outside_image", f"{part} box {box} has less than a pixel inside the image")
    return x0, y0, x1, y1


def normalise(box: tuple[float, ...], width: int, height: int) -> tuple[float, ...]:
    x0, y0, x1, y1 = box
    return x0 / width, y0 / height, x1 / width, y1 / height


def crop_and_encode(image: Image.Image, boxes: dict, spec: ImageSpec) -> dict[str, bytes]:
    """JPEG bytes of the resized image and the two square ROI crops (keys image, subj, obj)."""
    width, height = image.info["original_size"]
    sx, sy = image.width / width, image.height / height  # draft decoding shrank the image
    short = min(image.width, image.height)
    size = (round(image.width * spec.image_size / short), round(image.height * spec.image_size / short))
    out = {"image": encode_jpeg(image.resize(size, Image.BICUBIC), spec.jpeg_quality)}
    for part, (x0, y0, x1, y1) in boxes.items():
        out[part] = encode_jpeg(roi_crop(image, (x0 * sx, y0 * sy, x1 * sx, y1 * sy), spec), spec.jpeg_quality)
    return out


def roi_crop(image: Image.Image, box: tuple[float, ...], spec: ImageSpec) -> Image.Image:
    """A square around the box (aspect kept, whole object visible), padded where it leaves the image."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * spec.roi_context
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    side = max(1, round(side))
    region = (left, top, left + side, top + side)
    if left >= 0 and top >= 0 and left + side <= image.width and top + side <= image.height:
        crop = image.crop(region)
    else:
        crop = Image.new("RGB", (side, side), ROI_FILL)
        inner = (max(left, 0), max(top, 0), min(left + side, image.width), min(top + side, image.height))
        crop.paste(image.crop(inner), (inner[0] - left, inner[1] - top))
    return crop.resize((spec.roi_size, spec.roi_size), Image.BICUBIC)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
