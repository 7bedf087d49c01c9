#!/usr/bin/env bash
# The test command (README's second command): every test of the project, including the
# system test against a standalone Tansu broker. Tansu is installed with cargo the first
# time (about 11 minutes on 2 cores); the system test starts and stops it itself.
set -euo pipefail
cd "$(dirname "$0")/.."

tansu_version=0.6.0
tansu=$(command -v tansu || true)
if [ -z "$tansu" ] && [ -x "$HOME/.cargo/bin/tansu" ]; then
    tansu="$HOME/.cargo/bin/tansu"
fi
if [ -z "$tansu" ] || ! "$tansu" --version 2>/dev/null | grep -q "$tansu_version"; then
    echo "Installing the Tansu broker $tansu_version for the system test (once)..." >&2
    cargo install tansu --version "$tansu_version" --features dynostore --locked
    tansu="$HOME/.cargo/bin/tansu"
fi
export TANSU_BINARY="$tansu"

# Every test target (there are no doctests); the closing line sums all of them.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --lib --bins --tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "segmentd: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
