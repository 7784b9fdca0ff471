"""The prepared dataset directory: the one on-disk contract between ``prepare``/``synth`` and training.

Layout::

    DIR/train.txt     "relative/path.webm label [num_frames]" per line (DALI file_list style)
    DIR/val.txt       same
    DIR/classes.txt   one class name per line; line number = label
    DIR/dataset.yaml  codec, frames, size, fps, num_classes, name

The optional third column (frame count, from probing) lets the loader pick random temporal offsets without
opening the file (see ``pipeline/loader.py``).
"""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from hcml.errors import DatasetError
from hcml.files import FolderInUse, FolderLock, atomic_write_text, remove_own, remove_stale_temps


class Sample(NamedTuple):
    """One listed video. A tuple, not a dataclass: a Kinetics list holds 240k of them per rank, built in < 1 s."""

    path: str  # absolute
    label: int
    num_frames: int  # 0 if unknown


@dataclass
class PreparedDataset:
    root: Path
    classes: list[str]
    meta: dict
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)  # a held-out split (test.txt), when the dataset has one

    def split(self, name: str) -> list[Sample]:
        """The evaluation split ``name`` (``val`` or ``test``), with an error naming what is missing."""
        if name == "test" and not self.test:
            raise DatasetError(f"{self.root}: no test split (test.txt); data.eval_split=test needs a dataset made "
                               "with one (hcml synth --test-per-class N)")
        if name not in ("val", "test"):
            raise DatasetError(f"evaluation split {name!r}: expected val or test")
        return self.test if name == "test" else self.val

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def codecs(self) -> set[str]:
        """The codecs of the dataset's videos as ``prepare``/``synth`` recorded them (empty: not recorded)."""
        if self.meta.get("codecs"):
            return set(self.meta["codecs"])
        codec = self.meta.get("codec")
        return {codec} if codec and codec != "as-is" else set()

    @property
    def gop(self) -> int:
        """The fixed keyframe interval ``prepare`` encoded with (0: not fixed, or not recorded)."""
        return int(self.meta.get("gop") or 0)

    @property
    def flip_pairs(self) -> list[list[int]]:
        """Label pairs a horizontal flip turns into each other, as ``prepare``/``synth`` recorded them."""
        return [list(p) for p in self.meta.get("flip_pairs") or []]


