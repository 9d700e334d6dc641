#!/usr/bin/env bash
# Install the Debian packages the controller needs (and, with --test, what the test lab
# needs). Installs only what is missing; without root it prints the apt-get line to run.
set -euo pipefail
need=(rsync python3-venv)
if [ "${1:-}" = "--test" ]; then
  need+=(openssh-server iproute2 systemd chromium chromium-driver)  # chromium: the dashboard browser test
fi
command -v dpkg >/dev/null 2>&1 || exit 0   # not Debian-like (macOS): nothing to do here
missing=()
for pkg in "${need[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
