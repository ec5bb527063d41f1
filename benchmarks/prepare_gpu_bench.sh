#!/bin/bash
# Prepares .gpu_bench/ (git-ignored) for benchmarks/gpu_bench.sh on the device machine: the
# official code (../shared does not travel) and the pure-Python wheels the GPU image lacks
# (ml-collections and clu for our configs / metrics, omegaconf for the official code; omegaconf
# 2.4 needs only PyYAML, which the image has). Run from the repository root, once per session.
set -euo pipefail
if [ -z "${ANCHORS:-}" ]; then  # beside the checkout (../shared), or beside a worktree's parent
  for a in ../shared/anchors ../../shared/anchors; do [ -f "$a/bench_official.py" ] && ANCHORS=$a && break; done
fi
[ -f "${ANCHORS:-}/bench_official.py" ] || { echo "no bench_official.py: set ANCHORS=<shared>/anchors"; exit 1; }
rm -rf .gpu_bench && mkdir -p .gpu_bench/anchors .gpu_bench/wheels
cp "$ANCHORS/bench_official.py" .gpu_bench/anchors/
cp -r "$ANCHORS/magvlt_official" .gpu_bench/anchors/
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_bench/wheels \
  ml-collections==1.1.0 clu==0.0.12 omegaconf==2.4.0
du -sh .gpu_bench
