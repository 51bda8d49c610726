"""Synthetic CLEVR-like two-object scenes: the embedded default training and evaluation data.

Each scene shows a subject A and an object B (cube or sphere, CLEVR's colours, sizes and
materials) on a gray ground plane, placed in one of 8 configurations of A relative to B as seen
from the camera (front = closer to the camera). The renderer is a small numpy ray caster with a
true pinhole camera, so "behind" objects are higher in the image and smaller. Captions come from
varied templates with gold SVO spans, an opposite negative, boxes, and a positive partner.

Determinism and held-apart splits: a scene is a pure function of ``(split, index)``. Its seed is
``SPLIT_SEED_BASE[split] + index``; train seeds lie in ``[0, EVAL_SEED_BASE)`` and eval seeds
start at ``EVAL_SEED_BASE``, so no evaluation scene is a training scene. Scenes ``2k`` and
``2k+1`` are positive partners: the same relation of the caption's subject to its object, with
objects, camera and caption template drawn independently. That is what the paper's retrieved
positives are (the nearest other sample by SVO text: same relation, similar objects, another
image), taken to the point where the relation is all the pair shares.

``write_synthetic(out_dir, "train", 4000)`` writes a split as PNGs plus a curated manifest
(docs/manifest.md); ``render_scene(split, index)`` gives one scene with its labels.
"""
from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from sapretrain import relations

CONFIGURATIONS: tuple[str, ...] = (
    "front", "behind", "left", "right", "front-left", "front-right", "behind-left", "behind-right",
)
# A configuration's parts as relation phrases: its opposite flips each part through the project's
# one relations table (sapretrain/relations.py), "front-left" -> "behind-right".
_PART_PHRASES: dict[str, str] = {"front": "in front of", "behind": "behind", "left": "left of", "right": "right of"}


def _opposite(configuration: str) -> str:
    by_phrase = {phrase: part for part, phrase in _PART_PHRASES.items()}
    flipped = [by_phrase.get(relations.inverse(_PART_PHRASES[p], "spatial") or "") for p in configuration.split("-")]
    if None in flipped or "-".join(flipped) not in CONFIGURATIONS:
        raise ValueError(f"the relations lexicon has no opposite configuration of {configuration!r} ({flipped})")
    return "-".join(flipped)


OPPOSITE: dict[str, str] = {c: _opposite(c) for c in CONFIGURATIONS}
# Unit offsets of A from B in the camera's ground frame: (+right, +away from the camera).
_DIRECTIONS: dict[str, tuple[int, int]] = {
    "front": (0, -1), "behind": (0, 1), "left": (-1, 0), "right": (1, 0),
    "front-left": (-1, -1), "front-right": (1, -1), "behind-left": (-1, 1), "behind-right": (1, 1),
}

EVAL_SEED_BASE = 10**9
SPLIT_SEED_BASE: dict[str, int] = {"train": 0, "eval": EVAL_SEED_BASE}
SOURCE = "clevr-synthetic"

# CLEVR's properties.json (facebookresearch/clevr-dataset-gen): sRGB colours, radii in world units.
COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
SIZES: dict[str, float] = {"large": 0.7, "small": 0.35}
SHAPES: tuple[str, ...] = ("cube", "sphere")
MATERIALS: tuple[str, ...] = ("rubber", "metal")
CUBE_HALF_SIDE = 0.75  # cube half side per unit radius; CLEVR's 1/sqrt(2) makes cubes look too small

_HFOV_DEG = 49.1  # Blender's default camera, as in CLEVR
_SUPERSAMPLE = 2  # objects are ray cast at 2x2 samples per pixel (anti-aliased edges)
_MAX_PLACEMENT_TRIES = 500

# Seed streams: which draw a generator serves, so equal seeds in different roles never correlate.
_STREAM_CONFIG, _STREAM_PAIR, _STREAM_SCENE, _STREAM_OBJECTS = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------
# Seeds and ids


def scene_seed(split: str, index: int) -> int:
    """The seed of scene ``index`` of ``split``; splits own disjoint ranges of 10**9 seeds."""
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEED_BASE)}")
    if not 0 <= index < EVAL_SEED_BASE:
        raise ValueError(f"scene index {index} outside [0, {EVAL_SEED_BASE})")
    return SPLIT_SEED_BASE[split] + index


def scene_id(split: str, index: int) -> str:
    """Dot-free manifest / WebDataset key, e.g. ``clevr-train-000000012``."""
    return f"clevr-{split}-{index:09d}"


def partner_index(index: int) -> int:
    """Scenes 2k and 2k+1 are each other's positive partner."""
    return index ^ 1


