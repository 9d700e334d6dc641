#!/usr/bin/env bash
# Run benchmarks/gpu_bench.py on a lent GPU machine (the `device` tool), from the repo root.
#
#   bash benchmarks/device/run.sh stash              # call 1: keep the carried wheels in /tmp
#   bash benchmarks/device/run.sh single [ARGS...]   # call 2: install, then gpu_bench.py single
#   bash benchmarks/device/run.sh tp [ARGS...]       #         install, then gpu_bench.py tp
#   bash benchmarks/device/run.sh interleave [ARGS...] #       long prompts among decoders
#   bash benchmarks/device/run.sh structured [ARGS...] #       structured_bench.py (a JSON schema vs none;
#                                                      #   needs llguidance's wheel in /tmp/mjc-wheels too)
#   bash benchmarks/device/run.sh layout [ARGS...]   #         benchmarks/layout_bench.py (e.g. --backend nccl)
#   bash benchmarks/device/run.sh soak [ARGS...]     #         benchmarks/cluster_soak.py (ARGS -- soak.py's)
#   bash benchmarks/device/run.sh py SCRIPT [ARGS...] #        any script, e.g. benchmarks/request_rss.py --forward
#
# The device image has no internet and lacks mlx, mlx-lm, fastapi, uvicorn, pydantic...
# Wheels travel in git-ignored folders named in `carry` (64 MiB a call):
#   .dev/whl  every small wheel (mlx, mlx-lm, fastapi, starlette, uvicorn, pydantic*, py-spy)
#   .dev/a    first half of mlx_cuda_13-0.32.4 (split -b 46M), carried with the first call
#   .dev/b    second half, carried with the second call (within 30 s: /tmp survives while
#             the machine stays warm)
#   .dev/v-*    optional: other mlx_jaccl_cluster trees (gpu_bench.py --variant NAME=DIR)
# Results go to $OUT (gpu-bench-MODE.json, py-spy stacks, bench.log).
#   (MJC_DEV=DIR reads these folders from DIR instead of .dev)
set -uo pipefail
DEV=${MJC_DEV:-.dev}
STORE=/tmp/mjc-wheels
SITE=/tmp/mjc-site
CUDA_WHEEL=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
CUDA_SHA256=94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee
OUT=${OUT:-/tmp/mjc-out}
mkdir -p "$STORE" "$OUT"
for d in "$DEV/whl" "$DEV/a" "$DEV/b"; do
  [ -d "$d" ] && cp "$d"/* "$STORE"/
done
echo "stored: $(ls "$STORE" | tr '\n' ' ')"
stage=${1:?stage: stash, single, tp, interleave, structured, layout, soak or py}
shift
[ "$stage" = stash ] && exit 0

if [ ! -f "$STORE/$CUDA_WHEEL" ]; then
  [ -f "$STORE/part.aa" ] && [ -f "$STORE/part.ab" ] || { echo "missing a half of $CUDA_WHEEL (machine went cold?)"; exit 3; }
  cat "$STORE/part.aa" "$STORE/part.ab" > "$STORE/$CUDA_WHEEL"
  echo "$CUDA_SHA256  $STORE/$CUDA_WHEEL" | sha256sum -c - || { rm -f "$STORE/$CUDA_WHEEL"; exit 3; }
fi
# install the wheels not installed yet (a later call may bring more)
mkdir -p "$SITE"
new=()
for w in "$STORE"/*.whl; do grep -qxF "$(basename "$w")" "$SITE/.installed" 2>/dev/null || new+=("$w"); done
if [ ${#new[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${new[@]}" || exit 3
  for w in "${new[@]}"; do basename "$w" >> "$SITE/.installed"; done
fi
export PYTHONPATH="$SITE:$PWD/runtime" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
# NVLink multicast stays off (the machine's rule); keep it so in every child process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu --format=csv,noheader
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" || exit 4
# MJC_BENCH_LIMIT=S: SIGTERM after S seconds (gpu_bench.py then stops its systems and still
# writes what it measured), so that a run near the call's limit returns its figures.
limit=()
[ -n "${MJC_BENCH_LIMIT:-}" ] && limit=(timeout -s TERM -k 30 "$MJC_BENCH_LIMIT")
bench=(benchmarks/gpu_bench.py "$stage")
out="$OUT/gpu-bench-$stage.json"
[ "$stage" = structured ] && bench=(benchmarks/structured_bench.py)
# layout: benchmarks/layout_bench.py, the layouts through our API (pipeline vs tensor)
[ "$stage" = layout ] && bench=(benchmarks/layout_bench.py) && out="$OUT/layout-bench.json"
# soak: benchmarks/cluster_soak.py, soak.py against ranks it starts (ARGS: its own, -- soak.py's)
[ "$stage" = soak ] && bench=(benchmarks/cluster_soak.py) && out="$OUT/soak.json"
if [ "$stage" = py ]; then
  : "${1:?py SCRIPT [ARGS...]}"
  "${limit[@]}" python3 "$@" 2>&1 | tee "$OUT/bench-py.log"
  exit "${PIPESTATUS[0]}"
fi
"${limit[@]}" python3 "${bench[@]}" --out "$out" "$@" 2> >(tee "$OUT/bench-$stage.log" >&2)
