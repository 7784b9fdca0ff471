#!/usr/bin/env bash
# The GPU check, sized for one device lease (15 min, 64 MiB carried per call): three calls of one prepared script.
#
# Here, first (once; ~10 min on 2 cores; needs PyPI):
#   bash ../shared/tools/dali_device_payload.sh .dali_payload   # DALI 2.4 (CUDA 13) in two ~61 MiB parts + wheels
#   rm -f .dali_payload/whl/imageio_ffmpeg-*                     # not needed any more (PyAV encodes)
# On the device (the `run` tool; each call carries the project plus one folder):
#   call 1  carry [".dali_payload/p1"]   bash launch/device_check.sh stage .dali_payload/p1
#   call 2  carry [".dali_payload/p2"]   bash launch/device_check.sh stage .dali_payload/p2
#   call 3  carry [".dali_payload/whl"]  bash launch/device_check.sh run .dali_payload/whl     (~9 min)
# Files under /tmp survive between calls while the machine is warm (~30 s idle), so run the calls back to back.
# `run` installs DALI and the wheels into /tmp/site, builds the CUDA op, runs the GPU tests, makes an H.264
# synthetic set on the device's own cores (PyAV), runs every benchmark and a 2-process SyncBN training, and
# writes $OUT/report.json + report.md (the figures docs/PERFORMANCE.md quotes). Each step has a time limit and
# the script goes on after a failure, so one broken step never costs the whole lease.
set -uo pipefail
mode=${1:-run}
payload=${2:-}
PARTS=${HCML_PARTS:-/tmp/parts}
SITE=/tmp/site

if [ "$mode" = stage ]; then
  mkdir -p "$PARTS" && cp "$payload"/* "$PARTS"/ && ls -la "$PARTS"
  exit 0
fi

OUT=${OUT:-device_report}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1 HCML_EXT_DIR=/tmp/hcml_ext MAX_JOBS=16
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step "install DALI (joined payload parts), the carried wheels and the project"
mkdir -p "$SITE"
if ls "$PARTS"/dali.tar.xz.part* >/dev/null 2>&1; then
  cat "$PARTS"/dali.tar.xz.part* | xz -dc | tar x -C "$SITE" && echo "DALI unpacked into $SITE"
fi
if [ -n "$payload" ] && ls "$payload"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" "$payload"/*.whl
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "installing hcml failed"; exit 1; }
python3 -c "import nvidia.dali as d, av; print('dali', d.__version__, 'av', av.__version__)" \
  || echo "DALI or PyAV missing: the DALI GPU tests and pipeline benchmarks will skip or fail"

step "build the CUDA cost-volume op (JIT, cached in $HCML_EXT_DIR)"
timeout 300 python3 -c "from hcml.ops._cuda import extension; extension(); print('built')"

step "GPU tests (op numerics fwd/bwd x dtypes x layouts, opcheck, compile; DALI GPU pipeline)"
timeout 240 python3 -m pytest -q -m gpu tests/ --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider; tests_rc=$?

step "benchmarks: cost volume"
timeout 60 hcml bench op --dtype bf16 --channels-last --json > "$OUT/bench_op_bf16_cl.json"
timeout 60 hcml bench op --dtype bf16 --json > "$OUT/bench_op_bf16.json"
timeout 60 hcml bench op --dtype fp32 --channels-last --json > "$OUT/bench_op_fp32_cl.json"
timeout 60 hcml bench op --sweep --dtype bf16 --channels-last --json > "$OUT/bench_op_sweep.json"

step "benchmarks: model (eager fp32 / eager bf16 CL / compiled bf16 CL / backbone alone, top kernels)"
timeout 300 hcml bench model --arch r2d50 --frames 16 --compare --profile --json > "$OUT/bench_model.json"

step "synthetic H.264 set on the device (PyAV, 16 cores): 320 px, 48 frames"
timeout 150 hcml synth --out /tmp/h264 --codec h264 --size 320 --frames 48 --per-class 30 --val-per-class 2 \
  --workers 16 >/dev/null

step "benchmarks: input pipeline (DALI candidates vs PyAV, 16 cores) and the training step"
timeout 150 hcml bench pipeline --data /tmp/h264 --config k400_r2d50_joint --device gpu --threads 16 --compare \
  --batches 40 --json > "$OUT/bench_pipeline.json"
timeout 120 hcml bench train --data /tmp/h264 --config k400_r2d50_joint --steps 30 --json data.device=gpu \
  > "$OUT/bench_train.json"

step "2-process SyncBN + compile + bf16 training on the H.264 set (NCCL)"
timeout 150 hcml train --nproc-per-node 2 --config k400_r2d50_joint --data /tmp/h264 --run-dir "$OUT/train_run" \
  train.max_steps=30 train.bn=global data.device=gpu data.eval_clips=1 data.eval_crops=1 train.progress=false \
  optim.epochs=2 optim.warmup_epochs=1 || echo "2-process training FAILED"

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
        rep[f.stem] = {"error": f"{type(e).__name__}: {e}"}
(out / "report.json").write_text(json.dumps(rep, indent=1))
from hcml.launch.bench import model, op, pipeline, train
lines = [f"# device check {rep['date']} on {rep['card']} (torch {rep['torch']}, CUDA {rep['cuda']}, DALI {rep['dali']})",
         f"GPU tests exit code: {rc}"]
for key, mod in (("bench_op_bf16_cl", op), ("bench_op_bf16", op), ("bench_op_fp32_cl", op), ("bench_op_sweep", op),
                 ("bench_model", model), ("bench_pipeline", pipeline), ("bench_train", train)):
    if key in rep and "error" not in rep[key]:
        lines += ["", f"## {key}", "```", mod.show(rep[key]), "```"]
    elif key in rep:
        lines += ["", f"## {key}: {rep[key]['error']}"]
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "done in $(( $(date +%s) - start ))s"