def _rng(split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([scene_seed(split, index), stream])


# --------------------------------------------------------------------------------------------
# Camera


@dataclass(frozen=True, eq=False)
class Camera:
    """Pinhole camera without roll; pixel coordinates are continuous, the image spans [0, W] x [0, H]."""

    position: np.ndarray  # (3,) world; z is up, the ground is z = 0
    forward: np.ndarray  # (3,) unit viewing direction
    right: np.ndarray  # (3,) unit, horizontal
    up: np.ndarray  # (3,) unit
    focal: float  # pixels
    width: int
    height: int

    @property
    def target(self) -> np.ndarray:
        """The ground point at the image centre."""
        return self.position + self.forward * (-self.position[2] / self.forward[2])

    @property
    def ground_forward(self) -> np.ndarray:
        """Unit horizontal direction away from the camera: "behind" is +, "front" is -."""
        g = np.array([self.forward[0], self.forward[1], 0.0])
        return g / np.linalg.norm(g)

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) world points -> (N, 2) pixel coordinates (u right, v down)."""
        d = points - self.position
        z = d @ self.forward
        u = self.width / 2 + self.focal * (d @ self.right) / z
        v = self.height / 2 - self.focal * (d @ self.up) / z
        return np.stack([u, v], axis=-1)

    def depth(self, point: np.ndarray) -> float:
        return float((point - self.position) @ self.forward)

    def rays(self, us: np.ndarray, vs: np.ndarray) -> np.ndarray:
        """Unit world ray directions through pixel columns ``us`` and rows ``vs``, flattened
        channels-first: (3, len(vs) * len(us)), row-major over (row, column)."""
        a = ((us - self.width / 2) / self.focal).astype(np.float32)
        b = ((vs - self.height / 2) / self.focal).astype(np.float32)
        f, r, u = (v.tolist() for v in (self.forward, self.right, self.up))  # Python floats keep float32
        rays = np.stack([np.add.outer(-u[i] * b, f[i] + r[i] * a).ravel() for i in range(3)])
        return rays / np.sqrt((rays * rays).sum(axis=0))


def _make_camera(rng: np.random.Generator, width: int, height: int) -> Camera:
    """A camera ~8.5 units from the scene centre looking down at 30-36 degrees, slightly jittered."""
    pitch = math.radians(rng.uniform(30.0, 36.0))
    yaw = math.radians(rng.uniform(-5.0, 5.0))
    distance = rng.uniform(8.0, 9.0)
    target = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), 0.0])
    forward = np.array([math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch), -math.sin(pitch)])
    right = np.array([math.cos(yaw), -math.sin(yaw), 0.0])
    up = np.cross(right, forward)
    focal = (width / 2) / math.tan(math.radians(_HFOV_DEG / 2))
    return Camera(target - distance * forward, forward, right, up, focal, width, height)


# --------------------------------------------------------------------------------------------
# Objects and their placement


@dataclass(eq=False)
class SceneObject:
    shape: str
    color: str
    size: str
    material: str
    center: np.ndarray  # (3,) world; resting on the ground
    angle: float  # rotation about the vertical axis (radians); 0 for spheres
    box: tuple[float, float, float, float]  # amodal projected silhouette [x0, y0, x1, y1], pixels

    @property
    def radius(self) -> float:
        """Half height: sphere radius or cube half side."""
        return _half_height(self.shape, self.size)

    @property
    def footprint(self) -> float:
        """Radius of the object's footprint on the ground (a rotated cube reaches its corners)."""
        return _footprint(self.shape, self.size)


def _half_height(shape: str, size: str) -> float:
    return SIZES[size] * (CUBE_HALF_SIDE if shape == "cube" else 1.0)


def _footprint(shape: str, size: str) -> float:
    return _half_height(shape, size) * (math.sqrt(2) if shape == "cube" else 1.0)


def _silhouette_box(shape: str, center: np.ndarray, half: float, angle: float, cam: Camera) -> tuple[float, ...]:
    """Tight pixel box of the projected object (unclipped)."""
    if shape == "cube":
        points = center + _cube_corners(half, angle)
    else:
        points = _sphere_rim(center, half, cam.position)
    uv = cam.project(points)
    return (float(uv[:, 0].min()), float(uv[:, 1].min()), float(uv[:, 0].max()), float(uv[:, 1].max()))


def _cube_corners(half: float, angle: float) -> np.ndarray:
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    return (signs * half) @ _rot_z(angle).T


