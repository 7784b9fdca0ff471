"""Cost volume: every implementation against a naive loop; gradients; the torch.library contract; compile."""

from __future__ import annotations

import contextlib
import shutil
import subprocess

import pytest
import torch

from hcml.ops import cost_volume, cost_volume_reference, num_displacements
from tests.conftest import requires_cuda


def naive(f1, f2, md, s):
    """The definition, pixel by pixel (tiny shapes only)."""
    B, C, H, W = f1.shape
    D = num_displacements(md, s)
    out = torch.zeros(B, D * D, H, W, dtype=torch.float64)
    for b in range(B):
        for i in range(D):
            for j in range(D):
                dy, dx = (i - D // 2) * s, (j - D // 2) * s
                for y in range(H):
                    for x in range(W):
                        if 0 <= y + dy < H and 0 <= x + dx < W:
                            out[b, i * D + j, y, x] = (f1[b, :, y, x].double() * f2[b, :, y + dy, x + dx].double()).mean()
    return out


SHAPES = [  # (B, C, H, W, md, s): odd sizes, B=1, C=1, non-square, several d/s
    (1, 1, 5, 7, 2, 1),
    (2, 3, 9, 6, 4, 2),
    (1, 4, 13, 11, 6, 2),
    (2, 2, 4, 4, 6, 2),  # window larger than the image
    (1, 3, 8, 5, 3, 3),
    (1, 2, 6, 9, 0, 1),  # D = 1
]


@pytest.fixture(params=["c", "torch"])
def cpu_path(request, monkeypatch):
    """Both CPU implementations: the C kernels and the pure-torch band GEMMs (used without a C compiler)."""
    from hcml.ops import _cpu

    if request.param == "torch":
        monkeypatch.setenv("HCML_CPU_COST_VOLUME", "torch")
    elif _cpu.library() is None:
        pytest.skip("no C compiler here: the C kernels cannot be built")
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_naive_loop(shape, cpu_path):
    B, C, H, W, md, s = shape
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    ref = naive(f1, f2, md, s)
    D = num_displacements(md, s)
    out = cost_volume(f1, f2, md, s)
    assert out.shape == (B, D * D, H, W)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cost_volume_reference(f1, f2, md, s).double(), ref, atol=1e-5, rtol=1e-5)


def test_known_shift_peaks_at_the_displacement():
    """f2 = f1 shifted by (+2, -4): with unit-norm pixels (Cauchy-Schwarz) the (dy, dx) = (2, -4) channel is the
    strict maximum away from borders and equals mean_c f1²."""
    f1 = torch.nn.functional.normalize(torch.randn(1, 8, 20, 20), dim=1)
    f2 = torch.zeros_like(f1)
    f2[..., 2:, :-4] = f1[..., :-2, 4:]  # f2[y+2, x-4] = f1[y, x]
    out = cost_volume(f1, f2, 6, 2)
    D = 7
    k = (2 // 2 + D // 2) * D + (-4 // 2 + D // 2)
    inner = out[0, :, 2:-6, 6:-6]
    assert torch.all(inner.argmax(0) == k)
    torch.testing.assert_close(inner[k], (f1[0, :, 2:-6, 6:-6] ** 2).mean(0))


def test_gradcheck_float64(cpu_path):
    g = torch.Generator().manual_seed(1)
    f1 = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    f2 = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cost_volume(a, b, 2, 1), (f1, f2))
    assert torch.autograd.gradcheck(lambda a, b: cost_volume(a, b, 4, 2), (f1, f2))


