#!/usr/bin/env bash
# Print the RDMA NICs the KV transfer should use, as one line `KVCACHE_RDMA_NICS=<dev>,<dev>,...`
# (FastDeploy's interface: `export $(tools/get_rdma_nics.sh gpu)`), decided from sysfs alone.
# rdma/nics.py implements the same rules for Python callers; tests/rdma/test_nics.py checks they agree.
#
#   cpu   every RDMA device with an active port, in name order (mlx5_2 before mlx5_10)
#   gpu   one entry per NVIDIA GPU in PCI-address order: the nearest active NIC to that GPU, so entry i
#         serves GPU i (names may repeat). Nearest = deepest common PCIe ancestor (a shared switch beats a
#         shared root complex), then the same NUMA node, then any; ties go to name order.
#
# A port is active when ports/<n>/state says ACTIVE and it can carry RC traffic: an InfiniBand port,
# or an Ethernet (RoCE) port with at least one non-zero GID (no GID = no IP on the netdev = no RoCE).
# GPUs: bus/pci/devices/* with vendor 0x10de and class 0x0300xx (VGA) or 0x0302xx (3D controller).
#
# Reads $SYSFS_ROOT (default /sys). Needs bash and coreutils only (readlink -f, sort -V).
# Exit status: 0 with the line on stdout; 1 when there is no active NIC (or, for gpu, no GPU): nothing
# on stdout, the reason on stderr; 2 on bad usage.
set -uo pipefail

SYSFS_ROOT="${SYSFS_ROOT:-/sys}"
DEVICES_DIR="$(readlink -f "$SYSFS_ROOT/devices" 2>/dev/null || echo "$SYSFS_ROOT/devices")"
ZERO_GID="0000:0000:0000:0000:0000:0000:0000:0000"

die() { echo "get_rdma_nics: $1" >&2; exit "${2:-1}"; }

read_file() { local v; v="$(cat "$1" 2>/dev/null)" || return 1; printf '%s' "$v"; }

# port_is_active <port dir>: ACTIVE, and InfiniBand or Ethernet with a non-zero GID.
port_is_active() {
  local port="$1" state link gid
  state="$(read_file "$port/state")" || return 1
  [[ "$state" == *ACTIVE* ]] || return 1
  link="$(read_file "$port/link_layer")" || return 1
  case "$link" in
    InfiniBand) return 0 ;;
    Ethernet)
      for gid in "$port"/gids/*; do
        [ -f "$gid" ] || continue
        g="$(read_file "$gid")" || continue
        [ -n "$g" ] && [ "$g" != "$ZERO_GID" ] && return 0
      done
      return 1 ;;
    *) return 1 ;;
  esac
}

# active_nics: names of devices with at least one active port, in name order, one per line.
active_nics() {
  local dev port
  for dev in "$SYSFS_ROOT"/class/infiniband/*; do
    [ -d "$dev/ports" ] || continue
    for port in "$dev"/ports/*; do
      if port_is_active "$port"; then echo "${dev##*/}"; break; fi
    done
  done | LC_ALL=C sort -V
}

# pci_components <path>: the PCI device's realpath below devices/, '/'-separated (pci0000:00/0000:00:01.0/...).
pci_components() {
  local p
  p="$(readlink -f "$1" 2>/dev/null)" || return 1
  case "$p" in "$DEVICES_DIR"/*) printf '%s' "${p#"$DEVICES_DIR"/}" ;; *) return 1 ;; esac
}

numa_of() { local n; n="$(read_file "$1/numa_node")" || n=-1; printf '%s' "${n:--1}"; }

# common_depth <a> <b>: number of leading path components shared by two pci_components strings.
common_depth() {
  local IFS=/ depth=0 i
  local -a a b
  read -ra a <<< "$1"; read -ra b <<< "$2"
  for ((i = 0; i < ${#a[@]} && i < ${#b[@]}; i++)); do
    [ "${a[i]}" == "${b[i]}" ] || break
    depth=$((depth + 1))
  done
  echo "$depth"
}

# gpus: PCI addresses of NVIDIA display/3D controllers, in address order.
gpus() {
  local d vendor class
  for d in "$SYSFS_ROOT"/bus/pci/devices/*; do
    vendor="$(read_file "$d/vendor")" || continue
    class="$(read_file "$d/class")" || continue
    [ "$vendor" == "0x10de" ] || continue
    case "$class" in 0x0300*|0x0302*) echo "${d##*/}" ;; esac
  done | LC_ALL=C sort
}

mode="${1:-}"
case "$mode" in
  cpu|gpu) ;;
  *) die "usage: get_rdma_nics.sh cpu|gpu" 2 ;;
esac

mapfile -t nics < <(active_nics)
[ "${#nics[@]}" -gt 0 ] || die "no RDMA device with an active port under $SYSFS_ROOT/class/infiniband"

if [ "$mode" == cpu ]; then
  (IFS=,; echo "KVCACHE_RDMA_NICS=${nics[*]}")
  exit 0
fi

mapfile -t gpu_list < <(gpus)
[ "${#gpu_list[@]}" -gt 0 ] || die "no NVIDIA GPU (vendor 0x10de, class 0x0300/0x0302) under $SYSFS_ROOT/bus/pci/devices"

declare -a nic_path nic_numa
for i in "${!nics[@]}"; do
  nic_path[i]="$(pci_components "$SYSFS_ROOT/class/infiniband/${nics[i]}/device")" || nic_path[i]=""
  nic_numa[i]="$(numa_of "$SYSFS_ROOT/class/infiniband/${nics[i]}/device")"
done

chosen=()
for gpu in "${gpu_list[@]}"; do
  gpu_dev="$SYSFS_ROOT/bus/pci/devices/$gpu"
  gpath="$(pci_components "$gpu_dev")" || gpath=""
  gnuma="$(numa_of "$gpu_dev")"
  best=""; best_depth=-1; best_numa=-1
  # nics[] is in name order and only a strictly better candidate replaces the best: ties go to the name.
  for i in "${!nics[@]}"; do
    depth=0
    [ -n "$gpath" ] && [ -n "${nic_path[i]}" ] && depth="$(common_depth "$gpath" "${nic_path[i]}")"
    same=0
    [ "$gnuma" -ge 0 ] 2>/dev/null && [ "$gnuma" == "${nic_numa[i]}" ] && same=1
    if [ "$depth" -gt "$best_depth" ] || { [ "$depth" -eq "$best_depth" ] && [ "$same" -gt "$best_numa" ]; }; then
      best="${nics[i]}"; best_depth="$depth"; best_numa="$same"
    fi
  done
  chosen+=("$best")
done
(IFS=,; echo "KVCACHE_RDMA_NICS=${chosen[*]}")
