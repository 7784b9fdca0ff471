#!/usr/bin/env bash
# The GPU check, sized for one device lease (15 min in all, 600 s per call): one call of this script, <= 540 s.
#
#   run      carry [".device_payload"]   bash launch/device_check.sh run
#
# Stages run in order of value, each under its own time limit and only while the budget allows it:
#   1 op build (JIT, only the device's arch; training needs it; spatial-correlation-sampler built beside it from a
#     source copy in .device_payload/scs when carried, else reported "not compared")
#   2 input and end to end, which need DALI from .dali_payload (two more calls, see
#     ../shared/tools/dali_device_payload.sh and `stage` below; without it they are reported as skipped): pipeline
#     compare with NVDEC utilisation (nvidia-smi dmon), a short training run (SyncBN with as many processes as
#     GPUs), predict on H.264 through NVDEC, export for CUDA in bf16
#   3 op correctness (GPU tests: every
#     kernel family x dtype x layout against the CPU op, tensor vs CUDA cores, dispatch counters, the models'
#     steps on the tensor-core path)
#   4 op timing (bench op: N calls per event pair, warm and L2-flushed, tensor- and CUDA-core kernels, % of each
#     one's roofline; the models' shapes)   5 model compare + profile (bench model --compare --profile)
# HCML_CHECK_ONLY=op stops after the op stages; HCML_CHECK_NCU=1 adds an Nsight Compute pass over the op's two
# tensor-core kernels that serve bf16 ($OUT/ncu_op.txt). $OUT/report.json is rewritten after every stage and on exit (also when killed), so a call cut short still says
# what ran. Make the payload here first:
#   bash launch/device_check.sh payload PATH/TO/Pytorch-Correlation-extension   # copies its source (~100 KB)
# Optional DALI staging (each a separate call carrying one part; /tmp survives while the machine is warm):
#   bash launch/device_check.sh stage .dali_payload/p1 ; ... stage .dali_payload/p2
set -uo pipefail
mode=${1:-run}
BUDGET_S=${HCML_CHECK_BUDGET_S:-540}
PARTS=${HCML_PARTS:-/tmp/parts}
SITE=/tmp/site

