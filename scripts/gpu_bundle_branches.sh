#!/usr/bin/env bash
# Build here, for a same-call A/B of several branches on the GPU machine (scripts/gpu_ab.sh there):
#   .gpu/v/NAME/qwen3rs-*.whl and .gpu/v/NAME/cuda_ops for each branch NAME given (the current
#   checkout's HEAD as "main" when none is), by checking each out in turn (the tree must be clean; the
#   shared target/ keeps the builds incremental, ~1-3 minutes each) and back to where it was.
# Then through the device tool: command "bash scripts/gpu_ab.sh [CUDA_OPS_FILTER]", carry [".gpu/v"].
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "$(git status --porcelain --untracked-files=no)" ] || { echo "commit or stash first: the branches are checked out here" >&2; exit 1; }
start=$(git rev-parse --abbrev-ref HEAD)
[ "$start" = HEAD ] && start=$(git rev-parse HEAD)
branches=("$@")
[ ${#branches[@]} -gt 0 ] || branches=("$start")
rm -rf .gpu/v
trap 'git checkout -q "$start"' EXIT
for b in "${branches[@]}"; do
  git checkout -q "$b"
  echo "== $b $(git rev-parse --short HEAD)"
  bash scripts/gpu_bundle.sh > "/tmp/gpu_bundle_${b//\//_}.log" 2>&1 || { tail -20 "/tmp/gpu_bundle_${b//\//_}.log"; exit 1; }
  mkdir -p ".gpu/v/${b//\//_}"
  cp target/wheels/qwen3rs-*.whl .gpu/cuda_ops ".gpu/v/${b//\//_}/"
done
du -sh .gpu/v/*
