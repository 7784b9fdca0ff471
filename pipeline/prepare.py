"""``hcml prepare``: probe every video of a public dataset, optionally re-encode to a DALI-friendly form, and write
a prepared dataset directory plus a report of every unusable file (never silently dropped).

Why re-encode: NVDEC decodes H.264/HEVC (and the CPU reader VP9/VP8/MJPEG), not the MPEG-4 Part 2 in UCF-101's
AVIs; and a random clip is decoded from the preceding keyframe, so x264's default GOP of 250 would cost ~125
wasted frames per clip. The GOP is set to T·stride (the clip span) so a clip never waits for more than one span.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from hcml.pipeline.prepared import atomic_write_text, write_prepared
from hcml.pipeline.sources import load_source

# What DALI's video readers decode: CPU (experimental reader) and GPU (NVDEC).
DALI_CPU_CODECS = {"vp8", "vp9", "mjpeg"}
DALI_GPU_CODECS = {"h264", "hevc", "vp8", "vp9", "av1", "mjpeg"}


@dataclass
class Probe:
    path: str
    ok: bool
    reason: str = ""  # missing | zero-length | undecodable | truncated | no video stream | unsupported codec | too few frames
    detail: str = ""
    codec: str = ""
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    vfr: bool = False


def probe_video(path: str | Path, min_frames: int = 1) -> Probe:
    """Demux every packet (cheap) and decode the first and last frames: catches truncation and corruption."""
    import av

    path = Path(path)
    if path.is_dir():  # a JPEG frame folder (Something-V1)
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if not frames:
            return Probe(str(path), False, "no frames", "directory has no .jpg frames")
        return Probe(str(path), len(frames) >= min_frames, "" if len(frames) >= min_frames else "too few frames",
                     f"{len(frames)} frames", "jpeg-frames", len(frames))
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
        if len(pts) > 2:
            d = sorted(b - a for a, b in zip(sorted(pts), sorted(pts)[1:]))
            p.vfr = d[-1] > 1.5 * max(d[len(d) // 2], 1)
        if n < min_frames:
            return replace(p, ok=False, reason="too few frames", detail=f"{n} frames < clip span {min_frames}")
        return p


def gop_for(frames: int, stride: int) -> int:
    """Keyframe interval = clip span, so a random clip decodes at most one span of frames it does not use."""
    return max(1, (frames - 1) * stride + 1)


def reencode(src: Path, dst: Path, codec: str, short_side: int, fps: float, gop: int) -> None:
    """Re-encode with PyAV: every decoded frame kept in order at the source's average rate (a constant frame
    rate), shorter side ``short_side``, GOP = ``gop``, no B-frames, no audio; written to a temp name and renamed
    (an interrupted run never leaves a half file). JPEG frame folders (Something-V1) become 12 fps videos."""
    import itertools

    from hcml.pipeline.video import encode_video, read_frames, scaled_size

    quality = {"h264": {"preset": "fast", "crf": "20"}, "vp9": {"crf": "30"}}[codec]
    try:
        frames, src_fps = read_frames(src)
        frames = iter(frames)
        first = next(frames, None)
        if first is None:
            raise RuntimeError("no frame decodes")
        size = scaled_size(first.width, first.height, short_side)
        encode_video(itertools.chain([first], frames), dst, codec, fps or src_fps, gop, size=size, options=quality)
    except RuntimeError:
        raise
    except Exception as e:  # PyAV's errors (corrupt stream, unsupported pixel format, ...)
        raise RuntimeError(f"{type(e).__name__}: {e}") from e


def prepare(dataset: str, root: str | Path, out: str | Path, *, split: int = 1, workers: int = 4,
            reencode_to: str = "none", short_side: int = 320, frames: int = 16, stride: int = 2,
            progress: bool = True) -> dict:
    """Write a prepared dataset directory under ``out`` and ``out/report.json`` + ``out/report.txt``."""
    from tqdm import tqdm

    src = load_source(dataset, root, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    span = gop_for(frames, stride)
    ext = {"h264": ".mp4", "vp9": ".webm"}.get(reencode_to)
    root = Path(root).resolve()
    jobs = [(split_name, Path(p), lab) for split_name, rows in (("train", src.train), ("val", src.val))
            for p, lab in rows]

    def work(job):
        split_name, path, lab = job
        pr = probe_video(path, min_frames=1)
        if not pr.ok:
            return split_name, lab, pr, None
        if reencode_to == "none":
            allowed = DALI_GPU_CODECS | DALI_CPU_CODECS
            if pr.codec not in allowed:
                return split_name, lab, replace(pr, ok=False, reason="unsupported codec",
                                                detail=f"{pr.codec}: use --reencode h264|vp9"), None
            final, fp = path, pr
        else:
            rel = path.resolve().relative_to(root)
            final = (out / "videos" / rel).with_suffix(ext)
            if not (final.is_file() and final.stat().st_size > 0):  # resumable: done files are skipped
                try:
                    reencode(path, final, reencode_to, short_side, pr.fps, span)
                except RuntimeError as e:
                    return split_name, lab, replace(pr, ok=False, reason="undecodable",
                                                    detail=f"re-encode failed: {e}"), None
            fp = probe_video(final)
            if not fp.ok:
                return split_name, lab, replace(fp, path=str(path)), None
        if fp.frames < span:
            return split_name, lab, replace(fp, path=str(path), ok=False, reason="too few frames",
                                            detail=f"{fp.frames} frames < T·stride span {span}"), None
        return split_name, lab, fp, final

    rows: dict[str, list] = {"train": [], "val": []}
    excluded, warnings = [], []
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for split_name, lab, pr, final in tqdm(ex.map(work, jobs), total=len(jobs), desc=f"prepare {dataset}",
                                               unit="video", disable=not progress):
            if final is None:
                excluded.append({"split": split_name, "path": pr.path, "reason": pr.reason, "detail": pr.detail})
                continue
            if pr.vfr and reencode_to == "none":
                warnings.append({"path": pr.path, "warning": "variable frame rate (frame-indexed clips are still "
                                 "exact; timestamps are not); --reencode makes it constant"})
            final = Path(final)
            rel = os.path.relpath(final, out) if final.is_relative_to(out) else str(final)
            rows[split_name].append((rel, lab, pr.frames))
    for split_name, path in src.missing:
        excluded.append({"split": split_name, "path": path, "reason": "missing", "detail": "listed but not found"})
    meta = {"name": dataset, "codec": reencode_to if reencode_to != "none" else "as-is", "frames": frames,
            "stride": stride, "short_side": short_side if reencode_to != "none" else None,
            "flip_pairs": src.flip_pairs, "source_root": str(root)}
    write_prepared(out, src.classes, rows["train"], rows["val"], meta)
    by_reason: dict[str, int] = {}
    for e in excluded:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    report = {"dataset": dataset, "usable": {k: len(v) for k, v in rows.items()}, "excluded": excluded,
              "excluded_by_reason": by_reason, "warnings": warnings}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    lines = [f"{dataset}: {len(rows['train'])} train + {len(rows['val'])} val videos usable, "
             f"{len(excluded)} excluded, {len(warnings)} warnings"]
    lines += [f"  {reason}: {n}" for reason, n in sorted(by_reason.items())]
    lines += [f"  excluded {e['split']}: {e['path']} ({e['reason']}{': ' + e['detail'] if e['detail'] else ''})"
              for e in excluded[:20]]
    if len(excluded) > 20:
        lines.append(f"  ... {len(excluded) - 20} more in report.json")
    atomic_write_text(out / "report.txt", "\n".join(lines) + "\n")
    report["summary"] = "\n".join(lines)
    return report
