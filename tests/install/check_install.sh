#!/usr/bin/env bash
# The install check (ctest -L install): installs a build tree into a temporary prefix, checks what
# landed there, builds examples/consumer against it as an outside project would (find_package(moex)
# through CMAKE_PREFIX_PATH, a fresh build folder) and runs the program on one MPI rank.
#
# Usage: check_install.sh BUILD_DIR SOURCE_DIR CONFIG CMAKE MPIEXEC WITH_TOOLS WITH_CUDA [-D... for the consumer]
#   WITH_TOOLS / WITH_CUDA (ON/OFF): whether bin/moex-* and the moex::cuda targets must be there.
# Everything it makes is under one mktemp folder, removed on exit.
set -euo pipefail
if [[ $# -lt 7 ]]; then
  echo "usage: $0 BUILD_DIR SOURCE_DIR CONFIG CMAKE MPIEXEC WITH_TOOLS WITH_CUDA [-D...]" >&2
  exit 2
fi
build=$(cd "$1" && pwd) source=$(cd "$2" && pwd) config=$3 cmake=$4 mpiexec=$5 with_tools=$6 with_cuda=$7
shift 7

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moex-install-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
fail() { echo "FAIL: $*" >&2; exit 1; }
# Runs a step quietly, showing its output only when it fails.
step() {
  local name=$1; shift
  echo "== $name"
  if ! "$@" >"$tmp/$name.log" 2>&1; then
    cat "$tmp/$name.log"
    fail "$name: $*"
  fi
}
is_on() { [[ $1 =~ ^(ON|on|1|TRUE|true|YES|yes)$ ]]; }

step install "$cmake" --install "$build" --prefix "$prefix" ${config:+--config "$config"}

pkg=$(dirname "$(find "$prefix" -name moexConfig.cmake -print -quit)")
[[ -f $pkg/moexConfig.cmake ]] || fail "no moexConfig.cmake under $prefix"
for f in moexConfigVersion.cmake moexTargets.cmake; do
  [[ -f $pkg/$f ]] || fail "no $f in $pkg"
done
for h in base/error.h comm/communicator.h comm/mpi/mpi_communicator.h scheduler/expert_placement.h \
         runtime/moe_layer.h runtime/io/moe_config.h; do
  [[ -f $prefix/include/moex/$h ]] || fail "header $h not installed under $prefix/include/moex"
done
# The package must stand on its own: no path into the build or source tree.
if grep -rlF -e "$build" -e "$source" "$pkg"; then
  fail "the installed package refers to the build or source tree (files above)"
fi
if is_on "$with_tools"; then
  for t in moex-train moex-layer moex-bench; do
    [[ -x $prefix/bin/$t ]] || fail "tool $t not installed in $prefix/bin"
  done
fi
if is_on "$with_cuda"; then
  [[ -f $pkg/moexCudaTargets.cmake ]] || fail "CUDA build, but no moexCudaTargets.cmake in $pkg"
  [[ -f $prefix/include/moex/runtime/cuda/gpu_layer.h ]] || fail "CUDA build, but runtime/cuda headers not installed"
else
  [[ ! -e $prefix/include/moex/runtime/cuda ]] || fail "CPU build, but runtime/cuda headers installed"
fi

step configure "$cmake" -S "$source/examples/consumer" -B "$tmp/build" -DCMAKE_PREFIX_PATH="$prefix" \
  ${config:+-DCMAKE_BUILD_TYPE="$config"} "$@"
step build "$cmake" --build "$tmp/build" -j2

echo "== run"
out=$("$mpiexec" -np 1 "$tmp/build/moex_consumer" 2>&1) || { echo "$out"; fail "moex_consumer exited with $?"; }
echo "$out"
grep -Eq '^moex consumer: rank 0 of 1, 4 tokens, 8 local experts, checksum [0-9]+\.[0-9]+$' <<<"$out" ||
  fail "moex_consumer did not print its checksum line"
if is_on "$with_cuda"; then
  grep -q '^moex consumer: moex::cuda linked' <<<"$out" || fail "moex_consumer was not linked with moex::cuda"
fi
echo "PASS"
