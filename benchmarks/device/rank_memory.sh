#!/usr/bin/env bash
# Host memory of one GPU rank serving chats, on the device machine after `run.sh stash`
# (commands in docs/BENCHMARKS.md, "Soak on GPUs, session 11" and "session 12").
#
# For each config in CONFIGS (space-separated, each "default" or VAR=VALUE[,VAR=VALUE...],
# optionally followed by @WARM@WINDOW): a fresh rank of the soak's model (hidden 2048,
# 16 layers, bf16), chats at temperature WARM_TEMP (default 0: greedy) for WARM s (default
# 40), then chats of KIND (default chat; one of request_rss.py's kinds) at temperature TEMP
# (default 1) for WINDOW s (default 150); VARY=1: the window's answers have budgets drawn from
# 1..64 tokens (request_rss.py --vary-tokens), so requests end at varied steps even when greedy.
# request_rss.py prints RSS and malloc's memory in use as it goes and at rest.
# PROFILE=1: memray tracks the rank's allocations through each window (benchmarks/heapprof;
# memray's wheels carried in .dev/prof), and heap_leaks.py prints what the window allocated
# and the rank still held at its end. (malloc's figures then may include memray's own.)
# RANK_ARGS: flags for the rank (settings, e.g. "--prompt-cache-size 0"), after launch.py's `--`.
# Ranks set MLX_ENABLE_CACHE_THRASHING_CHECK=0 themselves (main.py): a config sets it to 1
# to see MLX's check.
# Exits 7 if a rank was not up, or died during its run.
set -u
OUT=${OUT:-/tmp/mjc-out}
PORT=8093
MEMPROF_OUT=/tmp/rank  # memray's captures: $MEMPROF_OUT.PID.bin
mkdir -p "$OUT"
. benchmarks/device/soak_model.sh
soak_model || exit 6
# launch.py gives a rank only its own MLX_* variables: let the config's through (the device's copy only)
L=runtime/mlx_jaccl_cluster/launch.py
sed -i 's/startswith(("MLX_", "MJC_"))/startswith(("MLX_RANK", "MLX_HOSTFILE", "MJC_"))/' $L
grep -q 'startswith(("MLX_RANK", "MLX_HOSTFILE", "MJC_"))' $L || { echo "launch.py changed: update the sed above"; exit 6; }
RANK_PATH=/tmp/mjc-site:$PWD/runtime  # as run.sh installs it
export PYTHONPATH=$RANK_PATH PYTHONUNBUFFERED=1
if [ "${PROFILE:-0}" = 1 ]; then
  [ -d /tmp/prof-site/memray ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/prof-site .dev/prof/*.whl || exit 5
  RANK_PATH=$PWD/benchmarks/heapprof:$RANK_PATH:/tmp/prof-site
fi
up() { python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; }
failed=0
n=0
for spec in ${CONFIGS:-default}; do
  n=$((n+1))
  IFS=@ read -r cfg warm window <<< "$spec"
  ( [ "$cfg" != default ] && export $(echo "$cfg" | tr ',' ' ')
    [ "${PROFILE:-0}" = 1 ] && export MEMPROF_OUT
    PYTHONPATH=$RANK_PATH exec python3 -m mlx_jaccl_cluster.launch --model "$SOAK_MODEL" --world 1 --api-port $PORT --workdir /tmp/w$n -- ${RANK_ARGS:-} ) > /tmp/server$n.log 2>&1 &
  launcher=$!
  for i in $(seq 120); do up && break; sleep 1; done
  PID=$(pgrep -f mlx_jaccl_cluster.main | head -1)
  if [ -z "$PID" ] || ! up; then echo "== $cfg: no rank up after ${i}s"; tail -5 /tmp/server$n.log; failed=1; kill $launcher; continue; fi
  echo "== $cfg: rank pid $PID, up after ${i}s; $(tr '\0' '\n' < /proc/$PID/environ | grep ^MLX_ | tr '\n' ' ')"
  RR="python3 benchmarks/request_rss.py --url http://127.0.0.1:$PORT --pid $PID --max-tokens 64 -n 1000000"
  $RR --kind chat --temperature "${WARM_TEMP:-0}" --seconds "${warm:-${WARM:-40}}" > "$OUT/warm$n.txt" 2>&1; tail -2 "$OUT/warm$n.txt"
  [ "${PROFILE:-0}" = 1 ] && kill -0 "$PID" && kill -USR1 "$PID" && sleep 2
  $RR --kind "${KIND:-chat}" --temperature "${TEMP:-1}" $([ "${VARY:-0}" = 1 ] && echo --vary-tokens) --seconds "${window:-${WINDOW:-150}}" --every 15 > "$OUT/window$n.txt" 2>&1
  grep -E "^[0-9]+ |at rest|a request" "$OUT/window$n.txt" | tail -16
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "== $cfg: the rank died"; failed=1
  elif [ "${PROFILE:-0}" = 1 ]; then
    sleep 3; kill -USR2 "$PID"; sleep 5
    PYTHONPATH=$RANK_PATH timeout 150 python3 benchmarks/heap_leaks.py "$MEMPROF_OUT.$PID.bin" 30 45 > "$OUT/leaks$n.txt" 2>&1; head -75 "$OUT/leaks$n.txt"
  fi
  kill $launcher "$PID" 2>/dev/null
  for i in $(seq 30); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
  cp "/tmp/w$n/rank0.log" "$OUT/rank0-$n.log"; grep -E "ERROR|Error" "/tmp/w$n/rank0.log" | tail -3
done
[ $failed = 0 ] || exit 7
