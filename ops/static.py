"""What the CUDA kernels cost, read off the compiler wherever nvcc is (no GPU needed): per kernel and architecture
the registers, spill bytes, static shared memory and stack that ``ptxas -v`` reports, the resident blocks and warps
per SM those allow, and the SASS instruction mix (``cuobjdump -sass``). ``hcml bench op --static`` prints it.

Occupancy counts registers, threads, and static plus dynamic shared memory (and the 1 KB the driver reserves per
block): each kernel's threads and dynamic shared memory come from ``csrc/launch_config.cpp``, which prints them
from the constants the launches use (built with the host compiler; no GPU needed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from hcml.errors import CostVolumeBuildError

CSRC = Path(__file__).with_name("csrc")
SASS_OPS = ("LDG", "LDGSTS", "STG", "LDS", "LDSM", "STS", "FFMA", "HFMA2", "HMMA", "BAR", "LDL", "STL")
WIDE = ("LDG.E.128", "LDGSTS.E.128", "STG.E.128")  # 16-byte global accesses, counted apart
RESERVED_SMEM = 1024  # bytes of shared memory the driver reserves per resident block (sm_80 and later)
SM = {"80": {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 164 * 1024},
      "90": {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 228 * 1024}}


def nvcc() -> str:
    path = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
    if path is None:
        raise CostVolumeBuildError("nvcc not found: the static kernel report needs the CUDA toolkit on PATH")
    return path


def cuobjdump() -> str | None:
    """cuobjdump from the toolkit, or from the ``nvidia-cuda-cuobjdump`` wheel (a dev dependency, with
    ``nvidia-cuda-nvdisasm`` which it calls: some toolkit installs, this project's CI machine's among them, ship
    nvcc and ptxas without them)."""
    found = shutil.which("cuobjdump") or str(Path(nvcc()).resolve().with_name("cuobjdump"))
    if Path(found).is_file():
        return found
    try:
        import nvidia

        for root in nvidia.__path__:
            for cand in Path(root).glob("cu*/bin/cuobjdump"):
                return str(cand)
    except ImportError:
        pass
    return None


def family(name: str) -> str:
    """``void hcml::nhwc::forward_fast<float, 7, 2>(...)`` → ``nhwc::forward_fast``."""
    return instance(name).split("<")[0]


def instance(name: str) -> str:
    """``void hcml::nhwc::forward_fast<float, 7, 2>(...)`` → ``nhwc::forward_fast<float, 7, 2>``."""
    name = name.replace("(anonymous namespace)::", "").split("(")[0]
    return name.removeprefix("void ").strip().removeprefix("hcml::")


def launch_configs() -> dict[str, tuple[int, int]]:
    """{``forward_fast<float, 7, 2>``: (threads per block, dynamic shared memory bytes)} for every kernel the op
    launches, printed by ``csrc/launch_config.cpp`` from the launches' own constants."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise CostVolumeBuildError("no host C++ compiler (g++) to read the kernels' launch configuration")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "launch_config"
        res = subprocess.run([cxx, "-std=c++20", "-DHCML_EMULATE", f"-I{CSRC}", str(CSRC / "launch_config.cpp"),
                              "-o", str(exe)], capture_output=True, text=True)
        if res.returncode != 0:
            raise CostVolumeBuildError(f"building launch_config.cpp failed: {res.stderr[-1500:]}")
        lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    out = {}
    for line in lines:
        name, threads, smem = line.rsplit(" ", 2)
        out[name] = (int(threads), int(smem))
    return out


