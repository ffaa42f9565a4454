#!/usr/bin/env bash
# The README's two commands, checked the way a new user meets them: a clean clone of this
# checkout's HEAD, with a Python that has no packages first on PATH (a fresh venv), running
# `./scripts/setup.sh` and then `./scripts/test.sh` (what `.ci/run` runs). The clone is made
# beside this checkout, as CI places its clone, so that `../shared` (the PVM guest patch on PVM
# hosts) resolves from it as it does from here. It takes as long as a CI run (about 25 to 35
# minutes on 2 cores with the image cache warm), so it is not part of the test suite.
# Usage: scripts/fresh-clone-check.sh [LOG]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="$(mktemp -d "$(dirname "$repo")/capsule-fresh-XXXXXX")"
venv="$(mktemp -d /tmp/capsule-bare-venv-XXXXXX)"
log="${1:-$clone.log}"
trap 'rm -rf "$clone" "$venv"' EXIT
git clone --quiet "$repo" "$clone"
python3 -m venv "$venv"
echo "fresh-clone check of $(git -C "$repo" rev-parse --short HEAD) in $clone (log: $log)" >&2
start=$(date +%s)
status=0
( cd "$clone" && PATH="$venv/bin:$PATH" bash .ci/run ) >"$log" 2>&1 || status=$?
echo "fresh-clone check: exit $status after $(( $(date +%s) - start )) s; the log's last lines:" >&2
tail -n 5 "$log" >&2
exit "$status"