def _sphere_rim(center: np.ndarray, radius: float, eye: np.ndarray, samples: int = 64) -> np.ndarray:
    """Points of the circle where rays from ``eye`` graze the sphere: its projected outline."""
    to_center = center - eye
    dist2 = float(to_center @ to_center)
    axis = to_center / math.sqrt(dist2)
    rim_center = center - radius**2 / dist2 * to_center
    rim_radius = radius * math.sqrt(1.0 - radius**2 / dist2)
    e1 = np.cross(axis, [0.0, 0.0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    phi = np.linspace(0.0, 2 * math.pi, samples, endpoint=False)[:, None]
    return rim_center + rim_radius * (np.cos(phi) * e1 + np.sin(phi) * e2)


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _make_object(props: dict[str, str], ground_xy: np.ndarray, angle: float, cam: Camera) -> SceneObject:
    half = _half_height(props["shape"], props["size"])
    center = np.array([ground_xy[0], ground_xy[1], half])
    box = _silhouette_box(props["shape"], center, half, angle, cam)
    return SceneObject(props["shape"], props["color"], props["size"], props["material"], center, angle, box)


def _place_pair(rng: np.random.Generator, cam: Camera, configuration: str,
                props: tuple[dict[str, str], dict[str, str]]) -> tuple[SceneObject, SceneObject]:
    """Positions for A and B realising ``configuration``; resampled until it reads clearly in the image."""
    side, away = _DIRECTIONS[configuration]
    g_right, g_fwd = cam.right, cam.ground_forward
    reach = _footprint(props[0]["shape"], props[0]["size"]) + _footprint(props[1]["shape"], props[1]["size"])
    for _ in range(_MAX_PLACEMENT_TRIES):
        # Offsets of A from B along the camera's ground axes: a clear gap where the relation has a
        # component, a small jitter where it has none.
        depth = away * (reach + rng.uniform(0.6, 2.0)) if away else rng.uniform(-0.12, 0.12)
        lateral = side * (reach + rng.uniform(0.3, 1.4)) if side else rng.uniform(-0.12, 0.12)
        mid = cam.target + rng.uniform(-1.3, 1.3) * g_right + rng.uniform(-1.5, 1.0) * g_fwd
        b_xy = mid - 0.5 * depth * g_fwd - 0.5 * lateral * g_right
        a_ground = b_xy + depth * g_fwd
        # Keep A on B's viewing ray before the lateral offset, so "in front of" stays straight in
        # the image rather than drifting sideways with perspective.
        a_ground = a_ground + g_right * (_ray_lateral(cam, b_xy, a_ground) + lateral)
        a = _make_object(props[0], a_ground[:2], _angle(rng, props[0]), cam)
        b = _make_object(props[1], b_xy[:2], _angle(rng, props[1]), cam)
        if _reads_clearly(configuration, a, b, cam):
            return a, b
    raise RuntimeError(f"could not place a {configuration} pair in {_MAX_PLACEMENT_TRIES} tries")


def _ray_lateral(cam: Camera, b: np.ndarray, a: np.ndarray) -> float:
    """Lateral shift that puts ground point ``a`` straight behind/in front of ``b`` in the image."""
    rel_b, rel_a = b - cam.position, a - cam.position
    along_b, along_a = rel_b @ cam.forward, rel_a @ cam.forward
    return float(rel_b @ cam.right * along_a / along_b - rel_a @ cam.right)


def _angle(rng: np.random.Generator, props: dict[str, str]) -> float:
    return float(rng.uniform(0.0, math.pi / 2)) if props["shape"] == "cube" else 0.0


def _reads_clearly(configuration: str, a: SceneObject, b: SceneObject, cam: Camera, margin: float = 3.0) -> bool:
    """Image-space check that the placement shows ``configuration`` unmistakably."""
    for box in (a.box, b.box):
        if box[0] < margin or box[1] < margin or box[2] > cam.width - margin or box[3] > cam.height - margin:
            return False
    side, away = _DIRECTIONS[configuration]
    wa, wb = a.box[2] - a.box[0], b.box[2] - b.box[0]
    ha, hb = a.box[3] - a.box[1], b.box[3] - b.box[1]
    dx = (a.box[0] + a.box[2] - b.box[0] - b.box[2]) / 2  # centre offset, + means A is right
    dy = b.box[3] - a.box[3]  # bottom-edge offset, + means A is higher (further back)
    if side and side * dx - (wa + wb) / 2 < -0.15 * min(wa, wb):
        return False  # sideways relations: boxes (almost) side by side
    if not side and abs(dx) > 0.25 * min(wa, wb):
        return False
    if away and away * dy < 0.25 * min(ha, hb):
        return False
    if not away:
        # Same depth: compare where the objects touch the ground (a big cube's corner reaches lower).
        contact = cam.project(np.array([a.center, b.center]) * [1.0, 1.0, 0.0])[:, 1]
        if abs(contact[0] - contact[1]) > 0.15 * min(ha, hb):
            return False
    far = a if cam.depth(a.center) > cam.depth(b.center) else b
    return _overlap(a.box, b.box) <= 0.2 * _area(far.box)


def _area(box: tuple[float, ...]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _overlap(p: tuple[float, ...], q: tuple[float, ...]) -> float:
    w = min(p[2], q[2]) - max(p[0], q[0])
    h = min(p[3], q[3]) - max(p[1], q[1])
    return max(w, 0.0) * max(h, 0.0)


# --------------------------------------------------------------------------------------------
# Captions

_TEMPLATES: tuple[str, ...] = (
    "a {s} is {r} a {o}",
    "the {s} is {r} the {o}",
    "there is a {s} {r} the {o}",
    "a {s} sits {r} a {o}",
    "The {s} {r} a {o}.",
    "a {s} placed {r} the {o}",
    "In this picture, a {s} is {r} a {o}.",
    "we can see a {s} {r} a {o}",
    "a {s} can be seen {r} the {o}",
    "a {s} resting on the ground {r} a {o}",
)
# Variant i of a configuration and variant i of its opposite read alike, so a negative keeps the
# caption's wording and flips only the relation.
_PHRASES: dict[str, tuple[str, ...]] = {
    "front": ("in front of",),
    "behind": ("behind",),
    "left": ("to the left of", "left of", "on the left side of"),
    "right": ("to the right of", "right of", "on the right side of"),
    "front-left": ("in front of and to the left of", "to the front left of", "in front of and left of"),
    "front-right": ("in front of and to the right of", "to the front right of", "in front of and right of"),
    "behind-left": ("behind and to the left of", "to the back left of", "behind and left of"),
    "behind-right": ("behind and to the right of", "to the back right of", "behind and right of"),
}
_NOUNS = {"cube": ("cube", "cube", "block"), "sphere": ("sphere", "sphere", "ball")}
_MATERIAL_WORDS = {"rubber": ("rubber", "rubber", "matte"), "metal": ("metal", "metal", "metallic", "shiny")}
_ATTRIBUTE_ODDS = {"size": 0.6, "color": 0.8, "material": 0.4}  # chance each attribute is named


def _describe(rng: np.random.Generator, obj: dict[str, str], other: dict[str, str]) -> str:
    """Noun phrase without determiner ("large red cube") that ``other`` does not also fit."""
    while True:
        named = [k for k, p in _ATTRIBUTE_ODDS.items() if rng.random() < p]
        if any(obj[k] != other[k] for k in named + ["shape"]):
            break
    words = []
    if "size" in named:
        words.append(obj["size"])
    if "color" in named:
        words.append(obj["color"])
    if "material" in named:
        words.append(str(rng.choice(_MATERIAL_WORDS[obj["material"]])))
    words.append(str(rng.choice(_NOUNS[obj["shape"]])))
    return " ".join(words)


def _fill(template: str, subj: str, rel: str, obj: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """Fill a template and return the caption with its triplet spans."""
    values = {"s": ("subj", subj), "r": ("rel", rel), "o": ("obj", obj)}
    caption, spans = "", {}
    for piece in re.split(r"(\{[sro]\})", template):
        if re.fullmatch(r"\{[sro]\}", piece):
            part, text = values[piece[1]]
            fixed = relations.fix_article(caption + text, len(caption))  # "a" -> "an" before a vowel
            caption = fixed[: len(fixed) - len(text)]
            spans[part] = {"text": text, "start": len(caption), "end": len(caption) + len(text)}
            caption += text
        else:
            caption += piece
    spans["rel"]["kind"] = "spatial"
    return caption, {"subj": spans["subj"], "rel": spans["rel"], "obj": spans["obj"]}


# --------------------------------------------------------------------------------------------
# Scene planning


@dataclass(eq=False)
class Scene:
    """One rendered (or only planned: ``image is None``) scene with its caption and labels."""

    split: str
    index: int
    seed: int
    width: int
    height: int
    configuration: str  # of objects[0] (A) relative to objects[1] (B)
    objects: tuple[SceneObject, SceneObject]
    subject: int  # which of ``objects`` is the caption's grammatical subject
    caption: str
    triplet: dict[str, Any]
    relation: str  # configuration of the caption's subject relative to its object
    negative: dict[str, Any]
    camera: Camera
    light: np.ndarray  # (3,) world position of the key light
    image: Image.Image | None = None

    @property
    def id(self) -> str:
        return scene_id(self.split, self.index)

    @property
    def boxes(self) -> dict[str, list[float]]:
        """Boxes of the caption's subject and object, clipped to the image."""
        subj, obj = self.objects[self.subject], self.objects[1 - self.subject]
        return {"subj": self._clip(subj.box), "obj": self._clip(obj.box)}

    def _clip(self, box: tuple[float, ...]) -> list[float]:
        x0, y0, x1, y1 = box
        return [round(min(max(x0, 0.0), self.width), 2), round(min(max(y0, 0.0), self.height), 2),
                round(min(max(x1, 0.0), self.width), 2), round(min(max(y1, 0.0), self.height), 2)]


def _pair_relation(split: str, index: int) -> str:
    """A pair's relation; dealt in shuffled blocks of 8 pairs, so every relation is equally frequent."""
    pair = index // 2
    block_start = (pair // len(CONFIGURATIONS)) * len(CONFIGURATIONS) * 2
    order = _rng(split, block_start, _STREAM_CONFIG).permutation(len(CONFIGURATIONS))
    return CONFIGURATIONS[order[pair % len(CONFIGURATIONS)]]


def _scene_properties(split: str, index: int) -> tuple[tuple[dict[str, str], dict[str, str]], tuple[int, int]]:
    """Object properties of A and B (this scene's own), and the pair's two distinct template indices."""
    rng = _rng(split, index, _STREAM_OBJECTS)
    pair_rng = _rng(split, index - index % 2, _STREAM_PAIR)

    def draw() -> dict[str, str]:
        return {"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS))),
                "size": str(rng.choice(list(SIZES))), "material": str(rng.choice(MATERIALS))}

    a = draw()
    b = draw()
    while (b["shape"], b["color"]) == (a["shape"], a["color"]):
        b = draw()
    templates = pair_rng.choice(len(_TEMPLATES), size=2, replace=False)
    return (a, b), (int(templates[0]), int(templates[1]))


def plan_scene(split: str, index: int, width: int = 320, height: int = 240) -> Scene:
    """Everything about a scene but its pixels: geometry, boxes, caption, negative (cheap)."""
    seed = scene_seed(split, index)
    relation = _pair_relation(split, index)
    props, templates = _scene_properties(split, index)
    rng = _rng(split, index, _STREAM_SCENE)
    cam = _make_camera(rng, width, height)
    light = _key_light(rng, cam)
    subject = int(rng.integers(2))  # 1: the caption names B first ("there is B in front of A")
    configuration = relation if subject == 0 else OPPOSITE[relation]
    objects = _place_pair(rng, cam, configuration, props)

    subj_text = _describe(rng, props[subject], props[1 - subject])
    obj_text = _describe(rng, props[1 - subject], props[subject])
    template = _TEMPLATES[templates[index % 2]]
    variant = int(rng.integers(len(_PHRASES["left"])))
    caption, triplet = _fill(template, subj_text, _phrase(relation, variant), obj_text)
    neg_caption, neg_triplet = _fill(template, subj_text, _phrase(OPPOSITE[relation], variant), obj_text)
    return Scene(split, index, seed, width, height, configuration, objects, subject, caption, triplet,
                 relation, {"caption": neg_caption, "triplet": neg_triplet}, cam, light)


def _phrase(relation: str, variant: int) -> str:
    phrases = _PHRASES[relation]
    return phrases[variant % len(phrases)]


def _key_light(rng: np.random.Generator, cam: Camera) -> np.ndarray:
    """Key light above, in front of and right of the scene, like CLEVR's (shadows fall back-left)."""
    return (cam.target + rng.uniform(3.0, 5.0) * cam.right - rng.uniform(5.0, 7.0) * cam.ground_forward
            + np.array([0.0, 0.0, rng.uniform(6.0, 8.0)]))


# --------------------------------------------------------------------------------------------
# Rendering (numpy only). Objects are shaded in linear light and encoded by _to_srgb; the floor
# and its shadows are modelled directly in display values.


def render_scene(split: str, index: int, width: int = 320, height: int = 240) -> Scene:
    """Plan and render scene ``index`` of ``split``; identical on every call."""
    scene = plan_scene(split, index, width, height)
    scene.image = _draw(scene)
    return scene


def _draw(scene: Scene) -> Image.Image:
    """Floor, soft shadows, then the objects far to near; the pixels depend on the plan only."""
    cam = scene.camera
    # Channels-first (3, H, W) float32 sRGB in [0, 1]: numpy is slow on a trailing axis of 3.
    img = _ground_color(cam, scene.light)
    for obj in scene.objects:
        _darken_shadow(img, obj, cam, scene.light)
    for obj in sorted(scene.objects, key=lambda o: -cam.depth(o.center)):  # painter's order: far first
        _composite(img, obj, cam, scene.light)
    img = np.clip(img, 0.0, 1.0, out=img) * 255.0 + 0.5
    return Image.merge("RGB", [Image.fromarray(channel.astype(np.uint8), "L") for channel in img])


def _ground_points(cam: Camera, us: np.ndarray, vs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World x and y, each (len(vs), len(us)), where the rays through columns ``us`` and rows ``vs``
    meet the ground; the camera looks down, so every pixel's ray does."""
    a = (us - cam.width / 2) / cam.focal
    b = (vs - cam.height / 2) / cam.focal
    dz = cam.forward[2] - b * cam.up[2]  # no roll, so the ray's z only depends on the row
    t = (-cam.position[2] / dz)[:, None]
    x = cam.position[0] + t * (cam.forward[0] + a[None, :] * cam.right[0] - b[:, None] * cam.up[0])
    y = cam.position[1] + t * (cam.forward[1] + a[None, :] * cam.right[1] - b[:, None] * cam.up[1])
    return x, y


_GROUND_STEP = 4  # the floor's shading is smooth: evaluate it on a coarse grid and upsample


def _ground_color(cam: Camera, light: np.ndarray) -> np.ndarray:
    """CLEVR's gray floor: ~0.40 far away, brighter and slightly warm under the key light."""
    step = _GROUND_STEP
    cols, rows = -(-cam.width // step), -(-cam.height // step)
    # Coarse pixel i covers fine pixels [step*i, step*(i+1)): sample at its centre, as PIL resize assumes.
    x, y = _ground_points(cam, step * (np.arange(cols) + 0.5), step * (np.arange(rows) + 0.5))
    r2 = ((x - light[0]) ** 2 + (y - light[1]) ** 2) / light[2] ** 2 + 1.0
    irradiance = 1.0 / (r2 * np.sqrt(r2))  # point light, Lambert: cos / d^2 = h^3 / d^3
    coarse = Image.fromarray(irradiance.astype(np.float32), "F").resize((cols * step, rows * step), Image.BILINEAR)
    irradiance = np.asarray(coarse)[: cam.height, : cam.width]
    value = 0.39 + 0.27 * irradiance
    warmth = (0.0, -0.01, -0.04)  # the lit floor is slightly warm
    return np.stack([value * (1.0 + w * irradiance) for w in warmth])


def _darken_shadow(img: np.ndarray, obj: SceneObject, cam: Camera, light: np.ndarray) -> None:
    """Multiply in a soft cast shadow (away from the light) and contact occlusion, within their window."""
    to_light = light - obj.center
    to_light /= np.linalg.norm(to_light)
    reach = obj.footprint if obj.shape == "sphere" else obj.radius * 1.2
    stretch = reach / math.sqrt(to_light[2])  # the shadow ellipse's long semi-axis
    # The cast shadow is an ellipse on the ground, stretched along the light's horizontal direction.
    along = -to_light[:2] / np.linalg.norm(to_light[:2])
    centre = obj.center[:2] - to_light[:2] * (obj.center[2] / to_light[2])
    y0, y1, x0, x1 = _ground_window(cam, [(centre, 1.4 * stretch), (obj.center[:2], 1.5 * reach)])
    if y0 >= y1 or x0 >= x1:
        return
    gx, gy = _ground_points(cam, np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
    rel_x, rel_y = gx - centre[0], gy - centre[1]
    u = (rel_x * along[0] + rel_y * along[1]) / stretch
    v = (rel_y * along[0] - rel_x * along[1]) / reach
    cast = 0.45 * (1.0 - _smoothstep(0.45, 1.35, np.sqrt(u * u + v * v)))
    cx, cy = gx - obj.center[0], gy - obj.center[1]
    contact = 0.3 * (1.0 - _smoothstep(0.5, 1.5, np.sqrt(cx * cx + cy * cy) / reach))
    img[:, y0:y1, x0:x1] *= ((1.0 - cast) * (1.0 - contact)).astype(np.float32)


def _ground_window(cam: Camera, discs: list[tuple[np.ndarray, float]]) -> tuple[int, int, int, int]:
    """Pixel window (y0, y1, x0, x1) covering ground discs given as (centre xy, radius)."""
    phi = np.linspace(0.0, 2 * math.pi, 16, endpoint=False)
    ring = np.stack([np.cos(phi), np.sin(phi), np.zeros_like(phi)], axis=-1)
    points = np.concatenate([np.append(c, 0.0) + r * ring for c, r in discs])
    uv = cam.project(points)
    x0, y0 = np.floor(uv.min(axis=0)).astype(int)
    x1, y1 = np.ceil(uv.max(axis=0)).astype(int)
    return max(y0, 0), min(y1 + 1, cam.height), max(x0, 0), min(x1 + 1, cam.width)


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _composite(img: np.ndarray, obj: SceneObject, cam: Camera, light: np.ndarray) -> None:
    """Ray cast ``obj`` at _SUPERSAMPLE^2 samples per pixel inside its box and blend it over ``img``.

    Vectors are channels-first, (3, N), float32, and only the samples that hit the object are shaded.
    """
    x0, y0 = max(int(obj.box[0]) - 1, 0), max(int(obj.box[1]) - 1, 0)
    x1, y1 = min(int(math.ceil(obj.box[2])) + 1, cam.width), min(int(math.ceil(obj.box[3])) + 1, cam.height)
    h, w, s = y1 - y0, x1 - x0, _SUPERSAMPLE
    us = x0 + (np.arange(w * s) + 0.5) / s
    vs = y0 + (np.arange(h * s) + 0.5) / s
    rays = cam.rays(us, vs)  # (3, h*s*w*s)
    eye = cam.position.astype(np.float32)
    hit, point, normal = (_hit_cube if obj.shape == "cube" else _hit_sphere)(obj, eye, rays)
    samples = np.zeros((3, h * s * w * s), dtype=np.float32)
    shaded = _to_srgb(_shade(obj, rays.take(hit, axis=1), point, normal, light))
    for channel in range(3):  # 1-D scatter; numpy's 2-D fancy indexing is several times slower
        samples[channel, hit] = shaded[channel]
    # Box-filter the samples down to pixels: premultiplied colour and coverage.
    premul = _downsample(samples.reshape(3, h * s, w * s), s)  # (3, h, w)
    coverage = np.zeros(h * s * w * s, dtype=np.float32)
    coverage[hit] = 1.0
    alpha = _downsample(coverage.reshape(1, h * s, w * s), s)
    patch = img[:, y0:y1, x0:x1]
    patch *= 1.0 - alpha
    patch += premul


def _downsample(a: np.ndarray, s: int) -> np.ndarray:
    """Mean over s x s blocks of the last two axes."""
    out = sum(a[:, i::s, j::s] for i in range(s) for j in range(s))
    return out / (s * s)


def _hit_sphere(obj: SceneObject, eye: np.ndarray, rays: np.ndarray):
    """Indices of the unit ``rays`` (3, M) that hit, and those samples' points and normals (3, N)."""
    center = obj.center.astype(np.float32)[:, None]
    oc = eye - center[:, 0]
    b = oc @ rays
    disc = b * b - float(oc @ oc - obj.radius**2)
    hit = np.flatnonzero(disc > 0.0)
    t = -b[hit] - np.sqrt(disc[hit])
    point = eye[:, None] + t * rays.take(hit, axis=1)
    normal = (point - center) * (1.0 / obj.radius)
    return hit, point, normal


def _hit_cube(obj: SceneObject, eye: np.ndarray, rays: np.ndarray):
    """As _hit_sphere, by the slab test in the cube's own frame. Normals are bent near the edges
    to mimic CLEVR's bevelled cubes (the geometry, and so the box, stays a sharp cube)."""
    rot = _rot_z(obj.angle).astype(np.float32)  # cube frame -> world
    origin = rot.T @ (eye - obj.center.astype(np.float32))
    dirs = rot.T @ rays  # (3, M)
    half = obj.radius
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - origin[:, None]) / dirs
        t2 = (half - origin[:, None]) / dirs
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
    t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
    hit = np.flatnonzero((t_far > t_near) & (t_near > 0.0))
    t = t_near[hit]
    q = (origin[:, None] + t * dirs.take(hit, axis=1)) / half  # hit points in the cube frame, in [-1, 1]
    mag = np.abs(q)
    bevel = np.clip((mag - 0.86) / 0.14, 0.0, 1.0) + (mag > 0.999)
    normal = np.sign(q) * bevel
    normal /= np.maximum(np.sqrt((normal * normal).sum(axis=0)), 1e-9)
    return hit, eye[:, None] + t * rays.take(hit, axis=1), rot @ normal


_FILL_DIR = (np.array([-0.6, -0.5, 0.62]) / np.linalg.norm([-0.6, -0.5, 0.62])).astype(np.float32)


def _shade(obj: SceneObject, rays: np.ndarray, point: np.ndarray, normal: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Linear RGB (3, N). Rubber: soft Lambert. Metal: coloured reflection of a dim floor and a
    bright sky with small sharp highlights of the lights, as CLEVR's metal reads."""
    albedo = ((np.array(COLORS[obj.color], dtype=np.float32) / 255.0) ** 2)[:, None]  # gamma 2, see _to_srgb
    to_light = light - obj.center
    to_light = (to_light / np.linalg.norm(to_light)).astype(np.float32)
    key = np.maximum(to_light @ normal, 0.0)
    # Ambient occlusion: the ground darkens the object's lower part.
    occlusion = 1.0 - 0.45 * np.exp(point[2] * (-1.0 / (0.35 * obj.radius)))
    reflected = rays - 2.0 * (rays * normal).sum(axis=0) * normal
    highlight = np.maximum(to_light @ reflected, 0.0)
    fill_highlight = np.maximum(_FILL_DIR @ reflected, 0.0)
    if obj.material == "rubber":
        fill = np.maximum(_FILL_DIR @ normal, 0.0)
        diffuse = (0.9 * key + 0.18 * fill + 0.14 * (0.55 + 0.45 * normal[2])) * occlusion
        return albedo * diffuse + 0.05 * _pow2k(highlight, 4)
    env = (_environment(reflected[2]) + 0.12 * key) * occlusion
    sharp = _pow2k(highlight, 4)
    specular = 0.5 * sharp + 5.0 * _pow2k(sharp, 4) + 1.5 * _pow2k(fill_highlight, 7)
    return albedo * env + specular * (0.4 + 0.6 * albedo)


def _pow2k(x: np.ndarray, k: int) -> np.ndarray:
    """x ** (2 ** k) by repeated squaring: Phong lobes without the cost of a general power."""
    for _ in range(k):
        x = x * x
    return x


def _environment(z: np.ndarray) -> np.ndarray:
    """Brightness seen along reflected rays with vertical component ``z``: a dim floor below, a
    brighter sky above, blended softly as around CLEVR's curved backdrop."""
    return 0.10 + 0.75 * _smoothstep(-0.3, 0.8, z)


def _to_srgb(linear: np.ndarray) -> np.ndarray:
    """Display encoding with gamma 2 (a square root: far cheaper than 1/2.2, and looks the same here)."""
    return np.sqrt(np.clip(linear, 0.0, 1.0))


# --------------------------------------------------------------------------------------------
# Manifest records and the dataset writer


def scene_record(split: str, index: int, scene: Scene, image_ref: str) -> dict[str, Any]:
    """The curated-manifest line of a scene (docs/manifest.md)."""
    if (split, index) != (scene.split, scene.index):
        raise ValueError(f"scene is {scene.id}, not {scene_id(split, index)}")
    return {
        "id": scene_id(split, index),
        "image": image_ref,
        "image_key": scene_id(split, index),  # one image per scene
        "width": scene.width,
        "height": scene.height,
        "caption": scene.caption,
        "triplet": scene.triplet,
        "relation": scene.relation,
        "boxes": scene.boxes,
        "negative": scene.negative,
        "positive": scene_id(split, partner_index(index)),
        "source": SOURCE,
    }


# PNG at zlib level 1: encoding at the default level 6 costs more than rendering, for ~40 % smaller files.
_IMAGE_FORMATS = {"png": ("PNG", {"compress_level": 1}), "jpg": ("JPEG", {"quality": 95}),
                  "jpeg": ("JPEG", {"quality": 95})}


def write_synthetic(out_dir: str | os.PathLike, split: str = "train", count: int = 4000, workers: int = 1,
                    image_format: str = "png", progress: bool = True) -> Path:
    """Render scenes ``0..count-1`` of ``split`` into ``out_dir/images`` and write ``out_dir/manifest.jsonl``.

    Resumable: images already on disk are kept (each is written under a temporary name and renamed,
    so a killed run leaves no half-written file), and the manifest is rewritten byte-identically.
    """
    if count <= 0 or count % 2:
        raise ValueError(f"count must be a positive even number (scenes come in partner pairs), got {count}")
    if image_format not in _IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_IMAGE_FORMATS)}, got {image_format!r}")
    scene_seed(split, count - 1)  # fail fast on a bad split or range
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), split, i, image_format) for i in range(count)]
    # spawn, not fork: safe even when the caller has already started torch / OpenMP threads.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    with pool or contextlib.nullcontext():
        chunk = max(1, min(64, count // (workers * 8)))
        results = pool.imap(_write_one, jobs, chunksize=chunk) if pool else map(_write_one, jobs)
        lines = list(tqdm(results, total=count, desc=f"synthetic {split} scenes", unit="img", disable=not progress))
    manifest = out / "manifest.jsonl"
    tmp = out / f".manifest.jsonl.{os.getpid()}.tmp"
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, manifest)
    return manifest


def _write_one(job: tuple[str, str, int, str]) -> str:
    """Render one scene unless its image exists; return its manifest line."""
    out, split, index, image_format = job
    ref = f"images/{scene_id(split, index)}.{image_format}"
    path = Path(out) / ref
    scene = plan_scene(split, index)
    if not path.exists():
        scene.image = _draw(scene)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        file_format, options = _IMAGE_FORMATS[image_format]
        scene.image.save(tmp, format=file_format, **options)
        os.replace(tmp, path)
    return json.dumps(scene_record(split, index, scene, ref), ensure_ascii=False)

