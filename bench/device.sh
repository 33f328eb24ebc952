#!/usr/bin/env bash
# The accelerator check: parity of SAM's logits on the device, JAX vs PyTorch timings in
# bf16 and the ViT-B 1024 memory cases, in one call that ends well inside 8 minutes on one
# GPU. Writes its JSON under OUT and prints the summary (OUT/device.json) last.
#
#   bench/device.sh OUT [--device gpu|cpu] [--smoke]
#
# --smoke: the tiny variant everywhere (~3 minutes on 2 CPU cores, mostly compiling; what
# `make test-slow` runs on CPU, tests/test_bench.py).
# The lent GPU machines' image has jax (CUDA), flax, optax, orbax and torch but not every
# pure-Python package this project imports; carry those as wheels in .whl/ (see
# /work/.library/device/README.md), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#     ml_collections==1.1.0 segment-anything==1.0 grain==<version> ...
# and they are installed into a scratch folder before anything runs.
set -euo pipefail

out=${1:?usage: bench/device.sh OUT [--device gpu|cpu] [--smoke]}
shift
device=gpu
smoke=0
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --smoke) smoke=1; shift ;;
    *) echo "bench/device.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fedfms_site .whl/*.whl
  export PYTHONPATH=/tmp/fedfms_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
[ "$device" = cpu ] && export JAX_PLATFORMS=cpu
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/fedfms_jax_cache}

if [ $smoke = 1 ]; then
  variant=tiny plan=--smoke dtype=f32 modes=fedmsa batches="1"
else
  variant=vit_b plan=--quick dtype=bf16 modes="fedmsa fedsam" batches="1 2"
fi
[ "$device" = gpu ] || dtype=f32  # bf16 on XLA's CPU backend measures its emulation

echo "== parity ($variant, $device)"
"$py" -m bench.parity --variant "$variant" --device "$device" > "$out/parity.json" \
  || echo "parity failed (see $out/parity.json)"
cat "$out/parity.json"

echo "== bench.run $plan --device $device --dtype $dtype"
"$py" -m bench.run $plan --device "$device" --dtype "$dtype" --no-memory \
  --out "$out/bench.json" > "$out/bench.log" 2>&1 || echo "bench.run failed (see bench.log)"
tail -n 25 "$out/bench.log"

echo "== memory: $variant $modes rounds, K=2, batch $batches"
: > "$out/memory.jsonl"
for mode in $modes; do
  for batch in $batches; do
    for framework in jax torch; do
      "$py" -m bench.memory --framework $framework --clients 2 --variant "$variant" \
        --mode $mode --steps 1 --batch "$batch" --device "$device" --dtype f32 \
        >> "$out/memory.jsonl" 2>> "$out/memory.err" \
        || echo "{\"framework\": \"$framework\", \"mode\": \"$mode\", \"batch\": $batch, \"error\": \"exit $?\"}" >> "$out/memory.jsonl"
    done
  done
done
cat "$out/memory.jsonl"

"$py" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def last_json(path):
    lines = [l for l in path.read_text().splitlines() if l.startswith("{")] if path.exists() else []
    return json.loads(lines[-1]) if lines else None
bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else None
summary = {"parity": last_json(out / "parity.json"),
           "bench": bench and bench.get("summary"),
           "memory": [json.loads(l) for l in (out / "memory.jsonl").read_text().splitlines() if l]}
(out / "device.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
PY
