#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2317,SC2054  # literal $ in generated scripts; trap-only functions; --mca btl a,b,c
# cluster.sh: simulate several nodes on one machine and run an MPI program across them.
#
# Every "node" is a Linux network namespace with its own address, joined by a veth pair to a
# bridge in the root namespace, with its own hostname (UTS namespace) and its own shared-memory
# directory. Open MPI's TCP BTL carries traffic between nodes and vader (shared memory) carries
# traffic inside a node, as on a real cluster. The link rate can be capped with tc tbf.
#
#   scripts/cluster.sh [--nodes N] [--ranks-per-node R] [--rate RATE] [--subnet A.B.C.0/24]
#                      [--keep] [--verbose] -- PROGRAM ARGS...
#   scripts/cluster.sh --check
#
# Exit status: the program's own status; 77 (with a line starting "SKIPPED:") when the nodes
# cannot be set up here (not root, no namespaces, ...) so ctest can skip; 2 for bad usage.
# See docs/CLUSTER.md.
set -euo pipefail

readonly SKIP_RC=77
readonly PROG=${0##*/}

usage() {
  cat <<EOF
Usage: $PROG [options] -- PROGRAM [ARGS...]
       $PROG --check

Run PROGRAM with mpirun across N simulated nodes on this machine. Each node is a network
namespace (own IP address, own hostname moex-node<i>, own shared-memory directory) attached by
a veth pair to a bridge that the script creates. Ranks are placed node-contiguously: ranks
0..R-1 on node 0, R..2R-1 on node 1, and so on (checked for every rank before PROGRAM starts).

Options:
  --nodes N            number of nodes (default 2, at most 200)
  --ranks-per-node R   MPI ranks per node (default 1); mpirun -np N*R
  --rate RATE          cap each node's link with tc tbf in both directions, e.g. 1gbit,
                       200mbit, 500kbit (tc units; "mbps" means megabytes per second)
  --subnet A.B.C.0/24  private /24 to use (default 10.213.<k>.0/24, k derived from the PID
                       and chosen so it does not collide with an address already in use)
  --keep               do not remove namespaces, links and temp files on exit (prints
                       what to delete); without PROGRAM it just sets the nodes up
  --verbose            print the setup steps and the mpirun command line
  --check              exit 0 if namespaces can be made here, else print why and exit 77
  -h, --help           this help

Environment:
  MOEX_CLUSTER_FORCE_SKIP=1   behave as if namespaces could not be made (exit 77), for tests
  MOEX_*, OPENBLAS_NUM_THREADS, OMPI_ALLOW_RUN_AS_ROOT*, PATH, LD_LIBRARY_PATH are passed to
  every rank (mpirun -x); OMPI_MCA_* variables are forwarded by mpirun itself.

Exit status: PROGRAM's status; 77 with a "SKIPPED: <reason>" line when the nodes cannot be
set up (ctest SKIP_RETURN_CODE); 2 for bad usage. Needs root, iproute2, util-linux, Open MPI.
EOF
}

die_usage() { echo "$PROG: $*" >&2; echo "Try '$PROG --help'." >&2; exit 2; }
skip() { echo "SKIPPED: $PROG: $*"; exit "$SKIP_RC"; }
log() { if [[ $VERBOSE == 1 ]]; then echo "$PROG: $*" >&2; fi; }

# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
NODES=2
RPN=1
RATE=""
SUBNET=""
KEEP=0
VERBOSE=0
CHECK=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) [[ $# -ge 2 ]] || die_usage "--nodes needs a value"; NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    --ranks-per-node) [[ $# -ge 2 ]] || die_usage "--ranks-per-node needs a value"; RPN=$2; shift 2 ;;
    --ranks-per-node=*) RPN=${1#*=}; shift ;;
    --rate) [[ $# -ge 2 ]] || die_usage "--rate needs a value"; RATE=$2; shift 2 ;;
    --rate=*) RATE=${1#*=}; shift ;;
    --subnet) [[ $# -ge 2 ]] || die_usage "--subnet needs a value"; SUBNET=$2; shift 2 ;;
    --subnet=*) SUBNET=${1#*=}; shift ;;
    --keep) KEEP=1; shift ;;
    --verbose|-v) VERBOSE=1; shift ;;
    --check) CHECK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die_usage "unknown option '$1' (put the program after --)" ;;
  esac
done
CMD=("$@")

if ! [[ $NODES =~ ^[0-9]+$ ]] || (( NODES < 1 || NODES > 200 )); then die_usage "--nodes must be 1..200"; fi
if ! [[ $RPN =~ ^[0-9]+$ ]] || (( RPN < 1 || RPN > 1024 )); then die_usage "--ranks-per-node must be 1..1024"; fi
if [[ -n $SUBNET ]]; then
  [[ $SUBNET =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.0/24$ ]] ||
    die_usage "--subnet must look like 10.213.7.0/24"
  for o in "${BASH_REMATCH[@]:1:3}"; do (( o <= 255 )) || die_usage "bad --subnet $SUBNET"; done
fi
if [[ $CHECK == 0 && ${#CMD[@]} -eq 0 && $KEEP == 0 ]]; then
  die_usage "no program given (usage: $PROG [options] -- PROGRAM ARGS...)"
fi

# tbf wants a burst of at least one timer tick's worth of bytes and larger than a GSO packet:
# use 10 ms of traffic, at least 64 KiB. Parse the rate ourselves to size it.
TBF_BURST=""
if [[ -n $RATE ]]; then
  if [[ ${RATE,,} =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)?$ ]]; then
    num=${BASH_REMATCH[1]}; unit=${BASH_REMATCH[3]:-bit}
    case "$unit" in
      bit) mul=1 ;; kbit) mul=1000 ;; mbit) mul=1000000 ;; gbit) mul=1000000000 ;;
      tbit) mul=1000000000000 ;; bps) mul=8 ;; kbps) mul=8000 ;; mbps) mul=8000000 ;;
      gbps) mul=8000000000 ;; tbps) mul=8000000000000 ;;
    esac
    TBF_BURST=$(awk -v n="$num" -v m="$mul" 'BEGIN { b = n * m / 8 / 100; if (b < 65536) b = 65536; printf "%d", b }')
    (( $(awk -v n="$num" -v m="$mul" 'BEGIN { print (n * m >= 8000) }') )) || die_usage "--rate too small: $RATE"
  else
    die_usage "--rate must look like 1gbit, 200mbit, 500kbit or 10mbps (got '$RATE')"
  fi
