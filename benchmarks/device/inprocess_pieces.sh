#!/usr/bin/env bash
# Host memory of the engine's pieces, one set at a time: request_rss.py's in-process loop (8
# sequences in flight, no server) on the soak's model, on the device machine after
# `run.sh stash` (docs/BENCHMARKS.md, "Soak on GPUs, session 12").
#
# PIECES: space-separated sets. A value for request_rss.py --ours, "-" for none (mlx-lm's
# BatchGenerator alone); "engine" for the rank's own engine (--engine: its thread and loop,
# every piece), "engine/X,Y" for that engine without pieces X and Y (--without). Default
# "- all". Each run stops after SECONDS_EACH s (default 150).
# TEMP (default 0: greedy); VARY=1 (the default): budgets drawn from 1..64 tokens, so
# sequences end at varied steps; VARY=0: 64 tokens each.
# Each run's lines go to $OUT/inproc-NAME.txt (NAME: the set, mlx-lm for "-", "/" written -without-,
# "," written +); the last few are printed. Exits 1 if a run failed.
set -u
OUT=${OUT:-/tmp/mjc-out}
mkdir -p "$OUT"
. benchmarks/device/soak_model.sh
soak_model || exit 6
vary=()
[ "${VARY:-1}" = 1 ] && vary=(--vary-tokens)
failed=0
for set in ${PIECES:-- all}; do
  case $set in
    -) mode=(--inprocess) ;;
    engine) mode=(--engine) ;;
    engine/*) mode=(--engine --without "${set#engine/}") ;;
    *) mode=(--inprocess --ours "$set") ;;
  esac
  name=${set/#-/mlx-lm}
  name=${name//\//-without-}
  file="$OUT/inproc-${name//,/+}.txt"  # no comma or slash in a name that comes back
  MJC_BENCH_LIMIT=${SECONDS_EACH:-150} bash benchmarks/device/run.sh py benchmarks/request_rss.py "${mode[@]}" \
    --model "$SOAK_MODEL" --max-tokens 64 -n 1000000 --temperature "${TEMP:-0}" "${vary[@]}" > "$file" 2>&1
  rc=$?
  echo "== ${set/#-/mlx-lm alone}"
  grep -E "^[0-9]+ sequences" "$file" | tail -6
  if [ $rc != 0 ] && [ $rc != 124 ]; then  # 124: stopped at SECONDS_EACH, as planned
    echo "failed (exit $rc):"; tail -5 "$file"; failed=1
  fi
done
exit $failed
