"""``hcml predict``: label the videos a user holds (a camera's MP4s, a folder of clips) with a trained checkpoint.

No ``prepare`` step and no dataset: the class names travel inside the checkpoint. Each video gets ``hcml eval``'s
views (K clips x C crops: ``eval_views``, the eval crops and normalisation of the DALI graph) and the mean over them
of the crop-averaged softmax (``evaluate.score_views``). DALI decodes where it can (on the GPU: H.264, HEVC, VP9,
AV1...; on the CPU: VP8/VP9/MJPEG); everything else, and any video DALI refuses, goes through PyAV
(:mod:`hcml.pipeline.rawvideo`, the same views to within a grey level). A video that cannot be labelled is one
line naming it and why; the others go on; the exit code is 1 when any failed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hcml.errors import HCMLError
from hcml.files import atomic_write_text
from hcml.launch import components
from hcml.launch.distributed import DistInfo, all_gather_objects, cleanup, init_distributed
from hcml.launch.evaluate import score_views
from hcml.pipeline.loader import DALI_CODECS, EvalLoader, clip_span, eval_views, shard_rows
from hcml.pipeline.prepared import Sample
from hcml.pipeline.rawvideo import VIDEO_SUFFIXES, decode_views
from hcml.pipeline.video import JPEG_SUFFIXES

STATUS_ENV = "HCML_PREDICT_STATUS"  # the launcher's file where rank 0 leaves how many videos failed
OUTPUTS = (".jsonl", ".csv")
DECODERS = ("auto", "dali", "pyav")


@dataclass(frozen=True)
class Request:
    checkpoint: str
    videos: list[str]
    top_k: int = 5
    views: tuple[int, int] | None = None  # (clips, crops); None: the checkpoint's data.eval_clips x eval_crops
    out: str | None = None
    decoder: str = "auto"
    device: str = "auto"
    classes: str | None = None


def parse_views(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or int(m[1]) < 1 or int(m[2]) not in (1, 3):
        raise HCMLError(f"--views {text!r}: expected KxC, K >= 1 clips per video and C = 1 or 3 crops (10x3, 1x1)")
    return int(m[1]), int(m[2])


def collect_videos(videos: list[str], list_file: str | None, dirs: list[str]) -> list[str]:
    """The videos to label, in the order given, each once: arguments, then ``--list`` lines (relative to the
    list's folder; blank lines and ``#`` comments skipped), then every video file under each ``--dir``
    (recursively, sorted), a folder of JPEG frames counting as one video (Something-Something V1's layout). A
    missing list or folder is an error; a missing video is that video's failure."""
    out = list(videos)
    if list_file:
        path = Path(list_file)
        if not path.is_file():
            raise HCMLError(f"--list {list_file}: {'a directory' if path.is_dir() else 'no such file'}")
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line if os.path.isabs(line) else str(path.parent / line))
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise HCMLError(f"--dir {d}: {'not a directory' if root.exists() else 'no such directory'}")
        found = sorted(str(p) for p in [root, *root.rglob("*")]
                       if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES or p.is_dir() and is_frame_folder(p))
        if not found:
            raise HCMLError(f"--dir {d}: no video files in it ({', '.join(VIDEO_SUFFIXES)}) and no folder of "
                            f"JPEG frames")
        out += found
    if not out:
        raise HCMLError("no videos: give VIDEO paths, --list FILE or --dir DIR")
    return list(dict.fromkeys(out))


def is_frame_folder(path: Path) -> bool:
    """A folder of JPEG frames and no video files: one video (a folder of videos with a poster .jpg is not)."""
    files = [p for p in path.iterdir() if p.is_file()]
    return any(p.suffix.lower() in JPEG_SUFFIXES for p in files) and \
        not any(p.suffix.lower() in VIDEO_SUFFIXES for p in files)


def check_request(req: Request) -> components.Trained:
    """Everything that can be wrong before any video is read, as one line (exit 2)."""
    if req.out and Path(req.out).suffix.lower() not in OUTPUTS:
        raise HCMLError(f"--out {req.out}: expected a .jsonl or .csv file")
    if req.out and Path(req.out).is_dir():
        raise HCMLError(f"--out {req.out}: is a directory; name a .jsonl or .csv file")
    if req.top_k < 1:
        raise HCMLError(f"--top-k {req.top_k}: must be >= 1")
    if req.decoder not in DECODERS:
        raise HCMLError(f"--decoder {req.decoder}: expected one of {', '.join(DECODERS)}")
    if req.device == "gpu" and not torch.cuda.is_available():
        raise HCMLError("--device gpu: no CUDA device is visible; use --device cpu")
    return components.load_for_inference(req.checkpoint, req.classes)


def _spec(trained: components.Trained, req: Request, dali_device: str):
    d = trained.cfg.data
    clips, crops = req.views or (d.eval_clips, d.eval_crops)
    return dataclasses.replace(d, device=dali_device, dtype="float32", eval_clips=clips, eval_crops=crops)


def _dali_available() -> bool:
    """DALI is a dependency, but a machine without it (a laptop, a serving box) still labels videos via PyAV."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace at all
        return False


class Predictor:
    """This process's share of the videos: probe, decode (DALI in batches, else PyAV per video), score."""

    def __init__(self, trained: components.Trained, req: Request, info: DistInfo):
        self.trained, self.req, self.info = trained, req, info
        cuda = req.device != "cpu" and info.device.type == "cuda"
        self.device = info.device if cuda else torch.device("cpu")
        self.dali_device = "gpu" if cuda else "cpu"
        self.spec = _spec(trained, req, self.dali_device)
        self.prec = components.precision(trained.cfg, self.device)
        here = dataclasses.replace(info, device=self.device)
        self.model = components.to_device(trained.model, here, self.prec).eval()
        self.dali = req.decoder != "pyav" and _dali_available()

    def label(self, paths: list[str], bar) -> list[dict]:
        from hcml.pipeline.prepare import probe_video

        recs: dict[int, dict] = {}
        dali, pyav = [], []
        for i, path in enumerate(paths):
            rec = {"video": path, "ok": False}
            recs[i] = rec
            if Path(path).is_dir() and not is_frame_folder(Path(path)):
                rec["error"] = "a directory, not a folder of JPEG frames (pass --dir DIR for the videos in it)"
                bar.update()
                continue
            pr = probe_video(path, timestamps="any")  # a JPEG frame folder (Something-V1) is one video
            if not pr.ok:
                rec["error"] = pr.reason + (f": {pr.detail}" if pr.detail else "")
                bar.update()
                continue
            rec.update(codec=pr.codec, frames=pr.frames, fps=round(pr.fps, 3), size=[pr.width, pr.height])
            if self.dali and pr.codec in DALI_CODECS[self.dali_device]:
                dali.append(i)
            elif self.req.decoder == "dali":
                rec["error"] = (f"DALI's {self.dali_device} decoder cannot decode {pr.codec} (it reads "
                                f"{', '.join(sorted(DALI_CODECS[self.dali_device]))}); --decoder auto falls back "
                                f"to PyAV")
                bar.update()
            else:
                pyav.append(i)
        refused = self._dali(paths, recs, dali, bar) if dali else {}
        for i in pyav + sorted(refused):
            self._pyav(paths[i], recs[i], refused.get(i))
            bar.update()
        return [recs[i] for i in range(len(paths))]

    def _finish(self, rec: dict, scores: torch.Tensor, seconds: float, decoder: str, decoded: int | None = None
                ) -> None:
        names, k = self.trained.classes, min(self.req.top_k, len(self.trained.classes))
        p, idx = scores.topk(k)
        starts = [s for s, _ in eval_views(rec["frames"], self.spec)]  # the views both decoders took
        notes = []
        span = clip_span(self.spec.frames, self.spec.stride)
        if rec["frames"] < span:
            notes.append(f"{rec['frames']} frames, shorter than one clip ({span}): edge-padded")
        if decoded is not None and decoded < min(rec["frames"], max(starts) + span):
            notes.append(f"{decoded} of {rec['frames']} frames decoded: the rest edge-padded")
        rec.update(ok=True, top_k=[{"class": names[j], "label": int(j), "prob": round(float(q), 6)}
                                   for q, j in zip(p.tolist(), idx.tolist())],
                   views=f"{self.spec.eval_clips}x{self.spec.eval_crops}", clip_starts=starts, decoder=decoder,
                   seconds=round(seconds, 4))
        if notes:
            rec["note"] = "; ".join(notes)

    def _dali(self, paths, recs, idx: list[int], bar) -> dict[int, str]:
        """The DALI share in batches (one pipeline); each video's time is its views' share of their batches'.
        Returns the videos DALI refused, with the reason (PyAV tries them next)."""
        K = self.spec.eval_clips
        samples = [Sample(str(Path(paths[i]).resolve()), 0, recs[i]["frames"]) for i in idx]
        loader = EvalLoader(samples, self.spec, device_id=self.info.local_rank if self.device.type == "cuda"
                            else None)
        sums = torch.zeros(len(samples), len(self.trained.classes))
        seen = torch.zeros(len(samples), dtype=torch.long)
        secs = torch.zeros(len(samples))
        t = time.perf_counter()
        for clips, rows in loader:
            scores = score_views(self.model, clips, self.prec, self.device)
            v = rows.cpu() // K
            now = time.perf_counter()
            secs.index_add_(0, v, torch.full((len(v),), (now - t) / len(v)))
            t = now
            before = int((seen == K).sum())
            sums.index_add_(0, v, scores)
            seen.index_add_(0, v, torch.ones_like(v))
            bar.update(int((seen == K).sum()) - before)
        for j, i in enumerate(idx):
            if seen[j] == K:
                self._finish(recs[i], sums[j] / K, float(secs[j]), f"dali-{self.dali_device}")
        return {idx[j]: loader.dropped_why.get(s.path, f"{int(seen[j])} of {K} views decoded")
                for j, s in enumerate(samples) if seen[j] < K}

    def _pyav(self, path: str, rec: dict, dali_refused: str | None) -> None:
        t = time.perf_counter()
        try:
            views, decoded = decode_views(path, rec["frames"], self.spec, threads=self.spec.threads)
        except OSError as e:
            rec["error"] = str(e) + (f" (DALI too: {dali_refused})" if dali_refused else "")
            return
        B = self.spec.eval_rows_per_batch
        scores = torch.cat([score_views(self.model, views[i:i + B], self.prec, self.device)
                            for i in range(0, len(views), B)]).mean(0)
        self._finish(rec, scores, time.perf_counter() - t, "pyav", decoded)
        if dali_refused:
            rec["note"] = "; ".join(filter(None, [rec.get("note"), f"DALI refused it ({dali_refused}): PyAV"]))


def write_records(path: str, recs: list[dict]) -> None:
    """All records at once, atomically: JSON lines, or CSV with the top-k as ``name:prob`` separated by ``;``."""
    if Path(path).suffix.lower() == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
        return
    buf = io.StringIO()
    cols = ["video", "ok", "top1", "top1_prob", "top_k", "views", "clip_starts", "decoder", "seconds", "frames",
            "fps", "codec", "note", "error"]
    w = csv.DictWriter(buf, cols, extrasaction="ignore")
    w.writeheader()
    for r in recs:
        top = r.get("top_k") or []
        w.writerow({**r, "top1": top[0]["class"] if top else "", "top1_prob": top[0]["prob"] if top else "",
                    "top_k": ";".join(f"{t['class']}:{t['prob']:.4f}" for t in top),
                    "clip_starts": " ".join(map(str, r.get("clip_starts", [])))})
    atomic_write_text(path, buf.getvalue())


def format_record(r: dict) -> str:
    if not r["ok"]:
        return f"{r['video']}: FAILED: {r['error']}"
    top = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top_k"])
    note = f"; {r['note']}" if r.get("note") else ""
    return f"{r['video']}: {top}  [{r['views']} views, {r['decoder']}, {r['seconds']:.2f}s{note}]"


def run_predict(req: Request, trained: components.Trained | None = None) -> int:
    """Label ``req.videos`` (sharded over torchrun's processes when launched so); rank 0 prints a line per video
    and writes ``req.out``. Returns 1 when any video failed, else 0 (under hcml's launcher every worker returns 0
    and rank 0 leaves the count for the launcher, so a failed video is no torchrun failure report)."""
    from tqdm import tqdm

    trained = trained or check_request(req)
    info = init_distributed()
    mine = shard_rows(len(req.videos), info.rank, info.world)
    pred = Predictor(trained, req, info)
    if info.main and trained.classes_from == "indices":
        print(f"[predict] {req.checkpoint} holds no class names (saved before they were stored in checkpoints) "
              f"and its dataset's classes.txt is not at {trained.cfg.data.root or '(no data.root)'}: printing "
              f"class indices (class_<i>); pass --classes FILE (one name per line)", flush=True)
    where = f" (rank 0's {len(mine)} of {len(req.videos)})" if info.world > 1 else ""
    with tqdm(total=len(mine), desc=f"predict{where}", unit="video", disable=not info.main, leave=False) as bar:
        local = pred.label([req.videos[i] for i in mine], bar)
    recs = [r for part in all_gather_objects(local, info) for r in part]
    failed = sum(not r["ok"] for r in recs)
    if info.main:
        for r in recs:
            print(format_record(r))
        if req.out:
            write_records(req.out, recs)
        print(f"[predict] {len(recs) - failed} of {len(recs)} videos labelled"
              + (f", {failed} failed (named above)" if failed else "")
              + (f"; {req.out}" if req.out else ""), flush=True)
        if os.environ.get(STATUS_ENV):
            atomic_write_text(os.environ[STATUS_ENV], str(failed))
    cleanup()
    return 0 if os.environ.get(STATUS_ENV) else int(failed > 0)