fi

# ---------------------------------------------------------------------------------------------
# Names. Everything carries this shell's PID so concurrent invocations never share anything.
# Interface names must fit in 15 characters: "mx" + PID (<= 7 digits) + "h"/"c" + index.
# ---------------------------------------------------------------------------------------------
ID=$$
BR="mxbr$ID"
ns_name() { echo "moex${ID}n$1"; }
veth_host() { echo "mx${ID}h$1"; }   # bridge side, stays in the root namespace
veth_node() { echo "mx${ID}c$1"; }   # node side, moved into the namespace

# Resources created so far, so cleanup removes exactly what this invocation made.
CREATED_NS=()
CREATED_LINKS=()
TMP=""
CLEANED=0

cleanup() {
  [[ $CLEANED == 1 ]] && return 0
  CLEANED=1
  if [[ $KEEP == 1 ]]; then
    if (( ${#CREATED_NS[@]} + ${#CREATED_LINKS[@]} > 0 )) || [[ -n $TMP ]]; then
      echo "$PROG: --keep: left in place: namespaces ${CREATED_NS[*]:-none}; links ${CREATED_LINKS[*]:-none}; dir ${TMP:-none}" >&2
      echo "$PROG: remove with: for n in ${CREATED_NS[*]:-}; do ip netns pids \$n | xargs -r kill -9; ip netns del \$n; done; for l in ${CREATED_LINKS[*]:-}; do ip link del \$l 2>/dev/null; done; rm -rf ${TMP:-/nonexistent}" >&2
    fi
    return 0
  fi
  local ns pid l
  # Stray processes (an orted or rank that outlived mpirun) would keep a namespace alive: end
  # them. They can only be ours: the namespaces were made by this invocation.
  for ns in "${CREATED_NS[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
  done
  for ns in "${CREATED_NS[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  # Deleting one end of a veth deletes its peer and the tbf qdiscs on both; then the bridge.
  for l in "${CREATED_LINKS[@]}"; do
    ip link del "$l" 2>/dev/null || true
  done
  if [[ -n $TMP && -d $TMP ]]; then rm -rf -- "$TMP"; fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 129' HUP

# ---------------------------------------------------------------------------------------------
# Can we make namespaces here? Used by --check and before a real run; every failure is a skip.
# ---------------------------------------------------------------------------------------------
preflight() {
  if [[ ${MOEX_CLUSTER_FORCE_SKIP:-0} != 0 && -n ${MOEX_CLUSTER_FORCE_SKIP:-} ]]; then
    skip "MOEX_CLUSTER_FORCE_SKIP=$MOEX_CLUSTER_FORCE_SKIP is set"
  fi
  [[ $(uname -s) == Linux ]] || skip "network namespaces need Linux"
  [[ $(id -u) == 0 ]] || skip "needs root (network namespaces, veth, bridge)"
  local c
  for c in ip unshare hostname mpirun; do
    command -v "$c" >/dev/null 2>&1 ||
      skip "'$c' not found (apt-get install -y iproute2 util-linux hostname openmpi-bin)"
  done
  if [[ -n $RATE ]]; then
    command -v tc >/dev/null 2>&1 || skip "'tc' not found for --rate (apt-get install -y iproute2)"
  fi
  # A throwaway namespace with a veth and a UTS namespace proves the real setup will work.
  local t="moex${ID}t" th="mx${ID}t0" tc_="mx${ID}t1" err
  if ! err=$(ip netns add "$t" 2>&1); then
    skip "cannot create a network namespace: ${err//$'\n'/ }"
  fi
  CREATED_NS+=("$t")
  if ! err=$(ip link add "$th" type veth peer name "$tc_" 2>&1); then
    skip "cannot create a veth pair: ${err//$'\n'/ }"
  fi
  CREATED_LINKS+=("$th")
  if ! err=$(ip link set "$tc_" netns "$t" 2>&1); then
    skip "cannot move a veth into a namespace: ${err//$'\n'/ }"
  fi
  if ! err=$(ip netns exec "$t" unshare --uts sh -c 'hostname moex-check && ip link set lo up' 2>&1); then
    skip "cannot enter a namespace with its own hostname: ${err//$'\n'/ }"
  fi
  if [[ -n $RATE ]] && ! err=$(tc qdisc add dev "$th" root tbf rate "$RATE" burst "$TBF_BURST" latency 50ms 2>&1); then
    skip "tc tbf does not work here: ${err//$'\n'/ }"
  fi
  ip link del "$th" 2>/dev/null || true
  ip netns del "$t" 2>/dev/null || true
  CREATED_LINKS=()
  CREATED_NS=()
}

preflight
if [[ $CHECK == 1 ]]; then
  echo "$PROG: OK: network namespaces, veth pairs and UTS namespaces work here"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Subnet: 10.213.<k>.0/24, k from the PID, skipping /24s already on an interface or a route.
# A lock makes the choice and the bridge address one step among concurrent invocations.
# ---------------------------------------------------------------------------------------------
TMP=$(mktemp -d /tmp/moexc.XXXXXX)
chmod 755 "$TMP"
exec {LOCKFD}<"${BASH_SOURCE[0]}"   # the lock is on this script file: nothing to clean up
flock -w 30 "$LOCKFD" || skip "could not lock ${BASH_SOURCE[0]} to choose a subnet"

subnet_in_use() {  # $1 = "A.B.C." (with the dot); true if any address or route starts with it
  local used  # (not piped straight into grep -q: with pipefail, SIGPIPE in ip would read as "no")
  used=$({ ip -o -4 addr show; ip -4 route show table all; } 2>/dev/null || true)
  grep -qE -- "(^|[^0-9.])${1//./\\.}[0-9]" <<<"$used"
}
if [[ -n $SUBNET ]]; then
  PFX=${SUBNET%0/24}
  if subnet_in_use "$PFX"; then skip "subnet $SUBNET is already in use here"; fi
else
  PFX=""
  k0=$(( ID % 200 + 20 ))
  for (( j = 0; j < 230; j++ )); do
    k=$(( (k0 - 20 + j) % 230 + 20 ))
    if ! subnet_in_use "10.213.$k."; then PFX="10.213.$k."; break; fi
  done
  [[ -n $PFX ]] || skip "no free 10.213.x.0/24 subnet"
fi
CIDR="${PFX}0/24"
BR_IP="${PFX}1"
node_ip() { echo "${PFX}$(( 10 + $1 ))"; }

# ---------------------------------------------------------------------------------------------
# Bridge and nodes
# ---------------------------------------------------------------------------------------------
run_or_skip() {  # run a setup command; any failure means "cannot set up here" -> 77
  local err
  log "+ $*"
  if ! err=$("$@" 2>&1); then
    skip "setup step failed: $*: ${err//$'\n'/ }"
  fi
}

run_or_skip ip link add "$BR" type bridge
CREATED_LINKS+=("$BR")
# Keep bridged frames out of iptables (br_netfilter): a FORWARD DROP policy would cut the nodes
# off from each other. Older kernels lack the per-bridge switch; that is fine.
ip link set "$BR" type bridge nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0 2>/dev/null || true
run_or_skip ip addr add "$BR_IP/24" dev "$BR"
run_or_skip ip link set "$BR" up
flock -u "$LOCKFD"
exec {LOCKFD}<&-

TBF=(tbf rate "$RATE" burst "$TBF_BURST" latency 50ms)
for (( i = 0; i < NODES; i++ )); do
  ns=$(ns_name "$i"); vh=$(veth_host "$i"); vc=$(veth_node "$i")
  run_or_skip ip netns add "$ns"
  CREATED_NS+=("$ns")
  run_or_skip ip link add "$vh" type veth peer name "$vc"
  CREATED_LINKS+=("$vh")
  run_or_skip ip link set "$vc" netns "$ns"
  run_or_skip ip link set "$vh" master "$BR"
  run_or_skip ip link set "$vh" up
  run_or_skip ip -n "$ns" link set lo up
  run_or_skip ip -n "$ns" addr add "$(node_ip "$i")/24" dev "$vc"
  run_or_skip ip -n "$ns" link set "$vc" up
  if [[ -n $RATE ]]; then
    # Node -> bridge (the node's egress) and bridge -> node (the bridge port's egress).
    run_or_skip ip netns exec "$ns" tc qdisc add dev "$vc" root "${TBF[@]}"
    run_or_skip tc qdisc add dev "$vh" root "${TBF[@]}"
  fi
  mkdir -p "$TMP/node$i/shm"
done

# Every node must reach the bridge (where mpirun listens) and the other nodes: try a TCP
# connection with bash's /dev/tcp. A refused connection proves the path works.
tcp_reach() {  # $1 = namespace, $2 = address
  local out
  out=$(ip netns exec "$1" timeout 5 bash -c "exec 3<>/dev/tcp/$2/9" 2>&1) && return 0
  [[ $out == *"refused"* ]]
}
for (( i = 0; i < NODES; i++ )); do
  tcp_reach "$(ns_name "$i")" "$BR_IP" || skip "node $i cannot reach the bridge address $BR_IP"
  if (( NODES > 1 )); then
    j=$(( (i + 1) % NODES ))
    tcp_reach "$(ns_name "$i")" "$(node_ip "$j")" || skip "node $i cannot reach node $j"
  fi
done
log "nodes up: bridge $BR $BR_IP, subnet $CIDR${RATE:+, rate $RATE}"

if [[ ${#CMD[@]} -eq 0 ]]; then  # --keep without a program: set up and leave
  for (( i = 0; i < NODES; i++ )); do
    echo "node $i: namespace $(ns_name "$i") address $(node_ip "$i") shm $TMP/node$i/shm"
  done
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# The launch agent: mpirun calls it like ssh ("agent [opts] HOST COMMAND..."). It maps HOST to
# its namespace and runs the orted command there under a fresh UTS namespace with the node's
# hostname, through a shell (ssh hands the command to a remote shell too).
# ---------------------------------------------------------------------------------------------
AGENT="$TMP/agent.sh"
{
  echo '#!/bin/sh'
  echo '# Written by cluster.sh: plm_rsh_agent mapping a node address to its namespace.'
  echo 'while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done'
  echo 'host=$1; shift'
  echo 'case "$host" in'
  for (( i = 0; i < NODES; i++ )); do
    echo "  $(node_ip "$i")) i=$i; ns=$(ns_name "$i") ;;"
  done
  echo '  *) echo "cluster.sh agent: unknown host $host" >&2; exit 255 ;;'
  echo 'esac'
  echo "OMPI_MCA_btl_vader_backing_directory=$TMP/node\$i/shm"
  echo 'export OMPI_MCA_btl_vader_backing_directory'
  echo 'exec ip netns exec "$ns" unshare --uts sh -c '\''hostname "$1" || exit 255; eval "$2"'\'' sh "moex-node$i" "$*"'
} >"$AGENT"
chmod 755 "$AGENT"

# Runs in front of every rank: checks node-contiguous placement (rank r on node r / R, from the
# node's hostname) and points vader at the node's own backing directory (set here because the
# ranks get mpirun's environment, not the orted's).
SHIM="$TMP/rank.sh"
cat >"$SHIM" <<EOF
#!/bin/sh
# Written by cluster.sh: placement check and per-node shared memory, then the program.
r=\${OMPI_COMM_WORLD_RANK:?not started by mpirun}
node=\$(uname -n)
want=moex-node\$(( r / $RPN ))
if [ "\$node" != "\$want" ]; then
  echo "cluster.sh: rank \$r runs on \$node, expected \$want (placement is not node-contiguous)" >&2
  exit 97
fi
OMPI_MCA_btl_vader_backing_directory=$TMP/node\${node#moex-node}/shm
export OMPI_MCA_btl_vader_backing_directory
exec "\$@"
EOF
chmod 755 "$SHIM"

# ---------------------------------------------------------------------------------------------
# mpirun
# ---------------------------------------------------------------------------------------------
HOSTS=""
for (( i = 0; i < NODES; i++ )); do HOSTS+="${HOSTS:+,}$(node_ip "$i"):$RPN"; done

EXPORTS=()
for v in PATH LD_LIBRARY_PATH OPENBLAS_NUM_THREADS OMPI_ALLOW_RUN_AS_ROOT OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
         $(compgen -e | grep -E '^MOEX_' || true); do
  if [[ -n ${!v+x} ]]; then EXPORTS+=(-x "$v"); fi
done
ROOT_FLAGS=()
if [[ $(id -u) == 0 ]]; then ROOT_FLAGS=(--allow-run-as-root); fi

MPIRUN=(mpirun "${ROOT_FLAGS[@]}" -np $(( NODES * RPN )) --host "$HOSTS"
  # ppr:R:node puts exactly R ranks on each node; rank-by slot numbers them node by node.
  --map-by "ppr:$RPN:node" --rank-by slot --bind-to none
  --mca plm_rsh_agent "$AGENT" --mca plm_rsh_no_tree_spawn 1
  --mca oob_tcp_if_include "$CIDR" --mca btl_tcp_if_include "$CIDR"
  # ob1 + tcp/vader/self, so traffic takes the simulated links (not UCX's own transports).
  --mca pml ob1 --mca btl tcp,vader,self --mca osc '^ucx'
  "${EXPORTS[@]}"
  "$SHIM" "${CMD[@]}")
log "+ ${MPIRUN[*]}"

set +e
"${MPIRUN[@]}"
rc=$?
set -e
exit "$rc"
