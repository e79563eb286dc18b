#!/usr/bin/env bash
# A Cloud Hypervisor VM whose serial console consoleproxy serves.
# Usage: run-vm.sh NAME KERNEL DISK
set -euo pipefail
name=$1 kernel=$2 disk=$3
dir=/run/vms/$name
mkdir -p "$dir"

# The proxy first: it waits for the VMM's socket and attaches the moment it
# appears, so not a byte of the boot is lost even on Cloud Hypervisor
# versions that drop output while nobody is connected.
consoleproxy --upstream "unix:$dir/serial.sock" --listen "$dir/console.sock" \
  --console-log "/var/log/consoleproxy/$name/console.log" &

exec cloud-hypervisor \
  --api-socket "$dir/api.sock" \
  --kernel "$kernel" \
  --disk path="$disk" \
  --cmdline "console=ttyS0 root=/dev/vda1 rw" \
  --cpus boot=2 --memory size=1G \
  --serial socket="$dir/serial.sock" \
  --console off
