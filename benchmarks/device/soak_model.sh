#!/usr/bin/env bash
# The soak's model on the device machine (a random-weight llama, hidden 2048, 16 layers,
# bf16), built once into $SOAK_MODEL (default /tmp/m); sourced by the scripts that use it, after `run.sh stash`.
SOAK_MODEL=${SOAK_MODEL:-/tmp/m}
export TMPDIR=/tmp  # the first model build here failed in std::filesystem::temp_directory_path
soak_model() {
  [ -d "$SOAK_MODEL" ] && return 0
  bash benchmarks/device/run.sh py -c "from mlx_jaccl_cluster.models.tiny import build_tiny_model as b; b('$SOAK_MODEL', arch='llama', dtype='bfloat16', hidden_size=2048, num_hidden_layers=16, intermediate_size=5120, num_attention_heads=16, num_key_value_heads=8)" > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; return 6; }
}
