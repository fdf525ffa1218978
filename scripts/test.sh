#!/usr/bin/env bash
# The tests, on a fresh machine too: installs what is missing (scripts/setup.sh), then runs every
# test of every feature. Arguments go to `cargo test` (a test name, `-- --nocapture`…).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --all-features "$@"
