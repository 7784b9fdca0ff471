"""Adapters from each public dataset's own distribution layout to (classes, train rows, val rows).

A row is ``(absolute source path, label)``; a source may be a directory of JPEG frames (Something-V1).
Expected ``--root`` layouts (see docs/DATASETS.md):

- ``k400``:  ROOT/annotations/{train,validate}.csv (official CSV: label,youtube_id,time_start,time_end,split,...)
             and clips anywhere under ROOT/{train,val}/ named ``<youtube_id>_<start:06d>_<end:06d>.<ext>``.
- ``ssv2``:  ROOT/labels/{labels,train,validation}.json and ROOT/20bn-something-something-v2/<id>.webm
- ``ssv1``:  ROOT/something-something-v1-{labels,train,validation}.csv (``id;label``) and
             ROOT/20bn-something-something-v1/<id>/00001.jpg ...
- ``ucf101``: ROOT/UCF-101/<Class>/*.avi and ROOT/ucfTrainTestlist/{classInd.txt,trainlist0N.txt,testlist0N.txt}
"""

from __future__ import annotations

import csv
import json
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

    def add(self, split: str, path: Path, label: int, folder: bool = False) -> None:
        """A listed video (a file, or a frame folder with ``folder``): into its split if present, else into
        ``missing``."""
        if path.is_dir() if folder else path.is_file():
            (self.train if split == "train" else self.val).append((str(path), label))
        else:
            self.missing.append((split, str(path)))


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{path}: missing ({what})")
    return path


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
def k400(root: Path, split: int = 1) -> SourceDataset:
    ann = root / "annotations"
    files: dict[str, Path] = {}
    for sub in ("train", "val", "validate"):
        d = root / sub
        if d.is_dir():
            for p in d.rglob("*"):
                if p.suffix.lower() in VIDEO_EXTS:
                    files[p.stem] = p
    rows: dict[str, list] = {"train": [], "val": []}
    missing = []
    labels_by_split: dict[str, list[tuple[str, str]]] = {}
    for split_name, fname in (("train", "train.csv"), ("val", "validate.csv")):
        path = _need(ann / fname, "official Kinetics-400 annotation CSV")
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
    for split_name, items in labels_by_split.items():
        for lab, stem in items:
            if lab not in index:
                raise DatasetError(f"{ann}: val label {lab!r} does not occur in train.csv")
            if stem in files:
                rows[split_name].append((str(files[stem]), index[lab]))
            else:
                missing.append((split_name, stem))
    return SourceDataset("k400", classes, rows["train"], rows["val"], missing)


# ---------------------------------------------------------------- Something-Something V2
def _ssv2_name(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def ssv2(root: Path, split: int = 1) -> SourceDataset:
    lab_dir = root / "labels"
    labels = json.loads(_need(lab_dir / "labels.json", "class name → index").read_text())
    classes = [c for c, _ in sorted(labels.items(), key=lambda kv: int(kv[1]))]
    index = {c: int(i) for c, i in labels.items()}
    vid_dir = root / "20bn-something-something-v2"
    ds = SourceDataset("ssv2", classes, [], [], flip_pairs=left_right_pairs(classes))
    for split_name, fname in (("train", "train.json"), ("val", "validation.json")):
        for item in json.loads(_need(lab_dir / fname, "split list").read_text()):
            name = _ssv2_name(item["template"])
            if name not in index:
                raise DatasetError(f"{lab_dir / fname}: template {item['template']!r} (id {item['id']}) not in "
                                   f"labels.json")
            ds.add(split_name, vid_dir / f"{item['id']}.webm", index[name])
    return ds


# ---------------------------------------------------------------- Something-Something V1 (JPEG frame folders)
def ssv1(root: Path, split: int = 1) -> SourceDataset:
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
def ucf101(root: Path, split: int = 1) -> SourceDataset:
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


ADAPTERS = {"k400": k400, "ssv1": ssv1, "ssv2": ssv2, "ucf101": ucf101}


def load_source(name: str, root: str | Path, split: int = 1) -> SourceDataset:
    if name not in ADAPTERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(ADAPTERS)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--root {root} is not a directory")
    return ADAPTERS[name](root, split)