def test_grad_matches_reference_autograd(cpu_path):
    f1 = torch.randn(2, 5, 9, 7, requires_grad=True)
    f2 = torch.randn(2, 5, 9, 7, requires_grad=True)
    g = torch.randn(2, 49, 9, 7)
    ga = torch.autograd.grad(cost_volume(f1, f2, 6, 2), (f1, f2), g)
    gb = torch.autograd.grad(cost_volume_reference(f1, f2, 6, 2), (f1, f2), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_tolerances(dtype, tol, cpu_path):
    """Half inputs accumulate in fp32; the error is the output rounding (documented: fp16 2e-3, bf16 1e-2)."""
    f1, f2 = torch.randn(2, 16, 10, 12), torch.randn(2, 16, 10, 12)
    ref = cost_volume(f1.to(dtype).float(), f2.to(dtype).float(), 6, 2)
    out = cost_volume(f1.to(dtype), f2.to(dtype), 6, 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_channels_last_inputs_give_the_same_result(cpu_path):
    f1, f2 = torch.randn(2, 6, 9, 11), torch.randn(2, 6, 9, 11)
    a = cost_volume(f1, f2)
    b = cost_volume(f1.contiguous(memory_format=torch.channels_last), f2.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b)


# Other memory layouts of the same (N, C, H, W) values: what a model or a user hands the op.
LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "n-c-swapped": lambda t: t.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),  # a (B, T) batch seen so
    "channel-slice": lambda t: torch.cat([t, t[:, :1]], 1)[:, :t.shape[1]],
    "row-slice": lambda t: torch.cat([t, t[:, :, :2]], 2)[:, :, :t.shape[2]],
    "column-slice": lambda t: torch.cat([t, t[..., :3]], 3)[..., :t.shape[3]],  # rows not contiguous: copied
    "hw-transposed": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
}


@pytest.mark.parametrize("shape", [(4, 5, 7, 9, 4, 2), (2, 3, 6, 5, 6, 2), (3, 2, 5, 8, 2, 1), (2, 4, 1, 6, 2, 1)])
def test_any_input_layout_gives_the_naive_values_and_gradients(shape, cpu_path):
    """Every layout (the C kernels read NHWC or whole planes in place and copy the rest), each input and the
    incoming gradient in a different one, gives the naive loop's values and the float64 reference's gradients."""
    B, C, H, W, md, s = shape
    gen = torch.Generator().manual_seed(3)
    f1, f2 = torch.randn(B, C, H, W, generator=gen), torch.randn(B, C, H, W, generator=gen)
    D = num_displacements(md, s)
    g = torch.randn(B, D * D, H, W, generator=gen)
    ref = naive(f1, f2, md, s)
    a, b = f1.double().requires_grad_(), f2.double().requires_grad_()
    grads_ref = torch.autograd.grad(cost_volume_reference(a, b, md, s), (a, b), g.double())
    names = list(LAYOUTS)
    for k, n1 in enumerate(names):
        n2, ng = names[(k + 1) % len(names)], names[(k + 2) % len(names)]
        a, b = LAYOUTS[n1](f1.clone()).requires_grad_(), LAYOUTS[n2](f2.clone()).requires_grad_()
        assert torch.equal(a, f1) and torch.equal(b, f2)
        out = cost_volume(a, b, md, s)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n1}/{n2}: {m}")
        grads = torch.autograd.grad(out, (a, b), LAYOUTS[ng](g.clone()))
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"gradients, inputs {n1}/{n2}, grad {ng}: {m}")


def test_planar_kernels_read_planes_in_place():
    """The layouts whose (n, c) planes are contiguous go to the planar C kernels without a copy (the model's
    NCHW-on-CPU path); rows that are not contiguous are not read in place."""
    from hcml.ops import _cpu

    t = torch.randn(3, 4, 5, 6)
    for name, want in [("contiguous", True), ("n-c-swapped", True), ("channel-slice", True), ("row-slice", True),
                       ("column-slice", False), ("hw-transposed", False)]:
        assert _cpu.planar(LAYOUTS[name](t)) is want, name


