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

# The test runner: cargo-nextest (on the machine image; installed if missing). It runs each
# test in its own process and stops one that hangs (.config/nextest.toml).
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "Installing cargo-nextest (once)..." >&2
    cargo install cargo-nextest --locked
fi

# Every test target (there are no doctests); the closing line sums all of them.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo nextest run --lib --bins --tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
summary=$(grep -E '^ *Summary \[' "$log" | tail -n 1)
count() { grep -oE "[0-9]+ $1" <<<"$summary" | grep -oE '^[0-9]+' || echo 0; }
echo "segmentd: $(count passed) passed, $(($(count failed) + $(count 'timed out'))) failed"
exit "$status"
