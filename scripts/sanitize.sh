#!/usr/bin/env bash
# Sanitizer runs of the host code (CUDA off).
#   scripts/sanitize.sh [ctest arguments]           AddressSanitizer + UndefinedBehaviorSanitizer:
#       builds everything into build-asan/ and runs the test suite there (the GPU and
#       namespace-cluster tests left out). Leak checking is off: Open MPI keeps allocations alive
#       until exit by design.
#   scripts/sanitize.sh --thread [ctest arguments]  ThreadSanitizer: builds the tests whose threads
#       meet (the communicator's requests and timeouts, the layer's compute and communication
#       streams, the trainer's planner thread, the metrics server) into build-tsan/ and runs them.
#       Open MPI itself is not instrumented; tests/tsan.supp names the reports inside it.
# Usage example: scripts/sanitize.sh -R test_train
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--thread" ]; then
  shift
  dir=build-tsan
  flags="-fsanitize=thread -fno-omit-frame-pointer"
  targets=(--target test_comm test_layer test_layer_ranks test_train test_metrics_server)
  select=(-R "^(test_comm|test_layer|test_layer_ranks|test_train)_np[0-9]+$|^test_metrics_server$")
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/tests/tsan.supp"
else
  dir=build-asan
  flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
  targets=()
  select=(-LE "cuda|cluster")
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=0"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
fi
link="${flags%% -fno-omit*}"
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEX_WITH_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$link" -DCMAKE_SHARED_LINKER_FLAGS="$link" >/dev/null
cmake --build "$dir" -j"$(nproc)" "${targets[@]}"
ctest --test-dir "$dir" --output-on-failure -j"$(nproc)" "${select[@]}" "$@"