def test_bad_arguments_are_named():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="multiple of stride"):
        cost_volume(x, x, 5, 2)
    with pytest.raises(ValueError, match="one shape"):
        cost_volume(x, torch.randn(1, 2, 5, 6))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(fmt, dtype):
    f1 = torch.randn(2, 3, 7, 6).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    f2 = torch.randn(2, 3, 7, 6).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    torch.library.opcheck(torch.ops.hcml.cost_volume.default, (f1, f2, 4, 2))
    g = torch.randn(2, 25, 7, 6).to(dtype).contiguous(memory_format=fmt)
    torch.library.opcheck(torch.ops.hcml.cost_volume_backward.default, (g, f1.detach(), f2.detach(), 4, 2))


def test_compile_fullgraph_zero_graph_breaks():
    """A module using the op, traced by dynamo: one graph, no breaks, autograd through the compiled graph."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, a, b):
            return cost_volume(self.conv(a), self.conv(b), 4, 2).relu().sum()

    m = M()
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    explanation = torch._dynamo.explain(m)(a, b)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    loss = compiled(a, b)
    loss.backward()
    assert len(graphs) == 1
    assert any("hcml.cost_volume" in str(n.target) for n in graphs[0].graph.nodes)
    torch.testing.assert_close(loss, m(a, b))


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="needs nvcc and g++ to compile the kernels")
def test_static_kernel_report_every_kernel_within_budget():
    """What each kernel costs, read off the compiler without a GPU, and the budget every kernel the op can
    dispatch to must hold (sm_80 and sm_90): no spills, >= 2 resident blocks per SM counting the shared memory the
    launch asks for, and 16-byte global loads and stores in the compile-time kernels. A change that makes a kernel
    spill, or take so much shared memory that one block fills an SM, fails here."""
    from hcml.launch.bench.op import roofline, show, static_report
    from hcml.ops.static import blocks_per_sm, launch_configs

    rep = static_report()
    rows = rep["kernels"]
    for arch in ("sm_80", "sm_90"):
        names = {r["name"].split("(")[0].removeprefix("void hcml::nhwc::") for r in rows if r["arch"] == arch}
        assert names == set(launch_configs()), names  # what is compiled is what the launches know
    for r in rows:
        assert r["sass"] is not None, r["name"]
        tc = "_tc<" in r["name"]
        assert r["sass"]["HMMA" if tc else "FFMA"] > 0, r["name"]  # real SASS was read, of the unit meant
        if tc:
            assert r["sass"]["LDSM"] > 0, r["name"]  # operands through ldmatrix
        assert r["spill_bytes"] == 0, (r["name"], r["arch"], r["spill_bytes"])
        assert r["blocks_per_sm"] >= 2, (r["name"], r["arch"], r["registers"], r["smem_bytes"])
        if "_fast<" in r["name"] or tc:
            assert r["sass"]["LDGSTS.E.128" if tc else "LDG.E.128"] > 0, r["name"]  # tc: cp.async, 16 bytes
            assert r["sass"]["STG.E.128"] > 0, r["name"]
            assert r["sass"]["LDL"] == 0, r["name"]
            assert r["sass"]["STL"] == 0, r["name"]
    assert all(r["within_budget"] for r in rows)
    # launch shared memory by hand, bf16 at D = 7, s = 2. Forward: 16-channel chunks (32 bytes) of the f2 window
    # (8 + 12 rows of 40 floats) and the f1 tile (8 rows of 40 floats). Backward: 8-channel chunks of both windows
    # and the chunk's two grads of the 8 x 16 tile.
    assert launch_configs()["forward_fast<__nv_bfloat16, 7, 2>"] == (224, 4 * 16 * 28 * 40)
    assert launch_configs()["backward_fast<__nv_bfloat16, 7, 2>"] == (256, 4 * (2 * 8 * 20 * 40 + 2 * 128 * 8))
    # tensor cores, 16-byte units: the forward stages, twice (double buffering), 16 channels per pixel (3 units with
    # the pad) of the 4 classes' 10 x 14 windows (rows of 46 units: 42 rounded up to 6 mod 8) and 4 x 8 tiles (rows
    # of 28: 24 → 4 mod 8); the backward both windows once and the chunk's two grads (floats)
    assert launch_configs()["forward_tc<__nv_bfloat16, 7, 2>"] == (256, 2 * 16 * (4 * 10 * 46 + 4 * 4 * 28))
    assert launch_configs()["backward_tc<__nv_bfloat16, 7, 2>"] == (256, 16 * 2 * 4 * 10 * 46 + 4 * 2 * 128 * 16)
    assert "forward_tc<float, 7, 2>" not in launch_configs()  # fp32 stays on CUDA cores
    # occupancy by hand: 32 registers x 256 threads = 8 warps of 1024 registers → 8 blocks; 255 → 1 block; the
    # shared memory of a block plus the 1 KB the driver keeps
    assert blocks_per_sm("90", 32, 256, 0) == 8
    assert blocks_per_sm("90", 255, 256, 0) == 1
    assert blocks_per_sm("90", 128, 256, 0) == 2
    assert blocks_per_sm("80", 64, 128, 100 * 1024) == 1
    assert blocks_per_sm("90", 32, 128, 113 * 1024) == 2  # 2 x (113 + 1) KB = 228 KB, all of an H100 SM
    assert blocks_per_sm("90", 32, 128, 114 * 1024) == 1
    # the roofline of the example: (128, 64, 56, 56) bf16, D = 7: (2·N·64 + 49·N)·2 bytes, 98·N·64 flops
    r = roofline((128, 64, 56, 56), 7, 2)
    n = 128 * 56 * 56
    assert r["bytes"] == (2 * n * 64 + 49 * n) * 2
    assert r["flops"] == 98 * n * 64
    assert r["cards"]["H100"]["memory_us"] == pytest.approx(r["bytes"] / 3350e9 * 1e6)
    text = show(rep)
    assert "0 of 32 kernel builds over the budget" in text
    assert "roofline bf16 forward" in text


def test_kernel_buffers_in_place_or_one_padded_copy():
    """The CUDA path's layout rule, checked on CPU tensors (it reads metadata only): channels_last with whole
    16-byte vectors of channels is read in place; NCHW, a channel slice, an odd C and a misaligned view are copied
    once into a zero-padded (B, H, W, Cs) buffer that holds the same values."""
    from hcml.ops import _cuda

    def cl(t):
        return t.contiguous(memory_format=torch.channels_last)

    base = torch.randn(2, 16, 5, 6, dtype=torch.bfloat16)
    cases = {
        "channels_last": (cl(base), False),
        "nchw": (base, True),
        "channel slice": (cl(torch.randn(2, 24, 5, 6, dtype=torch.bfloat16))[:, 4:20], True),
        "odd C": (cl(torch.randn(2, 12, 5, 6, dtype=torch.bfloat16)), True),  # 24 bytes per pixel
        "misaligned": (torch.randn(2 * 16 * 5 * 6 + 1, dtype=torch.bfloat16)[1:].view(2, 5, 6, 16)
                       .permute(0, 3, 1, 2), True),
        "fp32 C=4": (cl(torch.randn(1, 4, 3, 3)), False),
    }
    for name, (t, copied) in cases.items():
        assert _cuda.in_place(t) is (not copied), name
        _cuda.COPIES.clear()
        buf = _cuda.as_buffer(t, "f1")
        assert _cuda.COPIES["f1"] == int(copied), name
        v = 16 // t.element_size()
        B, C, H, W = t.shape
        assert buf.shape == (B, H, W, -(-C // v) * v), name
        assert buf.is_contiguous(), name
        assert buf.data_ptr() % 16 == 0, name
        for b in range(B):  # the same values, pixel by pixel, and zeros in the padding
            for y in range(H):
                for x in range(W):
                    assert torch.equal(buf[b, y, x, :C], t[b, :, y, x]), name
                    assert not buf[b, y, x, C:].any(), name
        if not copied:
            assert buf.data_ptr() == t.data_ptr(), name  # a view, no copy
    assert _cuda.plan(cl(base), base, 6, 2) == {"kernel": "tensor_core", "copies": ["f2"]}
    assert _cuda.plan(cl(base.float()), cl(base.float()), 6, 2) == {"kernel": "fast", "copies": []}
    with _cuda.tensor_cores(False):  # the switch `bench op` times the CUDA-core kernels with
        assert _cuda.plan(cl(base), cl(base), 6, 2)["kernel"] == "fast"
    assert _cuda.plan(cl(base), cl(base), 6, 2)["kernel"] == "tensor_core"
    assert _cuda.plan(cl(base), cl(base), 4, 2) == {"kernel": "generic", "copies": []}


@pytest.mark.parametrize("recipe", ["k400_r2d50_joint", "k400_r21d101_joint"])
def test_every_cost_volume_call_of_the_models_takes_the_tensor_core_path(recipe, monkeypatch):
    """No silent slow path for the models: in bf16 channels_last (how `hcml train` runs them on a GPU), every
    cost-volume call of R2D-50 and R(2+1)D-101 is served by the tensor-core kernels and reads its inputs in place.
    The call's shape comes from the model itself (a meta-device pass, `bench op --sweep`'s hook); its motion block
    then runs on a channels_last_3d bf16 input, as cuDNN's convolutions deliver it on a GPU (CPU convolutions
    return NCDHW, so a whole-model CPU run would not show the GPU's layout). The GPU test repeats this on the
    whole model with the kernels' own counters."""
    import dataclasses

    from hcml.launch.bench.op import model_shapes
    from hcml.launch.config import load_config, resolve_recipe
    from hcml.model import HCML, motion
    from hcml.ops import _cuda

    (m,) = model_shapes((recipe,))
    cfg = load_config(resolve_recipe(recipe))
    model = HCML(dataclasses.replace(cfg.model, num_classes=400)).eval().to(memory_format=torch.channels_last_3d)
    BT, C, H, W = m["shape"]
    T = BT // cfg.data.batch_size  # frames at the motion block (the batch is the recipe's per-GPU batch)
    plans, real = [], motion.cost_volume

    def recording(f1, f2, md, s):
        plans.append(_cuda.plan(f1, f2, md, s))
        return real(f1, f2, md, s)

    class Recorded(Exception):
        pass

    def first_call_only(f1, f2, md, s):  # R(2+1)D-101's bf16 convs after the call take 75 s on a CPU
        plans.append(_cuda.plan(f1, f2, md, s))
        raise Recorded

    whole = recipe == "k400_r2d50_joint"  # one whole block run shows there is one call per block
    monkeypatch.setattr(motion, "cost_volume", recording if whole else first_call_only)
    x = torch.randn(2, C, T, H, W).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), contextlib.suppress(Recorded):
        model.prime(x.to(torch.bfloat16))
    assert len(plans) == 1, plans
    assert plans[0] == {"kernel": "tensor_core", "copies": []}, (recipe, m, plans)


