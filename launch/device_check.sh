#!/usr/bin/env bash
# One prepared GPU check (< 8 min on an H100/H200): install what the image lacks, build the CUDA op, run the GPU
# test subset and the benchmarks, and write report.json + report.md under $OUT (default: ./device_report).
#
# The device image has torch+CUDA, triton, nvcc but no DALI: carry the wheel in .whl/ (see docs/PERFORMANCE.md;
# a wheel over one call's 64 MiB carry is split into .whl/parts/* and joined here).
set -uo pipefail
OUT=${OUT:-device_report}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HCML_EXT_DIR=/tmp/hcml_ext
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step "install carried wheels (DALI, ...) and the project"
# Parts of wheels over one call's carry arrive over several calls, each copied to $PARTS (see device_carry.sh).
PARTS=${PARTS:-/tmp/parts}
mkdir -p "$PARTS" && cp -n .whl/parts/* "$PARTS"/ 2>/dev/null || true
for base in $(ls "$PARTS" 2>/dev/null | sed 's/\.part[0-9]*$//' | sort -u); do
  cat "$PARTS/$base".part* > .whl/"$base" && echo "joined $base ($(ls "$PARTS/$base".part* | wc -l) parts)"
done
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "installing hcml failed"; exit 1; }
python3 -m pip install -q pyyaml prometheus-client tqdm av 2>/dev/null \
  || echo "no package index here: carry pyyaml/prometheus-client/tqdm/av wheels in .whl/ too"
python3 -c "import hcml, nvidia.dali; print('dali', nvidia.dali.__version__)" || echo "DALI missing: DALI GPU tests will skip"

step "build the CUDA cost-volume op (JIT, cached)"
python3 -c "from hcml.ops._cuda import extension; extension(); print('built')"

step "spatial-correlation-sampler (source archive, built against the image torch)"
if ls .whl/spatial_correlation_sampler-*.tar.gz >/dev/null 2>&1; then
  timeout 240 python3 -m pip install -q --no-build-isolation --no-deps .whl/spatial_correlation_sampler-*.tar.gz \
    || echo "spatial-correlation-sampler did not build: bench op compares against the reference only"
fi

step "GPU tests (op numerics fwd/bwd fp32/fp16/bf16, channels_last, opcheck, compile; DALI GPU pipeline)"
timeout 240 python3 -m pytest -q -m gpu tests/ --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider; tests_rc=$?

step "2-process SyncBN + compile + bf16 training on synthetic H.264 clips (NCCL)"
hcml synth --out /tmp/h264 --codec h264 --size 320 --frames 48 --per-class 16 --val-per-class 2 >/dev/null
timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m hcml.launch.cli train \
  --config configs/k400_r2d50_joint.yaml --data /tmp/h264 --run-dir "$OUT/train_run" train.max_steps=30 \
  train.bn=global data.device=gpu data.batch_size=8 data.eval_clips=1 data.eval_crops=1 train.progress=false \
  metrics.port=0 optim.epochs=2 optim.warmup_epochs=1 || echo "2-process training FAILED"

step "benchmarks"
timeout 90 hcml bench op --dtype bf16 --json > "$OUT/bench_op_bf16.json"
timeout 60 hcml bench op --dtype fp32 --json > "$OUT/bench_op_fp32.json"
timeout 150 hcml bench model --arch r2d50 --frames 16 --compile --dtype bf16 --channels-last --compare --json \
  > "$OUT/bench_model.json"
timeout 60 hcml bench pipeline --data /tmp/h264 --config configs/k400_r2d50_joint.yaml --device gpu --threads 4 \
  --json > "$OUT/bench_pipeline.json"
timeout 90 hcml bench train --data /tmp/h264 --config configs/k400_r2d50_joint.yaml --steps 20 --json \
  data.device=gpu > "$OUT/bench_train.json"

step "report"
python3 - "$OUT" "$tests_rc" <<'PY'
import json, sys, datetime, pathlib, torch
out, rc = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rep = {"date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name(0),
       "torch": torch.__version__, "cuda": torch.version.cuda, "gpu_tests_rc": rc}
try:
    import nvidia.dali as d; rep["dali"] = d.__version__
except ImportError:
    rep["dali"] = None
for f in sorted(out.glob("bench_*.json")):
    try:
        rep[f.stem] = json.loads(f.read_text())
    except Exception as e:
        rep[f.stem] = {"error": str(e)}
(out / "report.json").write_text(json.dumps(rep, indent=1))
lines = [f"# device check {rep['date']} on {rep['card']} (torch {rep['torch']}, CUDA {rep['cuda']}, DALI {rep['dali']})",
         f"GPU tests exit code: {rc}"]
for k in ("bench_op_bf16", "bench_op_fp32"):
    b = rep.get(k, {})
    for name, r in b.get("impls", {}).items():
        if "forward" in r:
            lines.append(f"- {k} {name}: fwd {r['forward']['median_s']*1e3:.2f} ms ({r['forward_GBps']:.0f} GB/s), "
                         f"fwd+bwd {r['forward_backward']['median_s']*1e3:.2f} ms")
    for s, v in b.items():
        if s.startswith("speedup"):
            lines.append(f"- {k} {s}: {v:.2f}x")
m = rep.get("bench_model", {})
for r in m.get("runs", []):
    lines.append(f"- model {m['arch']} compile={r['compile']} {r['dtype']} cl={r['channels_last']}: {r['clips_per_s']:.1f} clips/s")
if "speedup_vs_eager_fp32" in m:
    lines.append(f"- compiled bf16 channels_last vs eager fp32: {m['speedup_vs_eager_fp32']:.2f}x")
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "done in $(( $(date +%s) - start ))s"