def blocks_per_sm(arch: str, registers: int, threads: int, smem: int) -> int:
    """Resident blocks per SM: the tightest of registers (allocated per warp in units of 256), threads, the block
    limit and static shared memory."""
    lim = SM[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_smem = lim["smem"] // (smem + RESERVED_SMEM)
    return max(0, min(by_regs, lim["threads"] // threads, lim["blocks"], by_smem))


def parse_ptxas(text: str) -> dict[str, dict]:
    """``ptxas -v`` output → {mangled name: {registers, spill_bytes, stack_bytes, smem_bytes}}."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            current = m.group(1)
            out.setdefault(current, {"registers": 0, "spill_bytes": 0, "stack_bytes": 0, "smem_bytes": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current]["stack_bytes"] = int(m.group(1))
            out[current]["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[current]["smem_bytes"] = int(s.group(1)) if s else 0
    return out


def parse_sass(text: str) -> dict[str, Counter]:
    """``cuobjdump -sass`` → {mangled name: opcode counts}. An instruction counts under its full name, its base
    (``LDG``) and, for memory operations, its width (``LDG.E.128`` for ``LDG.E.128.CONSTANT``)."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), Counter())
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and current is not None:
            op = m.group(1)
            parts = op.split(".")
            names = {op, parts[0]}
            if parts[0] in ("LDG", "LDGSTS", "STG", "LDS", "STS") and "128" in parts:
                names.add(f"{parts[0]}.E.128")
            for name in names:
                current[name] += 1
    return out


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = res.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def kernel_report(archs: tuple[str, ...] = ("80", "90"), source: Path = CSRC / "cost_volume_kernels.cu") -> list[dict]:
    """Compile ``source`` for each arch (cubins built in parallel) and describe every kernel in it."""
    rows, configs = [], launch_configs()
    with tempfile.TemporaryDirectory() as tmp:
        procs = {arch: subprocess.Popen([nvcc(), "-cubin", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v",
                                         str(source), "-o", str(Path(tmp) / f"k{arch}.cubin")],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for arch in archs}
        dump = cuobjdump()
        env = {**os.environ, "NVDISASM_PATH": str(Path(dump).parent)} if dump else None  # it calls nvdisasm
        for arch, proc in procs.items():
            log = proc.communicate(timeout=1800)[0]
            if proc.returncode != 0:
                raise CostVolumeBuildError(f"nvcc for sm_{arch} failed: {log[-1500:]}")
            ptxas = parse_ptxas(log)
            cubin = Path(tmp) / f"k{arch}.cubin"
            sass = parse_sass(subprocess.run([dump, "-sass", str(cubin)], capture_output=True, text=True,
                                             env=env).stdout) if dump else {}
            names = demangle(sorted(ptxas))
            for mangled, info in sorted(ptxas.items()):
                fam, inst = family(names[mangled]), instance(names[mangled]).removeprefix("nhwc::")
                if inst not in configs:
                    raise CostVolumeBuildError(f"{inst}: not in csrc/launch_config.cpp's table of launches "
                                               f"({sorted(configs)}); add it there")
                threads, dynamic = configs[inst]
                info["smem_bytes"] += dynamic
                blocks = blocks_per_sm(arch, info["registers"], threads, info["smem_bytes"])
                mix = sass.get(mangled, Counter())
                rows.append({"name": names[mangled], "family": fam, "arch": f"sm_{arch}", **info,
                             "threads_per_block": threads, "blocks_per_sm": blocks,
                             "warps_per_sm": blocks * threads // 32,
                             "sass": {op: mix.get(op, 0) for op in (*SASS_OPS, *WIDE)} if dump else None})
    return rows


BUDGET = {"spill_bytes": 0, "min_blocks_per_sm": 2, "vector_bytes": 16}


def over_budget(row: dict) -> list[str]:
    """What a kernel misses of the static budget: no spills, at least 2 resident blocks per SM, 16-byte global loads
    (the tensor-core kernels: 16-byte cp.async) and stores in the compile-time kernels, and HMMA fed by ldmatrix in
    the tensor-core ones. Empty when it meets it."""
    out = []
    if row["spill_bytes"] > BUDGET["spill_bytes"]:
        out.append(f"{row['spill_bytes']} B of spills")
    if row["blocks_per_sm"] < BUDGET["min_blocks_per_sm"]:
        out.append(f"{row['blocks_per_sm']} block(s)/SM")
    sass = row.get("sass")
    if sass and row["family"].endswith("_fast"):
        out += [f"no {op}" for op in ("LDG.E.128", "STG.E.128") if not sass.get(op)]
    if sass and row["family"].endswith("_tc"):  # inputs staged by 16-byte cp.async (LDGSTS), MMAs fed by ldmatrix
        out += [f"no {op}" for op in ("LDGSTS.E.128", "STG.E.128", "HMMA", "LDSM") if not sass.get(op)]
    return out


def within_budget(row: dict) -> bool:
    return not over_budget(row)
