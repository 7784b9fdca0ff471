"""``hcml prepare``: probe every video of a public dataset, optionally re-encode to a DALI-friendly form, and write
a prepared dataset directory plus a report of every unusable file (never silently dropped).

Why re-encode: DALI's CPU decoder takes VP9/VP8/MJPEG only (not H.264), NVDEC H.264/HEVC/VP9/AV1; and a random clip
is decoded from the keyframe before its start, so x264's default GOP of 250 (plus scene-cut keyframes) costs ~125
frames decoded in vain per clip: ~156 decoded for 31 used at T = 16, stride 2. ``--gop`` (default 16) writes a
fixed keyframe interval with no scene cuts (~39 decoded for 31; with ``data.keyframe_starts`` none in vain), and one
shorter side for every video, so that videos of one aspect share one coded size (NVDEC reuses a decoder only for
an identical size; a new one costs 100-300 ms). Both are recorded in dataset.yaml (``gop``, ``coded_sizes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from hcml.errors import DatasetError, HCMLError
from hcml.files import atomic_write_text
from hcml.pipeline.prepared import claim_folder, write_prepared
from hcml.pipeline.sources import SourceOptions, load_source
from hcml.pipeline.video import FRAME_FOLDER_FPS, decode_jpeg, frame_folder_frames

from hcml.pipeline.loader import DALI_CODECS, clip_span

DALI_CPU_CODECS, DALI_GPU_CODECS = DALI_CODECS["cpu"], DALI_CODECS["gpu"]


@dataclass
class Probe:
    path: str
    ok: bool
    reason: str = ""  # missing | zero-length | undecodable | truncated | bad timestamps | no video stream | unsupported codec | too few frames
    detail: str = ""
    codec: str = ""
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    vfr: bool = False


def _timestamp_fault(pts: list[int], in_order: bool) -> str:
    """Why packet timestamps cannot index frames, or "". Frame-indexed readers (DALI) order and count frames by
    pts: equal pts make frames collide (every pts 0 made DALI return frames 50-57 for 20-27). ``in_order``: also
    strictly increasing in file order (what ``prepare`` writes: no B-frames)."""
    srt = sorted(pts)
    dups = sum(b == a for a, b in zip(srt, srt[1:]))
    if dups:
        return f"{dups + 1} packets share a timestamp (e.g. {srt[0]}, {srt[1]})" if len(set(pts)) == 1 else \
            f"{dups} packets repeat an earlier timestamp"
    if in_order:
        bad = next((i for i, (a, b) in enumerate(zip(pts, pts[1:]), 1) if b <= a), None)
        if bad is not None:
            return f"timestamps decrease at packet {bad} ({pts[bad - 1]} then {pts[bad]})"
    return ""


def probe_video(path: str | Path, min_frames: int = 1, timestamps: str = "unique") -> Probe:
    """Demux every packet (cheap) and decode the first frame: catches truncation, corruption and timestamps a
    frame-indexed reader cannot use (``timestamps``: ``unique``, ``increasing`` in file order, or ``any``)."""
    import av

    path = Path(path)
    if path.is_dir():  # a JPEG frame folder (Something-V1): its first frame must decode, as a video's must
        frames = frame_folder_frames(path)
        if not frames:
            return Probe(str(path), False, "no frames", "directory has no .jpg frames")
        try:
            first = decode_jpeg(frames[0])
        except Exception as e:  # noqa: BLE001 - PyAV's errors for a damaged or mislabelled file
            return Probe(str(path), False, "undecodable", f"{frames[0].name}: {type(e).__name__}: {e}",
                         "jpeg-frames", len(frames))
        return Probe(str(path), len(frames) >= min_frames, "" if len(frames) >= min_frames else "too few frames",
                     f"{len(frames)} frames", "jpeg-frames", len(frames), FRAME_FOLDER_FPS, first.width, first.height)
    if not path.exists():
        return Probe(str(path), False, "missing")
    if path.stat().st_size == 0:
        return Probe(str(path), False, "zero-length")
    try:
        container = av.open(str(path))
    except Exception as e:
        return Probe(str(path), False, "undecodable", f"cannot open container: {e}")
    with container:
        if not container.streams.video:
            return Probe(str(path), False, "no video stream")
        st = container.streams.video[0]
        p = Probe(str(path), True, codec=st.codec_context.name, width=st.codec_context.width,
                  height=st.codec_context.height, fps=float(st.average_rate or 0))
        pts, n, decoded, err = [], 0, 0, None
        try:
            for packet in container.demux(st):
                if packet.size == 0:
                    continue
                n += 1
                if packet.pts is not None:
                    pts.append(packet.pts)
                if decoded == 0:
                    decoded += len(packet.decode())
        except Exception as e:  # demux/decode error part-way: a truncated or damaged file
            err = e
        p.frames = n
        if err is not None:
            return replace(p, ok=False, reason="truncated", detail=f"after {n} packets: {err}")
        if decoded == 0 and n > 0:
            return replace(p, ok=False, reason="undecodable", detail="no frame decodes")
        if st.frames and n < 0.9 * st.frames:
            return replace(p, ok=False, reason="truncated",
                           detail=f"{n} packets but the header says {st.frames} frames")
        if pts and container.duration and st.time_base and p.fps:
            # containers without a frame count (WebM/MKV) still record the duration: the last packet must reach it
            last = float(max(pts) * st.time_base) + 1 / p.fps
            total = container.duration / 1e6
            if last < 0.9 * total - 1 / p.fps:
                return replace(p, ok=False, reason="truncated",
                               detail=f"packets end at {last:.2f}s of a {total:.2f}s video")
        fault = "" if timestamps == "any" else _timestamp_fault(pts, timestamps == "increasing")
        if fault:
            return replace(p, ok=False, reason="bad timestamps", detail=fault)
        if len(pts) > 2:
            d = sorted(b - a for a, b in zip(sorted(pts), sorted(pts)[1:]))
            p.vfr = d[-1] > 1.5 * max(d[len(d) // 2], 1)
        if n < min_frames:
            return replace(p, ok=False, reason="too few frames", detail=f"{n} frames < clip span {min_frames}")
        return p


GOP = 16  # default --gop: frames decoded per clip ~ span + GOP / 2 at random starts
REENCODE = ("h264", "hevc", "vp9")
QUALITY = {"h264": {"preset": "fast", "crf": "20"}, "hevc": {"preset": "fast", "crf": "24"}, "vp9": {"crf": "30"}}


def reencode(src: Path, dst: Path, codec: str, short_side: int, fps: float, gop: int, upscale: bool = False,
             cancel: threading.Event | None = None) -> None:
    """Re-encode with PyAV: every decoded frame kept in presentation order at the source's average rate (a constant
    frame rate: output frame n is source frame n, also for variable-rate and B-frame sources), shorter side
    ``short_side`` (never enlarged unless ``upscale``), GOP = ``gop``, no B-frames, no audio; written to a temp
    name and renamed (an interrupted run never leaves a half file). JPEG frame folders become 12 fps videos."""
    import itertools

    from hcml.pipeline.video import Cancelled, encode_video, read_frames, scaled_size

    quality = QUALITY[codec]
    try:
        frames, src_fps = read_frames(src)
        frames = iter(frames)
        first = next(frames, None)
        if first is None:
            raise RuntimeError("no frame decodes")
        size = scaled_size(first.width, first.height, short_side, upscale)
        encode_video(itertools.chain([first], frames), dst, codec, fps or src_fps, gop, size=size, options=quality,
                     cancel=cancel)
    except (RuntimeError, Cancelled, HCMLError):  # HCMLError: the output disk is full, stop everything
        raise
    except Exception as e:  # PyAV's errors (corrupt stream, unsupported pixel format, ...)
        raise RuntimeError(f"{type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class PrepareSettings:
    """What decides the output of ``hcml prepare``; stored in OUT/.hcml-prepare.json so that a rerun into the same
    folder continues (finished videos are not redone) and a rerun with other settings is refused."""

    dataset: str
    root: str
    reencode: str = "none"  # h264 | hevc | vp9 | none
    short_side: int = 320  # with reencode
    upscale: bool = False
    frames: int = 16
    stride: int = 2
    split: int = 1
    gop: int = GOP  # with reencode: keyframe every gop frames, no others

    @property
    def span(self) -> int:
        return clip_span(self.frames, self.stride)

    @property
    def ext(self) -> str | None:
        return {"h264": ".mp4", "hevc": ".mp4", "vp9": ".webm"}.get(self.reencode)


OWN_OUTPUTS = ("train.txt", "val.txt", "classes.txt", "dataset.yaml", "report.json", "report.txt", "videos",
               ".hcml-prepare.json")
MAX_EXCLUDED = 0.2  # default --max-excluded: Kinetics copies miss a few % of clips; a fifth means a wrong layout


def prepare_one(path: Path, s: PrepareSettings, out: Path, fix: str | None,
                cancel: threading.Event | None = None) -> tuple[Probe, Path | None]:
    """(probe of the video that will be used, its path) or (the failed probe, None). A source that fails and has a
    published replacement (``fix``) is retried with it."""
    pr = probe_video(path, timestamps="any" if s.reencode != "none" else "unique")
    if not pr.ok and fix:
        fixed, final = prepare_one(Path(fix), s, out, None, cancel)
        return (replace(fixed, detail=f"replaces {path.name} ({pr.reason})"), final) if final else (pr, None)
    if not pr.ok:
        return pr, None
    if s.reencode == "none":
        if pr.codec not in DALI_GPU_CODECS | DALI_CPU_CODECS:
            return replace(pr, ok=False, reason="unsupported codec", detail=f"{pr.codec}: use --reencode h264|vp9"), None
        final, fp = path, pr
    else:
        rel = path.relative_to(s.root) if path.is_relative_to(s.root) else "_external" / path.relative_to(path.anchor)
        final = (out / "videos" / rel).with_suffix(s.ext)
        if not (final.is_file() and final.stat().st_size > 0):  # resumable: finished files are kept
            try:
                reencode(path, final, s.reencode, s.short_side, pr.fps, s.gop, s.upscale, cancel)
            except RuntimeError as e:
                return replace(pr, ok=False, reason="undecodable", detail=f"re-encode failed: {e}"), None
        fp = probe_video(final, timestamps="increasing")
        if not fp.ok:
            return replace(fp, path=str(path), detail=f"re-encoded file {final}: {fp.detail}"), None
    if fp.frames < s.span:
        return replace(fp, path=str(path), ok=False, reason="too few frames",
                       detail=f"{fp.frames} frames < T·stride span {s.span}"), None
    return replace(fp, path=str(path)) if final is path else fp, final


@contextlib.contextmanager
def _set_on_error(event: threading.Event):
    """Set ``event`` when the block raises, before the enclosing executor waits for its running jobs."""
    try:
        yield
    except BaseException:
        event.set()
        raise


def prepare(dataset: str, root: str | Path, out: str | Path, *, opts: SourceOptions | None = None, workers: int = 4,
            reencode_to: str = "none", short_side: int | None = None, upscale: bool = False, frames: int = 16,
            stride: int = 2, gop: int = GOP, max_excluded: float = MAX_EXCLUDED, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Write a prepared dataset directory under ``out`` and ``out/report.json`` + ``out/report.txt``. Raises
    DatasetError (after writing the report) when nothing is usable or more than ``max_excluded`` of the listed
    videos are excluded, naming the main reasons."""
    from tqdm import tqdm

    if short_side is not None and reencode_to == "none":
        raise DatasetError(f"--short-side {short_side} needs --reencode {'|'.join(REENCODE)} (with --reencode none "
                           f"the files are kept as they are)")
    if reencode_to not in (*REENCODE, "none"):
        raise DatasetError(f"--reencode {reencode_to!r}: expected one of {', '.join(REENCODE)}, none")
    if gop < 1:
        raise DatasetError(f"--gop {gop}: the keyframe interval must be >= 1 frame")
    opts = opts or SourceOptions()
    src = load_source(dataset, root, opts)
    out = Path(os.path.abspath(Path(out).expanduser()))
    root = Path(os.path.abspath(Path(root).expanduser()))
    settings = PrepareSettings(dataset, str(root), reencode_to, short_side or 320, upscale, frames, stride,
                               opts.split, gop if reencode_to != "none" else 0)
    if src.listed and not (src.train or src.val):
        raise DatasetError(f"prepare {dataset}: none of the {src.listed} listed videos exists under {root} (first: "
                           f"{src.missing[0][1]}); see docs/DATASETS.md for the layout")
    with claim_folder(out, ".hcml-prepare.json", json.dumps(dataclasses.asdict(settings), sort_keys=True), OWN_OUTPUTS,
                      overwrite, "prepare"):
        jobs = [(split_name, Path(p), lab) for split_name, rows in (("train", src.train), ("val", src.val))
                for p, lab in rows]
        rows: dict[str, list] = {"train": [], "val": []}
        excluded, warnings, codecs, replaced, sizes = [], [], set(), 0, {}
        cancel = threading.Event()  # set when the loop is left by an exception (Ctrl-C, a stop signal)
        with ThreadPoolExecutor(max(1, workers)) as ex, _set_on_error(cancel):
            results = ex.map(lambda job: prepare_one(job[1], settings, out, src.replacements.get(str(job[1])),
                                                     cancel), jobs)
            for (split_name, path, lab), (pr, final) in tqdm(zip(jobs, results), total=len(jobs), unit="video",
                                                              desc=f"prepare {dataset}", disable=not progress):
                if final is None:
                    excluded.append({"split": split_name, "path": pr.path, "reason": pr.reason, "detail": pr.detail})
                    continue
                replaced += pr.detail.startswith("replaces ") or str(path) in src.fixes_used
                codecs.add(pr.codec)
                sizes[f"{pr.width}x{pr.height}"] = sizes.get(f"{pr.width}x{pr.height}", 0) + 1
                if pr.vfr and reencode_to == "none":
                    warnings.append({"path": pr.path, "warning": "variable frame rate (frame-indexed clips are still "
                                     "exact; timestamps are not); --reencode makes it constant"})
                rel = os.path.relpath(final, out) if Path(final).is_relative_to(out) else str(final)
                rows[split_name].append((rel, lab, pr.frames))
        for split_name, path in src.missing:
            excluded.append({"split": split_name, "path": path, "reason": "missing", "detail": "listed but not found"})
        report = write_report(out, dataset, rows, excluded, warnings, replaced, codecs)
        usable = len(rows["train"]) + len(rows["val"])
        share = len(excluded) / max(1, usable + len(excluded))
        if not rows["train"] or share > max_excluded:
            by_count = sorted(report["excluded_by_reason"].items(), key=lambda kv: -kv[1])
            reasons = ", ".join(f"{n} {r}" for r, n in by_count)
            first = next((e for e in excluded if e["reason"] != "missing"), excluded[0] if excluded else None)
            hint = f"; e.g. {first['path']}: {first['detail'] or first['reason']}" if first else ""
            raise DatasetError(f"prepare {dataset}: {len(excluded)} of {usable + len(excluded)} videos excluded "
                               f"({100 * share:.0f}%, limit --max-excluded {max_excluded:g}; {reasons}){hint}; "
                               f"{'no training video usable; ' if not rows['train'] else ''}nothing written but the "
                               f"report: {out / 'report.txt'}")
        reencoded = reencode_to != "none"
        meta = {"name": dataset, "codec": reencode_to if reencoded else "as-is", "codecs": sorted(codecs),
                "frames": frames, "stride": stride, "short_side": settings.short_side if reencoded else None,
                "flip_pairs": src.flip_pairs, "source_root": str(root),
                "gop": settings.gop if reencoded else None,  # keyframes exactly every gop frames (None: as-is)
                "coded_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1]))}  # WxH → videos
        write_prepared(out, src.classes, rows["train"], rows["val"], meta)
        if reencoded and len(sizes) > 1:
            top = ", ".join(f"{k} ({v})" for k, v in list(meta["coded_sizes"].items())[:3])
            report["summary"] += (f"\n{len(sizes)} coded sizes (source aspect ratios differ; NVDEC makes a decoder per "
                                  f"size): {top}{' ...' if len(sizes) > 3 else ''}")
        gpu_only = sorted(codecs - DALI_CPU_CODECS)
        if gpu_only:
            report["summary"] += (f"\nnote: {'/'.join(gpu_only)} decodes only with DALI's GPU reader "
                                  f"(data.device=gpu); for CPU training prepare with --reencode vp9")
        return report


def write_report(out: Path, dataset: str, rows: dict, excluded: list, warnings: list, replaced: int,
                 codecs: set) -> dict:
    """report.json (every excluded file and why) and report.txt (counts and the first 20)."""
    by_reason: dict[str, int] = {}
    for e in excluded:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    report = {"dataset": dataset, "usable": {k: len(v) for k, v in rows.items()}, "excluded": excluded,
              "excluded_by_reason": by_reason, "replaced": replaced, "codecs": sorted(codecs), "warnings": warnings}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    lines = [f"{dataset}: {len(rows['train'])} train + {len(rows['val'])} val videos usable, "
             f"{len(excluded)} excluded, {replaced} from published replacements, {len(warnings)} warnings"]
    lines += [f"  {reason}: {n}" for reason, n in sorted(by_reason.items())]
    lines += [f"  excluded {e['split']}: {e['path']} ({e['reason']}{': ' + e['detail'] if e['detail'] else ''})"
              for e in excluded[:20]]
    if len(excluded) > 20:
        lines.append(f"  ... {len(excluded) - 20} more in report.json")
    atomic_write_text(out / "report.txt", "\n".join(lines) + "\n")
    report["summary"] = "\n".join(lines)
    return report
