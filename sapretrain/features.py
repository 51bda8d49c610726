"""Feature shards: the frozen vision tower's outputs computed once (the logic of ``tools/cache_features.py``).

With a locked tower (LiT) and ROIs fixed at curation time, ``f_v`` of every image and ROI crop is
the same at every step; running the tower once over the shard set and training on its outputs
removes the vision forward (and the JPEG decoding and resizing) from every step. See
docs/features.md.

Output layout (``OUT`` a local dir or fsspec URL), one feature shard per source shard, same name,
same records in the same order (a record whose images do not decode is skipped and counted)::

    OUT/shard-000000.tar ...   per record: KEY.json (the source side-car, byte for byte) and
                               KEY.feat.npy: float16 (2, 3, D), [anchor, partner] x [image, subj, obj]
                               raw f_v outputs (before normalisation)
    OUT/features.json          model identity (see ``model_identity``): the trainer refuses another model
    OUT/sizes.json             exact record counts (the source's, unless records were skipped)
    OUT/summary.json           counts, skipped records by reason, per-shard sha256
    OUT/_progress/*.json       per-shard completion records

Each shard is written to a temporary file, committed whole (rename / one upload), then its
``_progress`` file is written; a re-run keeps committed shards, so a killed run resumes, and shards
are byte-identical to an uninterrupted run on the same device. ``part``/``num_parts`` split the
shards as ``tools/make_shards.py`` does (part ``I`` of ``N`` takes the ``I``-th contiguous share of
the sorted list, ``jobs.Parts.share``).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch

from sapretrain import jsonl, storage, tars
from sapretrain.data.loader import decode_image, list_shards, open_shard
from sapretrain.jobs import Parts, SkipLog
from sapretrain.data.batch import build_preprocess
from sapretrain.model.saclip import SAClip, SAClipConfig, build_saclip
from sapretrain.shards import schema
from sapretrain.shards.writer import add_file, HashingWriter

FORMAT = "sapretrain-features"
FORMAT_VERSION = 1
FEATURE_EXT = schema.FEATURE_EXT  # member KEY.feat.npy
SLOTS = schema.FEATURE_SLOTS  # second axis of a record's (2, 3, D) array; first axis: schema.MEMBERS


class FeatureMismatch(ValueError):
    """Feature shards were computed by another vision tower or preprocessing than the model's."""


# ---------------------------------------------------------------- identity


def vision_fingerprint(model: SAClip) -> str:
    """sha256 over the vision tower's tensors (names, shapes, float32 values): the weights' identity,
    whatever tag or path they came from (random init included, which is seed-dependent)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.clip.visual.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def model_identity(model: SAClip, image_size: int | None = None) -> dict[str, Any]:
    """What the cached features depend on. ``image_size``: the loader's pre-resize (data.image_size)."""
    cfg = model.cfg
    clip = model.clip
    preprocess = open_clip.transform.merge_preprocess_dict(
        open_clip.get_model_preprocess_cfg(clip), {"resize_mode": "squash"}  # as build_preprocess
    )
    model_cfg = model.model_cfg or {}
    identity = {
        "name": cfg.name,
        "pretrained": cfg.pretrained,
        "embed_dim": model.embed_dim,
        "vision_cfg": model_cfg.get("vision_cfg"),
        "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
        "preprocess": preprocess,
        "decode_image_size": image_size,
        "vision_sha256": vision_fingerprint(model),
    }
    return json.loads(json.dumps(identity))  # tuples → lists: compares equal to a loaded header


def read_header(features: str) -> dict[str, Any]:
    url = f"{str(features).rstrip('/')}/features.json"
    if not storage.exists(url):
        raise FileNotFoundError(f"data.features={features}: no {url}; write feature shards with "
                                "tools/cache_features.py")
    header = json.loads(storage.read_bytes(url))
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise FeatureMismatch(f"{url}: format {header.get('format')!r} v{header.get('version')!r}, this reader "
                              f"reads {FORMAT!r} v{FORMAT_VERSION}; re-run tools/cache_features.py")
    return header