case "$mode" in
  payload)
    src=${2:?usage: device_check.sh payload PATH/TO/Pytorch-Correlation-extension}
    rm -rf .device_payload/scs && mkdir -p .device_payload/scs
    if [ -d "$src/.git" ] || git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
      git -C "$src" archive HEAD | tar x -C .device_payload/scs
    else
      cp -r "$src"/. .device_payload/scs/
    fi
    du -sh .device_payload
    exit 0 ;;
  stage)
    mkdir -p "$PARTS" && cp "${2:?usage: device_check.sh stage DIR}"/* "$PARTS"/ && ls -la "$PARTS"
    exit 0 ;;
  run) ;;
  *) echo "usage: device_check.sh run | payload SRC | stage DIR" >&2; exit 2 ;;
esac

OUT=${OUT:-device_report}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1 HCML_EXT_DIR=/tmp/hcml_ext MAX_JOBS=16 PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

report() {  # report.json from the stage log and every bench_*.json written so far
  python3 - "$OUT" <<'PY'
import datetime, json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rep = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
try:
    import torch
    rep.update(card=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda)
except Exception as e:
    rep["card"] = f"unknown ({e})"
try:
    import nvidia.dali as d
    rep["dali"] = d.__version__
except ImportError:
    rep["dali"] = None
stages = out / "stages.jsonl"
rep["stages"] = [json.loads(l) for l in stages.read_text().splitlines()] if stages.exists() else []
for f in sorted(out.glob("bench_*.json")):
    try:
        rep[f.stem] = json.loads(f.read_text())
    except Exception as e:
        rep[f.stem] = {"error": f"{type(e).__name__}: {e}"}
(out / "report.json").write_text(json.dumps(rep, indent=1))
PY
}
trap report EXIT

# stage NAME SECONDS CMD...: run CMD under a time limit if the budget still has SECONDS left; log the outcome.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - $(elapsed) ))
  echo; echo "=== [$(elapsed)s] $name (limit ${limit}s, ${left}s of budget left)"
  if [ "$left" -lt 20 ]; then
    printf '{"stage": "%s", "status": "skipped", "why": "budget spent"}\n' "$name" >> "$OUT/stages.jsonl"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@"; local rc=$?
  local status=ok; [ $rc -ne 0 ] && status=failed; [ $rc -eq 124 ] && status=timeout
  printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %d}\n' "$name" "$status" "$rc" \
    $(( $(date +%s) - t0 )) >> "$OUT/stages.jsonl"
  report
}
skip() { printf '{"stage": "%s", "status": "skipped", "why": "%s"}\n' "$1" "$2" >> "$OUT/stages.jsonl"; }

echo "=== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
ARCH=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
export TORCH_CUDA_ARCH_LIST=$ARCH
echo "GPUs: $NGPU, compute capability $ARCH"
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "installing hcml failed"; exit 1; }
if ls "$PARTS"/dali.tar.xz.part* >/dev/null 2>&1; then
  mkdir -p "$SITE" && cat "$PARTS"/dali.tar.xz.part* | xz -dc | tar x -C "$SITE" && echo "DALI unpacked into $SITE"
fi
[ -d .dali_payload/whl ] && python3 -m pip install -q --no-index --no-deps --target "$SITE" .dali_payload/whl/*.whl

build_scs() {
  if [ ! -f .device_payload/scs/setup.py ]; then echo "spatial-correlation-sampler: no source carried"; return 3; fi
  GPU_ARCH=${ARCH/./} python3 -m pip install -q --no-deps --no-build-isolation --target "$SITE" .device_payload/scs
}
build_op() { python3 -c "from hcml.ops._cuda import extension; extension(); print('op built')"; }
build_both() {
  build_scs > "$OUT/scs_build.log" 2>&1 & local scs=$!
  build_op; local rc=$?
  wait $scs && echo "spatial-correlation-sampler built" || echo "spatial-correlation-sampler: not compared (see scs_build.log)"
  return $rc
}
export -f build_scs build_op build_both
export ARCH OUT SITE
stage "op build" 240 bash -c build_both

# Input and end to end first (never measured in their current form), then what serves a trained model, then the op.
if [ "${HCML_CHECK_ONLY:-}" = op ]; then
  echo "HCML_CHECK_ONLY=op: no input, training, predict or export stages"
elif python3 -c "import nvidia.dali" 2>/dev/null; then
  stage "synthetic H.264 set" 90 hcml synth --out /tmp/h264 --codec h264 --size 320 --frames 48 --per-class 20 \
    --val-per-class 2 --workers 16
  # NVDEC utilisation beside the loaders' clips/s (the dec column of `nvidia-smi dmon -s u`)
  (nvidia-smi dmon -s u -d 1 > "$OUT/nvdec_dmon.txt" 2>&1 &) ; sleep 0.2
  stage "pipeline compare" 90 sh -c "hcml bench pipeline --data /tmp/h264 --config k400_r2d50_joint --device gpu --threads 16 --compare --batches 30 --json > $OUT/bench_pipeline.json"
  pkill -f "nvidia-smi dmon" || true
  stage "train (SyncBN, $NGPU process(es))" 120 hcml train --nproc-per-node "$NGPU" --config k400_r2d50_joint \
    --data /tmp/h264 --run-dir /tmp/train_run train.max_steps=20 train.bn=global data.device=gpu \
    data.eval_clips=1 data.eval_crops=1 train.progress=false optim.epochs=2 optim.warmup_epochs=1
  cp /tmp/train_run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null || true  # step time, GPU memory per record
  ck=$(ls /tmp/train_run/checkpoints/ckpt_*.pt 2>/dev/null | tail -1)
  if [ -n "$ck" ]; then
    stage "predict (H.264 on NVDEC)" 45 sh -c "hcml predict --checkpoint $ck --dir /tmp/h264/val --views 2x3 \
      --out $OUT/predict.jsonl > $OUT/predict.txt"
    stage "export (cuda, bf16)" 60 sh -c "hcml export --checkpoint $ck --out /tmp/model_cuda.pt2 --device cuda \
      --dtype bfloat16 --dynamic-batch > $OUT/export.txt"
  else
    skip "predict" "no checkpoint from the train stage"
    skip "export" "no checkpoint from the train stage"
  fi
else
  skip "pipeline compare" "DALI not installed on the device (payload not carried)"
  skip "train" "DALI not installed on the device (payload not carried)"
fi

stage "op correctness" 150 python3 -m pytest -q -m gpu tests/test_cost_volume.py -p no:cacheprovider \
  --junitxml="$OUT/op_tests.xml"

stage "op timing bf16 channels_last" 60 sh -c "hcml bench op --dtype bf16 --channels-last --iters 10 --json > $OUT/bench_op_bf16_cl.json"
stage "op timing models' shapes" 45 sh -c "hcml bench op --sweep --dtype bf16 --channels-last --iters 10 --json > $OUT/bench_op_sweep.json"
stage "op timing fp32 channels_last" 45 sh -c "hcml bench op --dtype fp32 --channels-last --iters 10 --json > $OUT/bench_op_fp32_cl.json"
stage "op timing bf16 NCHW (copy path)" 45 sh -c "hcml bench op --dtype bf16 --iters 10 --json > $OUT/bench_op_bf16_nchw.json"

if [ -n "${HCML_CHECK_NCU:-}" ] && command -v ncu >/dev/null; then  # where the op's time goes, per kernel
  cat > /tmp/cv_once.py <<'PY'
import torch
from hcml.ops import cost_volume
cl = torch.channels_last
a, b = (torch.randn(128, 64, 56, 56, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
        .requires_grad_() for _ in range(2))
cost_volume(a, b).backward(torch.randn(128, 49, 56, 56, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl))
torch.cuda.synchronize()
PY
  stage "op profile (ncu)" 90 sh -c "ncu --kernel-name regex:_tc --launch-count 2 --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
    python3 /tmp/cv_once.py > $OUT/ncu_op.txt 2>&1"
fi
if [ "${HCML_CHECK_ONLY:-}" = op ]; then echo "HCML_CHECK_ONLY=op: the op stages only"; exit 0; fi

stage "model compare + profile" 240 sh -c "hcml bench model --arch r2d50 --frames 16 --compare --profile --iters 8 --json > $OUT/bench_model.json"

echo "done in $(elapsed)s"
