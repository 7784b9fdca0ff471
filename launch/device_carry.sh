#!/usr/bin/env bash
# Prepare, on the development machine, what the GPU check needs but the device image lacks (see
# launch/device_check.sh and docs/PERFORMANCE.md): x86-64 / CPython 3.12 wheels in .whl/ (git-ignored), with
# any wheel over the 60 MiB per-call carry limit split into .whl/parts/<wheel>.partNN.
#
#   bash launch/device_carry.sh            # then: carry .whl in each device `run`; the check joins the parts
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DALI=${DALI:-nvidia-dali-cuda120==2.4.0}
mkdir -p .whl/parts
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl "$DALI" pyyaml prometheus-client tqdm av
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl spatial-correlation-sampler==0.5.0 || true
limit=$((60 * 1024 * 1024))
for f in .whl/*.whl; do
  if [ "$(stat -c %s "$f")" -gt "$limit" ]; then
    split -b "$limit" -d -a 2 "$f" ".whl/parts/$(basename "$f").part"
    rm "$f"
  fi
done
du -sh .whl .whl/parts; ls .whl/parts | sed 's/^/  part: /'
echo "carry .whl in the device runs: parts over several consecutive calls (copy each into /tmp/parts there),"
echo "then run launch/device_check.sh with .whl/parts holding all parts (it joins them)."
