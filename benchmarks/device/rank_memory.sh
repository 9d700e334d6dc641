#!/usr/bin/env bash
# Host memory of one GPU rank serving chats, on the device machine after `run.sh stash`
# (commands in docs/BENCHMARKS.md, "Soak on GPUs" of session 11).
#
# For each config in CONFIGS (space-separated, each "default" or VAR=VALUE[,VAR=VALUE...],
# optionally followed by @WARM@WINDOW): a fresh rank of the soak's model (hidden 2048,
# 16 layers, bf16), greedy chats for WARM s (default 40), then chats at temperature TEMP
# (default 1) for WINDOW s (default 150). request_rss.py prints RSS and malloc's memory in
# use as it goes and at rest.
# PROFILE=1: memray tracks the rank's allocations through each window (benchmarks/heapprof;
# memray's wheels carried in .dev/prof), and heap_leaks.py prints what the window allocated
# and the rank still held at its end, by stack.
set -u
R=benchmarks/device/run.sh
OUT=${OUT:-/tmp/mjc-out}
export TMPDIR=/tmp  # the first model build here failed in std::filesystem::temp_directory_path
mkdir -p "$OUT"
[ -d /tmp/m ] || bash $R py -c "from mlx_jaccl_cluster.models.tiny import build_tiny_model as b; b('/tmp/m', arch='llama', dtype='bfloat16', hidden_size=2048, num_hidden_layers=16, intermediate_size=5120, num_attention_heads=16, num_key_value_heads=8)" > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 6; }
# launch.py gives a rank only its own MLX_* variables: let the config's through (this copy only)
sed -i 's/startswith(("MLX_", "MJC_"))/startswith(("MLX_RANK", "MLX_HOSTFILE", "MJC_"))/' runtime/mlx_jaccl_cluster/launch.py
export PYTHONPATH=/tmp/mjc-site:$PWD/runtime PYTHONUNBUFFERED=1
if [ "${PROFILE:-0}" = 1 ]; then
  [ -d /tmp/prof-site/memray ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/prof-site .dev/prof/*.whl || exit 5
  export PYTHONPATH=$PWD/benchmarks/heapprof:$PYTHONPATH:/tmp/prof-site MEMPROF_OUT=/tmp/rank
fi
n=0
for spec in ${CONFIGS:-default}; do
  n=$((n+1))
  IFS=@ read -r cfg warm window <<< "$spec"
  ( [ "$cfg" != default ] && export $(echo "$cfg" | tr ',' ' ')
    exec python3 -m mlx_jaccl_cluster.launch --model /tmp/m --world 1 --api-port 8093 --workdir /tmp/w$n ) > /tmp/server$n.log 2>&1 &
  for i in $(seq 120); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8093/health', timeout=2)" 2>/dev/null && break; sleep 1; done
  PID=$(pgrep -f mlx_jaccl_cluster.main | head -1)
  echo "== $cfg: rank pid $PID, up after ${i}s; $(tr '\0' '\n' < /proc/$PID/environ | grep ^MLX_ | tr '\n' ' ')"
  RR="python3 benchmarks/request_rss.py --url http://127.0.0.1:8093 --pid $PID --kind ${KIND:-chat} --max-tokens 64 -n 1000000"
  $RR --temperature 0 --seconds "${warm:-40}" > "$OUT/warm$n.txt" 2>&1; tail -2 "$OUT/warm$n.txt"
  [ "${PROFILE:-0}" = 1 ] && kill -USR1 "$PID" && sleep 2
  $RR --temperature "${TEMP:-1}" --seconds "${window:-150}" --every 15 > "$OUT/window$n.txt" 2>&1
  grep -E "^[0-9]+ |at rest|a request" "$OUT/window$n.txt" | tail -16
  if [ "${PROFILE:-0}" = 1 ]; then
    sleep 3; kill -USR2 "$PID"; sleep 5
    timeout 150 python3 benchmarks/heap_leaks.py "/tmp/rank.$PID.bin" 30 45 > "$OUT/leaks$n.txt" 2>&1; head -75 "$OUT/leaks$n.txt"
  fi
  pkill -f mlx_jaccl_cluster; sleep 3
  cp "/tmp/w$n/rank0.log" "$OUT/rank0-$n.log"; grep -E "ERROR|Error" "/tmp/w$n/rank0.log" | tail -3
done
