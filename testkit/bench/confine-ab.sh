#!/usr/bin/env bash
# What quarry-confine costs: `cargo check` of one project with many dependencies, a fresh target
# directory each time, alternating between bare cargo and cargo with quarry-confine as
# RUSTC_WRAPPER, outside the sandbox. Prints task-clock (ms), user, system and wall seconds per
# run, from `perf stat`. Needs perf, Landlock (Linux 6.2+) and root (the trampolines of build
# scripts run /run/quarry/bin/quarry-confine, linked here to the release build).
#
#   cargo build --release -p quarry-consumer --bin quarry-confine
#   testkit/bench/confine-ab.sh [ROUNDS]
set -euo pipefail

rounds="${1:-3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
confine="$root/target/release/quarry-confine"
test -x "$confine" || { echo "build $confine first" >&2; exit 1; }
work="${QUARRY_AB_DIR:-/tmp/quarry-confine-ab}"
project="$work/project"
if [ ! -f "$project/Cargo.lock" ]; then
  mkdir -p "$work"
  rm -rf "$project"
  cargo new -q --lib "$project"
  cat >> "$project/Cargo.toml" <<'EOF'
tokio = { version = "1", features = ["full"] }
serde_json = "1"
regex = "1"
clap = { version = "4", features = ["derive"] }
axum = "0.8"
EOF
  (cd "$project" && cargo fetch -q)
fi
mkdir -p /run/quarry/bin
ln -sf "$confine" /run/quarry/bin/quarry-confine
trap 'rm -f /run/quarry/bin/quarry-confine' EXIT

cd "$project"
echo "arm round task-clock-ms user-s system-s wall-s"
for round in $(seq "$rounds"); do
  for arm in bare confine; do
    rm -rf target
    if [ "$arm" = confine ]; then
      export RUSTC_WRAPPER=/run/quarry/bin/quarry-confine QUARRY_CONFINE_WRITABLE="$project"
    else
      unset RUSTC_WRAPPER QUARRY_CONFINE_WRITABLE
    fi
    stat="$work/$arm-$round.stat"
    perf stat -e task-clock -o "$stat" cargo check -q --offline
    fields=$(grep -E 'task-clock|seconds (user|sys|time elapsed)' "$stat" | awk '{print $1}' | tr -d , | tr '\n' ' ')
    # perf prints task-clock, then wall, user and system.
    read -r clock wall user system <<<"$fields"
    echo "$arm $round $clock $user $system $wall"
  done
done
