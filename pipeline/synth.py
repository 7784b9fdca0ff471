"""A deterministic synthetic *motion* dataset: classes differ only in how things move, never in appearance.

Every clip draws a fresh random background texture, object shape, texture, colour, size, position, angle and
contrast. The class decides only the motion. Per-frame appearance statistics are kept class-independent by
giving the static classes the same per-frame distributions that the moving ones sweep through: a static
object's scale is uniform over the zoom range, its contrast uniform over the fade range, its position uniform
over the area the movers traverse. Six classes pairs are exact time reversals of each other (left/right, cw/ccw,
in/out, pan, appear/disappear): a model that averages per-frame features over time cannot separate them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hcml.errors import DatasetError
from hcml.pipeline.prepared import claim_folder, write_prepared
from hcml.pipeline.video import encode_video

CLASSES = [
    "move_left", "move_right", "move_up", "move_down",
    "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out",
    "pan_left", "pan_right", "appear", "disappear",
]
OWN_OUTPUTS = ("train", "val", "test", "train.txt", "val.txt", "test.txt", "classes.txt", "dataset.yaml",
               ".hcml-synth.json")  # what --overwrite removes
# Pairs a horizontal flip turns into each other (used by data.flip=swap on this set).
FLIP_PAIRS = [[0, 1], [4, 5], [8, 9]]
# Class pairs that differ only in temporal order.
TEMPORAL_ORDER_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]

_SCALE = (0.7, 1.3)
_ALPHA = (0.35, 1.0)
_TRAVEL = 0.6  # fraction of the frame a mover / pan travels over the clip


def _texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, freq: float, amp: float) -> np.ndarray:
    """A random colour texture (sum of 3 oriented gratings) evaluated at coordinates x, y → (..., 3) in [0, 1]."""
    shape = np.broadcast_shapes(x.shape, y.shape)
    out = np.zeros(shape + (3,), np.float32)
    base = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    f32 = np.float32
    for _ in range(3):  # float32 scalars keep the (T, H, W) maths in float32
        ang = rng.uniform(0, np.pi)
        k = f32(rng.uniform(0.5, 1.5) * freq)
        ph = f32(rng.uniform(0, 2 * np.pi))
        col = rng.uniform(-amp, amp, 3).astype(np.float32)
        out += np.sin(k * (f32(np.cos(ang)) * x + f32(np.sin(ang)) * y) + ph)[..., None] * col
    return np.clip(base + out, 0, 1)


def render_clip(label: int, rng: np.random.Generator, frames: int = 32, size: int = 64) -> np.ndarray:
    """One clip of class ``label`` as uint8 (T, H, W, 3)."""
    name = CLASSES[label]
    S, T = size, frames
    u = np.linspace(0.0, 1.0, T, dtype=np.float32)[:, None, None]  # (T,1,1) clip time
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    xx, yy = xx[None], yy[None]  # (1,S,S)

    travel = _TRAVEL * S
    margin = 0.18 * S
    # Position: movers sweep a segment of length `travel` inside [margin, S - margin]; static objects sit
    # uniformly in the same box.
    lo, hi = margin, S - margin
    cx = np.full_like(u, rng.uniform(lo, hi))
    cy = np.full_like(u, rng.uniform(lo, hi))
    direction = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}.get(name)
    if direction is not None:
        along = rng.uniform(lo, hi - travel) + travel * u
        if direction[0] != 0:
            cx = along if direction[0] > 0 else (lo + hi) - along
        else:
            cy = along if direction[1] > 0 else (lo + hi) - along

    scale = np.full_like(u, rng.uniform(*_SCALE))
    if name == "zoom_in":
        scale = _SCALE[0] + (_SCALE[1] - _SCALE[0]) * u
    elif name == "zoom_out":
        scale = _SCALE[1] - (_SCALE[1] - _SCALE[0]) * u

    angle = np.full_like(u, rng.uniform(0, 2 * np.pi))
    if name in ("rotate_cw", "rotate_ccw"):  # image y points down: increasing angle turns clockwise on screen
        angle = angle + (1 if name == "rotate_cw" else -1) * np.pi * 0.75 * u

    alpha = np.full_like(u, rng.uniform(*_ALPHA))
    if name == "appear":
        alpha = _ALPHA[0] + (_ALPHA[1] - _ALPHA[0]) * u
    elif name == "disappear":
        alpha = _ALPHA[1] - (_ALPHA[1] - _ALPHA[0]) * u

    # Camera pan: the whole scene shifts; pan_left = camera turns left = content moves right.
    pan = np.zeros_like(u)
    if name in ("pan_left", "pan_right"):
        pan = (1 if name == "pan_left" else -1) * (travel * u - travel / 2)

    # a static background is rendered once and broadcast over time; a panning one frame by frame
    bg_x = xx - pan if name in ("pan_left", "pan_right") else xx
    bg = _texture(rng, bg_x, yy, freq=2 * np.pi / rng.uniform(8, 20), amp=0.12)
    radius = rng.uniform(0.15, 0.21) * S
    lx = (xx - pan - cx) / scale
    ly = (yy - cy) / scale
    ca, sa = np.cos(angle), np.sin(angle)
    ox, oy = ca * lx + sa * ly, -sa * lx + ca * ly  # object-local coordinates
    shape = rng.integers(3)
    if shape == 0:  # square
        d = np.maximum(np.abs(ox), np.abs(oy)) - radius
    elif shape == 1:  # ellipse (textured, so rotation is visible)
        d = np.sqrt((ox / 1.3) ** 2 + (oy / 0.75) ** 2) - radius
    else:  # triangle
        d = np.maximum.reduce([oy - 0.6 * radius, -0.87 * ox - 0.5 * oy - 0.6 * radius,
                               0.87 * ox - 0.5 * oy - 0.6 * radius])
    mask = np.clip(0.5 - d, 0, 1)[..., None] * alpha[..., None]
    obj = _texture(rng, ox, oy, freq=2 * np.pi / rng.uniform(5, 10), amp=0.4)
    frames_f = bg * (1 - mask) + obj * mask
    frames_f += rng.normal(0, 0.01, frames_f.shape).astype(np.float32)
    return (np.clip(frames_f, 0, 1) * 255 + 0.5).astype(np.uint8)


def encode(frames: np.ndarray, path: str | Path, codec: str = "vp9", fps: int = 25, gop: int = 8) -> None:
    """Encode uint8 (T, H, W, 3) with PyAV. VP9 decodes on DALI's CPU path, H.264 on NVDEC."""
    encode_video(frames, path, codec, fps, gop)


SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}  # each split draws from its own random stream


def clip_seed(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_STREAM[split], label, index])


def generate(out: str | Path, classes: list[str] | None = None, per_class: int = 24, val_per_class: int | None = None,
             size: int = 64, frames: int = 32, codec: str = "vp9", seed: int = 0, fps: int = 25, workers: int = 2,
             progress: bool = True, overwrite: bool = False, test_per_class: int = 0) -> Path:
    """Write the synthetic set as a prepared dataset directory (see ``hcml.pipeline.prepared``) into a new or
    empty folder, or continue an interrupted synth with the same settings (``overwrite``: replace an earlier synth
    with other settings). ``test_per_class``: a held-out test split (``test.txt``) of that many clips per class,
    drawn from its own random stream, for figures that no setting was chosen on."""
    import json

    out = Path(out)
    names = classes or CLASSES
    unknown = [c for c in names if c not in CLASSES]
    if unknown:
        raise DatasetError(f"--classes: unknown synthetic class(es) {', '.join(unknown)}; available: "
                           f"{', '.join(CLASSES)}")
    val_per_class = per_class // 3 if val_per_class is None else val_per_class
    settings = json.dumps({"classes": list(names), "per_class": per_class, "val_per_class": val_per_class,
                           "size": size, "frames": frames, "codec": codec, "seed": seed, "fps": fps,
                           **({"test_per_class": test_per_class} if test_per_class else {})})
    with claim_folder(out, ".hcml-synth.json", settings, OWN_OUTPUTS, overwrite, "synth"):
        ext = "webm" if codec == "vp9" else "mp4"
        jobs = []
        rows: dict[str, list] = {"train": [], "val": [], "test": []}
        for split, n in (("train", per_class), ("val", val_per_class), ("test", test_per_class)):
            for new_label, name in enumerate(names):
                orig = CLASSES.index(name)
                for i in range(n):
                    rel = f"{split}/{name}/{name}_{i:04d}.{ext}"
                    rows[split].append((rel, new_label, frames))
                    jobs.append((out / rel, orig, clip_seed(seed, split, orig, i)))
        for d in {p.parent for p, _, _ in jobs}:
            d.mkdir(parents=True, exist_ok=True)

        def work(job):
            path, orig, rng = job
            if path.exists() and path.stat().st_size > 0:  # resumable
                return
            encode(render_clip(orig, rng, frames, size), path, codec, fps)

        from tqdm import tqdm

        with ThreadPoolExecutor(max(1, workers)) as ex:
            list(tqdm(ex.map(work, jobs), total=len(jobs), desc=f"synth {out.name}", disable=not progress,
                      unit="clip"))
        flip_pairs = [[names.index(CLASSES[a]), names.index(CLASSES[b])] for a, b in FLIP_PAIRS
                      if CLASSES[a] in names and CLASSES[b] in names]
        write_prepared(out, list(names), rows["train"], rows["val"],
                       {"name": "synthetic-motion", "codec": codec, "frames": frames, "size": size, "fps": fps,
                        "seed": seed, "flip_pairs": flip_pairs}, test=rows["test"])
        return out
