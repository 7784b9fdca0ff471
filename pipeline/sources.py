"""Adapters from each public dataset's own distribution layout to (classes, train rows, val rows).

A row is ``(absolute source path, label)``; a source may be a directory of JPEG frames (Something-V1). Paths are
absolute but not resolved: a symlinked split folder stays under ``--root`` (re-encoded files mirror that tree).
Layouts as downloaded, each with its command, are in docs/DATASETS.md:

- ``k400``:  ROOT/annotations/train.csv and val.csv (CVDF downloader) or validate.csv (original release), columns
             label,youtube_id,time_start,time_end,...; clips ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` flat or in
             class folders under ROOT/{train,val,validate,videos_train,videos_val}/ (CVDF, MMAction2, OpenDataLab);
             ROOT/replacement/**: CVDF's replacement clips, used for a clip that is missing or does not decode.
- ``ssv2``:  label files named as 20BN ships them (ROOT[/labels]/something-something-v2-{labels,train,validation}.json)
             or as ``labels/{labels,train,validation}.json``; videos ROOT/20bn-something-something-v2/<id>.webm.
- ``ssv1``:  ROOT/something-something-v1-{labels,train,validation}.csv (``id;label``) and
             ROOT/20bn-something-something-v1/<id>/00001.jpg ...
- ``ucf101``: ROOT/UCF-101/<Class>/*.avi and ROOT/ucfTrainTestlist/{classInd.txt,trainlist0N.txt,testlist0N.txt}
- ``lists``: list files as PySlowFast and MMAction2 read them: ``path label`` per line (videos) or ``folder
             num_frames label`` (MMAction2 rawframes), paths relative to ROOT or absolute; ``--classes`` names the
             labels (one per line), otherwise they are numbered.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hcml.errors import DatasetError

VIDEO_EXTS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"}


@dataclass
class SourceDataset:
    name: str
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    missing: list[tuple[str, str]] = field(default_factory=list)  # (split, expected path or id)
    flip_pairs: list[list[int]] = field(default_factory=list)
    replacements: dict[str, str] = field(default_factory=dict)  # path → a published fix to use if it fails
    fixes_used: set[str] = field(default_factory=set)  # rows that are a published fix (the original is missing)

    @property
    def listed(self) -> int:
        return len(self.train) + len(self.val) + len(self.missing)

    def add(self, split: str, path: Path, label: int, folder: bool = False) -> None:
        """A listed video (a file, or a frame folder with ``folder``): into its split if present, else into
        ``missing``."""
        if path.is_dir() if folder else path.is_file():
            (self.train if split == "train" else self.val).append((str(path), label))
        else:
            self.missing.append((split, str(path)))


@dataclass(frozen=True)
class SourceOptions:
    """What an adapter may need beyond the root (``hcml prepare`` flags)."""

    split: int = 1  # UCF-101 split
    train_list: str | None = None  # ``lists``: list files and class names
    val_list: str | None = None
    classes: str | None = None


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{path}: missing ({what})")
    return path


def _first(paths: list[Path], what: str) -> Path:
    """The first of ``paths`` that exists (the names a dataset is distributed under), else an error naming all."""
    for p in paths:
        if p.exists():
            return p
    raise DatasetError(f"{what}: none of {', '.join(str(p) for p in paths)} exists")


def left_right_pairs(classes: list[str]) -> list[list[int]]:
    """Classes whose names differ only by swapping left/right (labels a horizontal flip must swap)."""
    index = {c: i for i, c in enumerate(classes)}
    pairs = []
    for i, c in enumerate(classes):
        swapped = re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", c)
        j = index.get(swapped)
        if j is not None and i < j:
            pairs.append([i, j])
    return pairs


# ---------------------------------------------------------------- Kinetics-400
K400_VIDEO_DIRS = ("train", "val", "validate", "videos_train", "videos_val")


def _videos_by_stem(folders) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for d in folders:
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                if p.suffix.lower() in VIDEO_EXTS:
                    files.setdefault(p.stem, p)
    return files


def k400(root: Path, opts: SourceOptions) -> SourceDataset:
    ann = root / "annotations"
    files = _videos_by_stem(root / d for d in K400_VIDEO_DIRS)
    fixes = _videos_by_stem([root / "replacement"])
    labels_by_split: dict[str, list[tuple[str, str]]] = {}
    for split_name, names in (("train", ["train.csv"]), ("val", ["val.csv", "validate.csv"])):
        path = _first([ann / n for n in names], f"Kinetics-400 {split_name} annotations")
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            need = {"label", "youtube_id", "time_start", "time_end"}
            if not need <= set(reader.fieldnames or []):
                raise DatasetError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
            labels_by_split[split_name] = [
                (r["label"], f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}")
                for r in reader]
    classes = sorted({lab for lab, _ in labels_by_split["train"]})
    index = {c: i for i, c in enumerate(classes)}
    ds = SourceDataset("k400", classes, [], [])
    for split_name, items in labels_by_split.items():
        for lab, stem in items:
            if lab not in index:
                raise DatasetError(f"{ann}: {split_name} label {lab!r} does not occur in train.csv")
            path = files.get(stem) or fixes.get(stem)
            if path is None:
                ds.missing.append((split_name, stem))
                continue
            ds.add(split_name, path, index[lab])
            if stem not in files:
                ds.fixes_used.add(str(path))
            elif stem in fixes:
                ds.replacements[str(path)] = str(fixes[stem])
    if ds.listed and not (ds.train or ds.val):
        raise DatasetError(f"{root}: none of the {ds.listed} clips in {ann} was found; clips named "
                           f"<youtube_id>_<start>_<end>.mp4 are looked for under "
                           f"{', '.join(d + '/' for d in K400_VIDEO_DIRS)} and replacement/ (docs/DATASETS.md)")
    return ds


# ---------------------------------------------------------------- Something-Something V2
def _ssv2_name(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def ssv2(root: Path, opts: SourceOptions) -> SourceDataset:
    def label_file(kind: str) -> Path:  # 20BN's names (PySlowFast, MMAction2) or the short ones under labels/
        return _first([root / f"something-something-v2-{kind}.json", root / "labels" / f"something-something-v2-"
                       f"{kind}.json", root / "labels" / f"{kind}.json"], f"Something-Something v2 {kind} file")

    lab_path = label_file("labels")
    labels = json.loads(lab_path.read_text())
    classes = [c for c, _ in sorted(labels.items(), key=lambda kv: int(kv[1]))]
    index = {c: int(i) for c, i in labels.items()}
    vid_dir = _first([root / "20bn-something-something-v2", root / "videos", root], "Something-Something v2 videos")
    ds = SourceDataset("ssv2", classes, [], [], flip_pairs=left_right_pairs(classes))
    for split_name, kind in (("train", "train"), ("val", "validation")):
        path = label_file(kind)
        for item in json.loads(path.read_text()):
            name = _ssv2_name(item["template"])
            if name not in index:
                raise DatasetError(f"{path}: template {item['template']!r} (id {item['id']}) not in {lab_path.name}")
            ds.add(split_name, vid_dir / f"{item['id']}.webm", index[name])
    return ds


# ---------------------------------------------------------------- Something-Something V1 (JPEG frame folders)
def ssv1(root: Path, opts: SourceOptions) -> SourceDataset:
    classes = [c for c in _need(root / "something-something-v1-labels.csv", "class list").read_text().splitlines()
               if c.strip()]
    index = {c: i for i, c in enumerate(classes)}
    frames = root / "20bn-something-something-v1"
    ds = SourceDataset("ssv1", classes, [], [], flip_pairs=left_right_pairs(classes))
    for split_name, fname in (("train", "something-something-v1-train.csv"),
                              ("val", "something-something-v1-validation.csv")):
        path = _need(root / fname, "id;label list")
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            vid, _, lab = line.partition(";")
            if lab not in index:
                raise DatasetError(f"{path}:{i}: label {lab!r} not in something-something-v1-labels.csv")
            ds.add(split_name, frames / vid, index[lab], folder=True)
    return ds


# ---------------------------------------------------------------- UCF-101
def ucf101(root: Path, opts: SourceOptions) -> SourceDataset:
    split = opts.split
    if split not in (1, 2, 3):
        raise DatasetError(f"UCF-101 has splits 1, 2, 3; got --split {split}")
    lists = root / "ucfTrainTestlist"
    classes = []
    for line in _need(lists / "classInd.txt", "class index").read_text().splitlines():
        if line.strip():
            num, name = line.split()
            if int(num) != len(classes) + 1:
                raise DatasetError(f"{lists / 'classInd.txt'}: expected class number {len(classes) + 1}, got {num}")
            classes.append(name)
    index = {c: i for i, c in enumerate(classes)}
    videos = root / "UCF-101"
    ds = SourceDataset("ucf101", classes, [], [])
    for split_name, fname in (("train", f"trainlist0{split}.txt"), ("val", f"testlist0{split}.txt")):
        for line in _need(lists / fname, "split list").read_text().splitlines():
            if not line.strip():
                continue
            rel = line.split()[0]
            cls = rel.split("/")[0]
            if cls not in index:
                raise DatasetError(f"{lists / fname}: class {cls!r} of {rel} not in classInd.txt")
            ds.add(split_name, videos / rel, index[cls])
    return ds


# ---------------------------------------------------------------- list files (PySlowFast / MMAction2)
def lists(root: Path, opts: SourceOptions) -> SourceDataset:
    if not (opts.train_list and opts.val_list):
        raise DatasetError("prepare lists needs --train-list and --val-list (files of 'path label' lines)")
    rows = {}
    for split_name, name in (("train", opts.train_list), ("val", opts.val_list)):
        path = _need(Path(name).expanduser(), f"{split_name} list")
        items = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.replace(",", " ").split()
            if not parts:
                continue
            if len(parts) not in (2, 3) or not parts[-1].isdigit():
                raise DatasetError(f"{path}:{i}: expected 'path label' or 'folder num_frames label', got {line!r}")
            items.append((parts[0], int(parts[-1]), len(parts) == 3))
        rows[split_name] = items
    n = 1 + max((lab for items in rows.values() for _, lab, _ in items), default=-1)
    if opts.classes:
        cpath = _need(Path(opts.classes).expanduser(), "class names")
        classes = [c.strip() for c in cpath.read_text().splitlines() if c.strip()]
        if len(classes) < n:
            raise DatasetError(f"{cpath}: {len(classes)} class names, but the lists use label {n - 1}")
    else:
        classes = [str(i) for i in range(n)]
    ds = SourceDataset("lists", classes, [], [], flip_pairs=left_right_pairs(classes))
    for split_name, items in rows.items():
        for rel, lab, folder in items:
            ds.add(split_name, root / rel, lab, folder=folder)  # an absolute rel replaces root
    return ds


# The one registry of dataset layouts: ``hcml prepare``'s choices are its keys; a new adapter is one function here.
ADAPTERS = {"k400": k400, "ssv1": ssv1, "ssv2": ssv2, "ucf101": ucf101, "lists": lists}


def load_source(name: str, root: str | Path, opts: SourceOptions | int = SourceOptions()) -> SourceDataset:
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(ADAPTERS)}")
    if isinstance(opts, int):
        opts = SourceOptions(split=opts)
    root = Path(os.path.abspath(Path(root).expanduser()))  # absolute, symlinks kept, ~ expanded
    if not root.is_dir():
        raise DatasetError(f"--root {root} is not a directory")
    return ADAPTERS[name](root, opts)
