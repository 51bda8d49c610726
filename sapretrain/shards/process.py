"""One manifest sample → its shard member: resized image, ROI crops, normalised boxes, tokens.

This is the per-image work of ``make_shards``; ``bench/shards.py`` measures it against a bare
decode/resize/encode loop.

Hostile images are skipped with a reason, never crash the writer (docs/shards.md, "Skipped
inputs"): only regular files up to ``max_bytes`` are read (``/dev/zero``, a FIFO, a 10 GB file:
``unreadable_image`` / ``image_too_large``); an image whose stored size would exceed JPEG's
65,500 px side (a 1000x3 strip becomes 74,667x224) is ``extreme_aspect``; 16-bit greyscale is
scaled to 8 bits (not clipped to white), float/32-bit images are ``unsupported_mode``; an EXIF
orientation other than "normal" is ``exif_rotated``: every box and size of the pipeline (COCO/VG
annotations, the detector, which reads the stored pixels) is in the stored-pixel frame, while the
captioner saw the image rotated, so its spatial words and its boxes may disagree.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sapretrain import storage, tars
from sapretrain.shards.schema import PARTS, BadSample

if TYPE_CHECKING:  # a type only: reading images and manifests needs no open_clip / torch
    from sapretrain.shards.tokens import SpanTokenizer

BOX_TOLERANCE_PX = 1.0  # boxes may overshoot the image by rounding; more than this is bad input
ROI_FILL = (124, 116, 104)  # ~CLIP's mean colour: padding that normalises to ~0
MAX_IMAGE_BYTES = 256 << 20  # an encoded image beyond this is refused unread (~3x a max_pixels bitmap)
JPEG_MAX_SIDE = 65_500  # libjpeg's largest image side
EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class ImageSpec:
    image_size: int  # shorter side of the stored image
    roi_size: int  # side of the square ROI crops
    roi_context: float  # ROI square side = roi_context x the box's longer side
    jpeg_quality: int
    max_pixels: int  # larger images are refused as decompression bombs
    draft: bool  # let libjpeg decode at reduced scale when that loses nothing we keep
    max_bytes: int = MAX_IMAGE_BYTES  # larger image files are refused without reading them


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
    try:
        jpegs = crop_and_encode(image, boxes, spec)
    except (OSError, ValueError, MemoryError) as e:  # whatever the encoder refuses costs this sample only
        raise BadSample("unencodable_image", f"{sample['image']}: {type(e).__name__}: {e}") from None
    return meta, jpegs


def image_key(sample: dict[str, Any]) -> str:
    """The side-car's ``image_key``: the manifest's own (e.g. a COCO image id), else a hash of the
    image reference (``read_manifest`` fills it from the reference as written, before resolving it,
    so the same manifest gives the same keys read from disk or from object storage)."""
    if sample.get("image_key") is not None:
        return str(sample["image_key"])
    return hashed_image_key(sample["image"])


def hashed_image_key(ref: str) -> str:
    """Every caption of one image file shares this key. A hash, not the reference itself: a path or
    a signed URL does not belong in shards that get shared."""
    return "image-" + hashlib.blake2b(ref.encode("utf-8"), digest_size=8).hexdigest()


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
    data = read_image_bytes(sample["image"], spec.max_bytes)
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
            stored = max(width, height) * spec.image_size / max(1, min(width, height))
            if stored > JPEG_MAX_SIDE:
                raise BadSample("extreme_aspect", f"{sample['image']}: {width}x{height} would be stored "
                                f"{round(stored)} px long, beyond JPEG's {JPEG_MAX_SIDE}")
            orientation = exif_orientation(image)
            if orientation not in (None, 1):
                raise BadSample("exif_rotated", f"{sample['image']}: EXIF orientation {orientation}; its boxes are "
                                "in stored pixels, its caption describes the rotated view")
            if spec.draft and image.format == "JPEG":
                scale = draft_scale(sample["boxes"], width, height, spec)
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            image = to_rgb(image, sample["image"])  # decodes now: truncated data raises here
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("decompression_bomb", f"{sample['image']}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSample("unreadable_image", f"{sample['image']}: {e}") from None
    image.info["original_size"] = (width, height)
    return image


def read_image_bytes(ref: str, max_bytes: int) -> bytes:
    """The encoded image at ``ref``, or BadSample: only regular files of at most ``max_bytes``.

    Local files are checked by ``fstat`` on a non-blocking descriptor, so a FIFO is refused
    instead of blocking and a device (``/dev/zero``) instead of filling memory; every read is
    bounded by ``max_bytes`` whatever a size field claimed.
    """
    try:
        tar_ref = tars.parse_ref(ref)
        if tar_ref is not None:
            size = tar_ref.size  # a located reference states it: one ranged read, no index
            if size is None and tar_ref.tar.lower().endswith(".tar"):  # indexed: known before reading
                entry = tars.index(tar_ref.tar).get(tar_ref.member)
                size = entry[1] if entry is not None else None
            if size is not None and size > max_bytes:
                raise BadSample("image_too_large", f"{ref}: {size} bytes > {max_bytes}")
            data = tars.read_ref(tar_ref)
        elif not storage.is_url(ref) or ref.startswith("file://"):
            data = _read_local(ref.removeprefix("file://"), max_bytes)
        else:
            fs, path = storage.url_to_fs(ref)
            size = fs.info(path).get("size")
            if size is not None and size > max_bytes:
                raise BadSample("image_too_large", f"{ref}: {size} bytes > {max_bytes}")
            with fs.open(path, "rb") as f:
                data = f.read(max_bytes + 1)
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample("missing_image", f"{ref} does not exist") from None
    except (OSError, ValueError) as e:  # no permission, a directory, a NUL in the path, a broken tar ...
        raise BadSample("missing_image", f"{ref}: {type(e).__name__}: {e}") from None
    if len(data) > max_bytes:
        raise BadSample("image_too_large", f"{ref}: more than {max_bytes} bytes")
    return data


def _read_local(path: str, max_bytes: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadSample("unreadable_image", f"{path}: not a regular file (a device, FIFO or socket)")
        if info.st_size > max_bytes:
            raise BadSample("image_too_large", f"{path}: {info.st_size} bytes > {max_bytes}")
        return f.read(max_bytes + 1)


def exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag (1 = as stored), None without one; BadSample if EXIF is corrupt."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION)
    except Exception as e:  # PIL's EXIF parser raises many types on damaged metadata
        raise BadSample("bad_exif", f"EXIF does not parse ({type(e).__name__}: {e})") from None
    return value if isinstance(value, int) else None


def to_rgb(image: Image.Image, ref: str) -> Image.Image:
    """8-bit RGB. 16-bit greyscale is scaled (PIL's convert would clip it to white); images whose
    range is not known (32-bit integer, float) are refused."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and image.format == "PNG"):  # PNG "I" holds 16 bits
        grey = np.asarray(image).astype(np.uint32)  # (H, W)
        grey = ((np.clip(grey, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("I", "F"):
        raise BadSample("unsupported_mode", f"{ref}: {mode} pixels ({image.format}) have no known 8-bit range")
    return image.convert("RGB")


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
