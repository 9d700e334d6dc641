"""Controller-side operations: pure functions the Ansible roles call (no MLX import)."""