def check_features(features: str, model: SAClip, image_size: int | None = None) -> dict[str, Any]:
    """Refuse feature shards that ``model`` would not have computed itself; returns the header."""
    if not model.vision_frozen:
        raise FeatureMismatch(
            "data.features needs a fully frozen vision tower (cached features cannot train it): "
            "set model.lock_image=true and model.unlock_image_groups=0, or train on pixels (unset data.features)"
        )
    header = read_header(features)
    cached, ours = header["model"], model_identity(model, image_size)
    # The pretrained tag/path is informational: the weights' hash decides (a tag and a local copy agree).
    differ = [k for k in ours if k != "pretrained" and cached.get(k) != ours[k]]
    if differ:
        lines = [f"  {k}: features {cached.get(k)!r}, model {ours[k]!r}" for k in differ if k != "vision_sha256"]
        if "vision_sha256" in differ:
            seed = " (a random-init tower depends on the seed: run.seed / --seed)" if model.cfg.pretrained is None else ""
            lines.append(f"  vision weights: features from {cached.get('name')!r} / pretrained "
                         f"{cached.get('pretrained')!r}, the model's ({model.cfg.name!r} / pretrained "
                         f"{model.cfg.pretrained!r}) hash differently{seed}")
        raise FeatureMismatch(
            f"{features}: the cached features were computed by another vision tower or preprocessing than this "
            "model's:\n" + "\n".join(lines) + "\nre-run tools/cache_features.py with this model "
            "(--config <the training config>), or train on pixels (unset data.features)"
        )
    return header


# ---------------------------------------------------------------- writing


@dataclass
class FeatureReport:
    output: str
    shards_total: int
    shards_written: int  # by this call
    shards_skipped: int  # already done before this call
    records_written: int
    records_skipped: int
    finalized: bool
    seconds: float


def build_frozen_model(cfg: SAClipConfig, seed: int = 0) -> SAClip:
    """The model whose tower computes the features: ``cfg`` with the tower locked, built after
    ``torch.manual_seed(seed)`` as the trainer builds it (so a random-init tower is the same)."""
    values = {**cfg.__dict__, "lock_image": True, "unlock_image_groups": 0}
    torch.manual_seed(seed)
    return build_saclip(SAClipConfig(**values)).eval()


def cache_features(shards: str, output: str, model: SAClip, image_size: int | None = None, batch_size: int = 256,
                   device: str | None = None, part: int = 0, num_parts: int = 1,
                   progress: bool = True) -> FeatureReport:
    """Write this part's missing feature shards for the shard set ``shards``; finalize when all are done."""
    from tqdm import tqdm

    parts = Parts(part, num_parts)
    start = time.time()
    output = str(output).rstrip("/")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sources = list_shards(shards)
    names = [s.url.rstrip("/").rsplit("/", 1)[-1] for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"{shards}: shard names repeat across directories; cache each directory separately")
    header = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": "float16",
              "layout": "(2, 3, D): [a, p] x [image, subj, obj]", "source": str(shards),
              "model": model_identity(model, image_size)}
    claim_output(output, header)

    mine = list(parts.share(len(sources)))
    _remove_stale_temps(output, {names[i] for i in mine})
    todo = [i for i in mine if not storage.exists(_progress_url(output, names[i]))]
    model = model.to(device).eval()
    preprocess = build_preprocess(model)
    written = skipped = 0
    total = sum(sources[i].records for i in todo)
    with tqdm(total=total, unit="rec", desc="cache_features", disable=not progress) as bar:
        for i in todo:
            stats = write_feature_shard(sources[i].url, f"{output}/{names[i]}", model, preprocess, image_size,
                                        batch_size, device, on_records=bar.update)
            storage.write_bytes_atomic(_progress_url(output, names[i]), schema.encode_json(stats))
            written += stats["records"]
            skipped += sum(stats["skipped"]["counts"].values())
    finalized = _finalize(output, names)
    return FeatureReport(output, len(sources), len(todo), len(mine) - len(todo), written, skipped, finalized,
                         time.time() - start)


def claim_output(output: str, header: dict) -> None:
    """Write features.json, or refuse to mix models (or sources) in one output."""
    url = f"{output}/features.json"
    text = json.dumps(header, indent=1, sort_keys=True).encode()
    if storage.exists(url):
        if json.loads(storage.read_bytes(url)) != json.loads(text):
            raise SystemExit(f"{output} holds features of another model, preprocessing or source (see {url}); "
                             "use a new --output or delete the old one")
        return
    storage.write_bytes_atomic(url, text)