def claim_folder(out: Path, marker: str, state: str, own: tuple[str, ...], overwrite: bool, tool: str) -> FolderLock:
    """Let a writer (``prepare``, ``synth``) use ``out``: a new or empty folder, or one it filled before with the
    same settings (``state`` in ``out/marker``: it continues, keeping finished files, and removes the half-written
    temp files of a killed earlier run). Anything else is refused, so a typo never mixes two datasets;
    ``overwrite`` removes only the writer's own files (``own``). Returns the folder's lock, held: a second writer
    started while this one works (the same command in two shells, a job array) is refused instead of racing it;
    release it when done (``with``)."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file, not a folder")
    filled = out.is_dir() and any(p.name != FolderLock.NAME for p in out.iterdir())
    if filled and not overwrite and not ((out / marker).is_file() and (out / marker).read_text() == state):
        why = f"holds a {tool} with other settings" if (out / marker).is_file() else "is not empty"
        raise DatasetError(f"--out {out} {why}: choose a new folder, or pass --overwrite to replace what {tool} "
                           f"wrote there")
    try:  # only now: a refused folder is left as it was
        lock = FolderLock(out, f"hcml {tool}").acquire()
    except FolderInUse as e:
        raise DatasetError(f"--out {out} is in use ({e.holder}); wait for it to end or choose another folder") \
            from None
    try:
        if filled and overwrite:
            remove_own(out, own)
        remove_stale_temps(out, recursive=True)
        atomic_write_text(out / marker, state)
    except BaseException:
        lock.release()
        raise
    return lock


def write_split(path: Path, rows: list[tuple[str, int, int]]) -> None:
    atomic_write_text(path, "".join(f"{p} {lab} {n}\n" for p, lab, n in rows))


def write_prepared(root: str | Path, classes: list[str], train, val, meta: dict, test=None) -> None:
    """Write a prepared dataset directory. ``train``/``val``/``test``: rows (relative path, label, num_frames);
    ``test`` (a held-out split) is optional."""
    root = Path(root)
    write_split(root / "train.txt", train)
    write_split(root / "val.txt", val)
    if test:
        write_split(root / "test.txt", test)
    atomic_write_text(root / "classes.txt", "".join(c + "\n" for c in classes))
    atomic_write_text(root / "dataset.yaml", yaml.safe_dump({**meta, "num_classes": len(classes)}, sort_keys=False))


def _read_split(root: Path, name: str, num_classes: int) -> list[Sample]:
    """The rows of one split. Paths are joined to the root resolved once (no call to the file system per line:
    a 240k-line list loads in well under a second) and normalised, not resolved: a symlink inside the dataset
    stays as listed."""
    path = root / name
    if not path.is_file():
        raise DatasetError(f"{path}: missing (a prepared dataset needs train.txt, val.txt, classes.txt)")
    base = str(root.resolve())
    out = []
    collecting = gc.isenabled()
    gc.disable()  # 240k new tuples would trigger the cyclic collector dozens of times, for nothing
    try:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.rsplit(maxsplit=2)
            try:
                if len(parts) == 3 and parts[2].lstrip("-").isdigit() and parts[1].lstrip("-").isdigit():
                    rel, lab, nf = parts[0], int(parts[1]), int(parts[2])
                elif not parts:
                    continue
                else:
                    rel, lab = line.rsplit(maxsplit=1)
                    lab, nf = int(lab), 0
            except ValueError:
                raise DatasetError(f"{path}:{i}: expected 'path label [num_frames]', got {line!r}") from None
            if not 0 <= lab < num_classes:
                raise DatasetError(f"{path}:{i}: label {lab} outside [0, {num_classes}) of classes.txt")
            full = rel if rel.startswith("/") else f"{base}/{rel}"
            if "/." in full or "//" in full:  # ../ or ./ or a doubled slash: normalise (cheap when not needed)
                full = os.path.normpath(full)
            out.append(Sample(full, lab, nf))
    finally:
        if collecting:
            gc.enable()
    return out


def label_subset(samples: list[Sample], fraction: float, seed: int = 0) -> list[Sample]:
    """A class-balanced share of ``samples``: per class ``round(fraction x n)`` videos (at least one), drawn by a
    seeded permutation, in the list's own order. The same arguments give the same subset on every machine (a
    label-scarce comparison trains every arm on the same videos)."""
    if fraction >= 1:
        return list(samples)
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    rng = random.Random(seed)
    keep = set()
    for label in sorted(by_class):
        idx = by_class[label]
        keep.update(rng.sample(idx, max(1, round(fraction * len(idx)))))
    return [s for i, s in enumerate(samples) if i in keep]


def read_class_names(path: str | Path, what: str = "class list") -> list[str]:
    """One class name per non-blank line, line order = label, ends stripped (a list written on Windows or with
    trailing blanks names the same classes): the one reader for a dataset's classes.txt and predict's --classes."""
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise DatasetError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{what} {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def load_prepared(root: str | Path) -> PreparedDataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root} (create one with `hcml synth` or `hcml prepare`)")
    cls_path = root / "classes.txt"
    if not cls_path.is_file():
        raise DatasetError(f"{root} is not a prepared dataset ({cls_path.name} missing): make one from the videos "
                           f"with `hcml prepare DATASET --root {root} --out NEW_DIR` (docs/DATASETS.md) or "
                           f"`hcml synth`")
    classes = read_class_names(cls_path, "the dataset's class list")
    meta_path = root / "dataset.yaml"
    meta = yaml.safe_load(meta_path.read_text()) if meta_path.is_file() else {}
    test = _read_split(root, "test.txt", len(classes)) if (root / "test.txt").is_file() else []
    return PreparedDataset(root, classes, meta or {}, _read_split(root, "train.txt", len(classes)),
                           _read_split(root, "val.txt", len(classes)), test)