GXX = shutil.which("g++")


@pytest.mark.skipif(GXX is None, reason="g++ not on PATH: cannot build the CUDA emulation")
def test_nhwc_cuda_kernels_run_correctly_in_cpu_emulation(tmp_path):
    """The channels_last CUDA kernels (forward, dL/df1, dL/df2), compiled for the CPU with every CUDA thread a
    host thread and warps taking turns between barriers in both orders (ops/csrc/emulation.h), against a naive
    double loop: fp32/fp16/bf16, vector and scalar loads, tiles cut by the image border, a channel tail, a window
    larger than the image. An index or halo error, or a missing __syncthreads, fails here on any machine, GPU or
    not (the mutation test below deletes each barrier)."""
    from hcml.ops._cuda import CSRC

    run = _run_emulation(CSRC, tmp_path)
    assert run.returncode == 0, run.stdout[-4000:]
    assert "all passed" in run.stdout, run.stdout[-4000:]
    # both warp orders x (cases x (fwd, df1, df2), bank conflicts, cp.async order)
    assert run.stdout.count(" ok\n") == 2 * (11 * 3 + 3 + 3)
    assert "fast " in run.stdout
    assert "generic " in run.stdout
    assert run.stdout.count("tensor  D=7") == 2 * 9  # orders x 3 cases x (forward, dL/df1, dL/df2)
    # the tensor-core kernels' shared-memory layout keeps every ldmatrix phase free of bank conflicts
    assert run.stdout.count("with a bank conflict 0 ok") == 2 * 3
    # and their cp.async pipelines are ordered: no ldmatrix reads a unit while a copy into it is in flight
    assert run.stdout.count("reads racing a copy 0, threads ending with copies in flight 0 ok") == 2 * 3
    assert "-- warps in ascending order" in run.stdout and "-- warps in descending order" in run.stdout