def write_feature_shard(src_url: str, url: str, model: SAClip, preprocess, image_size: int | None,
                        batch_size: int, device: str, on_records=None) -> dict[str, Any]:
    """One source shard → one feature shard (committed whole); returns its progress record."""
    skips = SkipLog()
    name = url.rsplit("/", 1)[-1]
    records = _read_source(src_url, skips)
    tmp = storage.local_temp_for(url)
    count = 0
    with open(tmp, "wb") as raw:
        sink = HashingWriter(raw)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
            pending: list[tuple[str, bytes, list[torch.Tensor]]] = []
            for key, members in records:
                try:
                    pixels = [preprocess(decode_image(members[ext], image_size)) for ext in _image_exts()]
                except Exception as e:  # truncated or corrupt JPEG, decompression bomb, ...
                    skips.add("bad_image", f"{name}/{key}: {type(e).__name__}: {e}")
                    if on_records:
                        on_records(1)
                    continue
                pending.append((key, members["json"], pixels))
                if len(pending) * len(_image_exts()) >= batch_size:
                    count += _flush(tar, pending, model, device, on_records)
            count += _flush(tar, pending, model, device, on_records)
    storage.commit(tmp, url)
    return {"shard": name, "records": count, "bytes": sink.size, "sha256": sink.sha256.hexdigest(),
            "skipped": skips.to_dict()}


def _image_exts() -> list[str]:
    return [schema.image_members(m)[slot] for m in schema.MEMBERS for slot in SLOTS]


def _read_source(url: str, skips: SkipLog):
    """(key, members) of one source shard whose members and side-car are valid; others counted."""
    try:
        stream = open_shard(url)
    except storage.StorageUnavailable:
        raise  # an outage is no bad shard: stop (the job resumes), never cache features without it
    except Exception as e:
        skips.add("unreadable_shard", f"{url}: {type(e).__name__}: {e}")
        return
    try:
        with stream:
            for record in tars.records(stream, url):
                key = record["__key__"]
                missing = [ext for ext in schema.EXTENSIONS if ext not in record]
                if missing:
                    skips.add("incomplete_record", f"{url}/{key}: lacks {missing}")
                    continue
                try:
                    schema.validate_record(key, jsonl.parse_record(record["json"]))  # never raises past ValueError
                except (ValueError, schema.SchemaError) as e:
                    skips.add("bad_json", f"{url}/{key}: {e}")
                    continue
                yield key, record
    except (tarfile.TarError, EOFError, OSError) as e:
        skips.add("truncated_shard", f"{url}: {type(e).__name__}: {e}")


@torch.no_grad()
def _flush(tar: tarfile.TarFile, pending: list, model: SAClip, device: str, on_records) -> int:
    """Run the tower over the pending records' 6 images each and write their members."""
    if not pending:
        return 0
    pixels = torch.stack([p for _, _, images in pending for p in images]).to(device)  # (6B, 3, H, W)
    feats = model.clip.encode_image(pixels).float().cpu()  # (6B, D) raw f_v, as SAClip.vision_features
    feats = feats.unflatten(0, (len(pending), len(schema.MEMBERS), len(SLOTS))).to(torch.float16)  # (B, 2, 3, D)
    for (key, side_car, _), array in zip(pending, feats.numpy()):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        add_file(tar, f"{key}.json", side_car)
        add_file(tar, f"{key}.{FEATURE_EXT}", buf.getvalue())
    n = len(pending)
    pending.clear()
    if on_records:
        on_records(n)
    return n


def _progress_url(output: str, name: str) -> str:
    return f"{output}/_progress/{name}.json"


def _remove_stale_temps(output: str, mine: set[str]) -> None:
    """Delete temporaries a killed run of this part left behind (local outputs only)."""
    fs, path = storage.url_to_fs(output)
    if not storage.is_local(fs):
        return
    for tmp in fs.glob(f"{path}/*.tmp.*") + fs.glob(f"{path}/_progress/*.tmp.*"):
        base = re.sub(r"(\.json)?\.tmp\.\d+$", "", tmp.rsplit("/", 1)[-1])
        if base in mine:
            fs.rm(tmp)


def _finalize(output: str, names: list[str]) -> bool:
    """sizes.json and summary.json once every shard is done."""
    stats = []
    for name in names:
        url = _progress_url(output, name)
        if not storage.exists(url):
            return False
        stats.append(json.loads(storage.read_bytes(url)))
    skips = SkipLog()
    for s in stats:
        skips.merge(SkipLog.from_dict(s["skipped"]))
    sizes = {s["shard"]: s["records"] for s in stats}
    summary = {"format": FORMAT, "records": sum(sizes.values()), "skipped": skips.to_dict(),
               "shards": [{k: s[k] for k in ("shard", "records", "bytes", "sha256")} for s in stats]}
    storage.write_bytes_atomic(f"{output}/sizes.json", json.dumps(sizes, indent=1, sort_keys=True).encode())
    storage.write_bytes_atomic(f"{output}/summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    return True
