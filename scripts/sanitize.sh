#!/usr/bin/env bash
# Builds the host code and its tests with AddressSanitizer + UndefinedBehaviorSanitizer (CUDA off)
# into build-asan/ and runs the test suite there (the GPU and namespace-cluster tests left out).
# Leak checking is off: Open MPI keeps allocations alive until exit by design.
# Usage: scripts/sanitize.sh [ctest arguments, e.g. -R test_train]
set -euo pipefail
cd "$(dirname "$0")/.."
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEX_WITH_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined"
cmake --build build-asan -j"$(nproc)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir build-asan --output-on-failure -j"$(nproc)" -LE "cuda|cluster" "$@"