def _run_emulation(csrc, tmp_path, *args):
    """Build ops/csrc/test_nhwc_emulated.cpp from `csrc` with g++ and run it (skips where g++ lacks C++20)."""
    exe = tmp_path / "nhwc_emulated"
    res = subprocess.run([GXX, "-std=c++20", "-O1", "-pthread", "-DHCML_EMULATE", f"-I{csrc}",
                          str(csrc / "test_nhwc_emulated.cpp"), "-o", str(exe)], capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0 and any(h in res.stderr for h in ("barrier", "semaphore", "c++20")):
        pytest.skip(f"this g++ lacks C++20 <barrier>/<semaphore>: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)


def _ordering_lines() -> list[tuple[str, int, str]]:
    """(family, line number, text) of every line that orders the NHWC kernels' shared memory: each __syncthreads()
    of the tiled CUDA-core ("fast") and tensor-core kernels, and the tensor cores' cp.async waits."""
    from hcml.ops._cuda import CSRC

    text = (CSRC / "cost_volume_nhwc.cuh").read_text().split("\n")
    tensor_from = next(i for i, t in enumerate(text) if t.startswith("// ---") and "tensor cores" in t)
    return [("tensor" if i > tensor_from else "fast", i + 1, t.strip()) for i, t in enumerate(text)
            if "__syncthreads();" in t or ("cp_async_wait<" in t and "template" not in t and "emulated" not in t)]


ORDERING = _ordering_lines()


@pytest.mark.skipif(GXX is None, reason="g++ not on PATH: cannot build the CUDA emulation")
@pytest.mark.parametrize("family, line, text", ORDERING, ids=[f"{f}-line{n}" for f, n, _ in ORDERING])
def test_every_barrier_and_copy_wait_of_the_kernels_is_needed_and_its_loss_caught(tmp_path, family, line, text):
    """Mutation check of the emulation's schedule (warps take turns, in both orders) and cp.async race log: delete
    one __syncthreads() or cp.async wait of the tiled kernels and the emulated test must fail, deterministically —
    by wrong values, or by the race log where a racing read still sees the right data (a copy that lands late)."""
    from hcml.ops._cuda import CSRC

    assert len(ORDERING) >= 12, ORDERING  # the kernels' barriers and waits were found
    csrc = tmp_path / "csrc"
    shutil.copytree(CSRC, csrc)
    kernels = csrc / "cost_volume_nhwc.cuh"
    lines = kernels.read_text().split("\n")
    assert lines[line - 1].strip() == text
    del lines[line - 1]
    kernels.write_text("\n".join(lines))
    run = _run_emulation(csrc, tmp_path, family, "stop")
    assert run.returncode != 0, f"deleting line {line} ({text}) went unnoticed:\n{run.stdout[-3000:]}"
    assert "FAIL" in run.stdout, run.stdout[-3000:]


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="needs nvcc's headers and g++")
def test_binding_compiles_against_torch_headers():
    """Syntax-check the torch binding against this torch's headers (CPU torch suffices: no CUDA torch headers)."""
    import os
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    from hcml.ops._cuda import CSRC

    homes = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    cuda_inc = next((os.path.join(h, "include") for h in homes
                     if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h"))), None)
    if cuda_inc is None:
        pytest.skip(f"no CUDA include directory with cuda_runtime.h among {homes}")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", *[f"-I{p}" for p in include_paths()],
           f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_inc}", "-DTORCH_EXTENSION_NAME=hcml_check",
           str(CSRC / "cost_volume_binding.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


def test_cuda_extension_reports_why_it_is_unavailable():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: the build-error path is not reachable")
    from hcml.errors import CostVolumeBuildError
    from hcml.ops._cuda import extension

    extension.cache_clear()
    with pytest.raises(CostVolumeBuildError, match="no CUDA support"):
        extension()


# ---------------------------------------------------------------- CUDA (run on a lent GPU)
def _layout_cases(B, C, H, W, dtype):
    """The same values in every storage the op may be handed: NCHW, channels_last, a channel slice, a view 2 bytes
    off a 16-byte boundary. Returns {name: (tensor on the GPU, copy expected)}."""
    cl = torch.channels_last
    base = torch.randn(B, C, H, W).to(dtype)
    wide = torch.cat([torch.randn(B, 8, H, W).to(dtype), base, torch.randn(B, 8, H, W).to(dtype)], 1)
    flat = torch.empty(B * C * H * W + 8, dtype=dtype, device="cuda")
    off = flat[1:1 + B * C * H * W].view(B, H, W, C).permute(0, 3, 1, 2)
    off.copy_(base)
    vec = C * base.element_size() % 16 == 0
    return {"nchw": (base.cuda(), True), "channels_last": (base.cuda().contiguous(memory_format=cl), not vec),
            "channel slice": (wide.cuda().contiguous(memory_format=cl)[:, 8:8 + C], True),
            "misaligned": (off, True)}


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(2, 16, 13, 17, 6, 2), (1, 64, 56, 56, 6, 2), (3, 5, 9, 8, 3, 1), (1, 8, 7, 7, 8, 2),
                                   (2, 24, 37, 30, 6, 2)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel slice", "misaligned"])
def test_cuda_matches_cpu(dtype, tol, shape, layout):
    """Both CUDA kernel families, every layout, against the CPU op; the dispatch counters say which kernel ran and
    whether the input was copied (the compile-time kernel for d = 6, s = 2; a copy only where the layout needs it)."""
    from hcml.ops import _cuda

    B, C, H, W, md, s = shape
    a, copied = _layout_cases(B, C, H, W, dtype)[layout]
    b, _ = _layout_cases(B, C, H, W, dtype)[layout]
    g = torch.randn(B, num_displacements(md, s) ** 2, H, W).to(dtype)
    a, b = a.requires_grad_(), b.requires_grad_()
    c1, c2 = (t.detach().cpu().contiguous().requires_grad_() for t in (a, b))
    _cuda.reset_dispatch_counts()
    out_gpu = cost_volume(a, b, md, s)
    out_cpu = cost_volume(c1, c2, md, s)
    torch.testing.assert_close(out_gpu.cpu().float(), out_cpu.float(), atol=tol, rtol=tol)
    out_gpu.backward(g.cuda())
    out_cpu.backward(g)
    torch.testing.assert_close(a.grad.cpu().float(), c1.grad.float(), atol=tol * 4, rtol=tol * 4)
    torch.testing.assert_close(b.grad.cpu().float(), c2.grad.float(), atol=tol * 4, rtol=tol * 4)
    counts = _cuda.dispatch_counts()
    kind = _cuda.kernel_for(md, s, dtype, torch.device("cuda"))
    assert kind == ("generic" if (md, s) != (6, 2) else "fast" if dtype == torch.float32 else "tensor_core")
    assert counts[f"forward_{kind}"] == 1
    assert counts[f"backward_{kind}"] == 1
    assert counts.get("copied_f1", 0) == (2 if copied else 0)  # forward and backward each prepare f1 once


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["r2d50", "r2plus1d101"])
def test_cuda_model_step_takes_the_tensor_core_path(arch):
    """A bf16 channels_last training step of the real model on the GPU: every cost-volume call, forward and
    backward, is served by the tensor-core kernels with its inputs read in place (no copy, no other kernel)."""
    from hcml.model import build_model
    from hcml.ops import _cuda

    model = build_model(arch, 400).cuda().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 3, 8, 112, 112, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    _cuda.reset_dispatch_counts()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    loss = sum(v.float().sum() for v in out.values())
    loss.backward()
    counts = _cuda.dispatch_counts()
    assert counts["forward_tensor_core"] >= 1
    assert counts["backward_tensor_core"] == counts["forward_tensor_core"]
    assert counts["forward_fast"] == counts["backward_fast"] == 0
    assert counts["forward_generic"] == counts["backward_generic"] == 0
    assert not any(k.startswith("copied_") for k in counts), counts


@requires_cuda
@pytest.mark.gpu
def test_cuda_gradcheck_and_opcheck():
    f1 = torch.randn(1, 3, 6, 7, dtype=torch.float64, device="cuda")
    f2 = torch.randn(1, 3, 6, 7, dtype=torch.float64, device="cuda")
    # float64 is not a kernel dtype: check fp32 grads against the float64 CPU path instead
    a, b = f1.float().requires_grad_(), f2.float().requires_grad_()
    ga = torch.autograd.grad(cost_volume(a, b, 4, 2).sum(), (a, b))
    c, d = f1.cpu().requires_grad_(), f2.cpu().requires_grad_()
    gc = torch.autograd.grad(cost_volume(c, d, 4, 2).sum(), (c, d))
    for x, y in zip(ga, gc):
        torch.testing.assert_close(x.cpu().double(), y, atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.hcml.cost_volume.default,
                          (f1.float().requires_grad_(), f2.float().requires_grad_(), 4, 2))


@requires_cuda
@pytest.mark.gpu
def test_cuda_compile_bf16_channels_last():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).cuda().to(memory_format=torch.channels_last)

    def f(a, b):
        return cost_volume(conv(a), conv(b)).float().sum()

    a = torch.randn(2, 8, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    b = torch.randn(2, 8, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(f)(a, b)
        assert explanation.graph_break_count == 0
        loss = torch.compile(f, fullgraph=True)(a, b)
    loss.backward()


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 16, 13, 17), (1, 64, 56, 56), (2, 24, 37, 30), (1, 256, 14, 14)])
def test_tensor_core_and_cuda_core_kernels_agree(dtype, shape):
    """The two compile-time families on the same 16-bit channels_last inputs (d = 6, s = 2): same volume and grads
    within the output's rounding, and the counters show each family served its own calls."""
    from hcml.ops import _cuda

    cl = torch.channels_last
    a = torch.randn(*shape, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    b = torch.randn(*shape, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    g = torch.randn(shape[0], 49, *shape[2:], device="cuda", dtype=dtype).contiguous(memory_format=cl)
    got = {}
    for tc in (True, False):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        _cuda.reset_dispatch_counts()
        with _cuda.tensor_cores(tc):
            out = cost_volume(x, y, 6, 2)
            out.backward(g)
        kind = "tensor_core" if tc else "fast"
        counts = _cuda.dispatch_counts()
        assert counts[f"forward_{kind}"] == counts[f"backward_{kind}"] == 1, counts
        got[tc] = [t.float() for t in (out, x.grad, y.grad)]
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for t, c in zip(got[True], got[False]):
        torch.testing.assert_close(t, c, atol=tol * 4, rtol=tol * 4)
