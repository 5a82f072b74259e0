#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan, coverage on the host code) into build-fuzz/
# and runs each for RUNS inputs (default 1,000,000), 10 s per input at most. Findings (crashes,
# sanitizer reports, hangs, exceptions other than moex::Error) stop the run and leave the input in
# build-fuzz/findings/. Usage: scripts/fuzz.sh [RUNS] [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-1000000}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_safetensors fuzz_config fuzz_index)
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang \
  -DMOEX_WITH_CUDA=OFF -DMOEX_FUZZ=ON -DMOEX_BUILD_TESTS=OFF -DMOEX_BUILD_EXAMPLES=OFF \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]}"
mkdir -p build-fuzz/findings
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
for t in "${targets[@]}"; do
  bin="build-fuzz/bin/$t"
  [ -x "$bin" ] || { echo "fuzz: $bin was not built"; exit 1; }
  mkdir -p "build-fuzz/corpus/$t"
  echo "== $t: $runs runs"
  log="build-fuzz/$t.log"
  set +e
  "$bin" -runs="$runs" -timeout=10 -max_len=4096 -rss_limit_mb=2048 \
    -artifact_prefix="build-fuzz/findings/$t-" "build-fuzz/corpus/$t" > "$log" 2>&1
  code=$?
  set -e
  grep -E "INITED|DONE|ERROR|SUMMARY|Done" "$log" || true
  if [ $code -ne 0 ] || ! grep -q "^Done $runs runs" "$log" || [ -n "$(ls build-fuzz/findings/$t-* 2>/dev/null)" ]; then
    echo "fuzz: $t stopped (exit $code); see $log and build-fuzz/findings/"
    exit 1
  fi
done
echo "fuzz: no findings"
