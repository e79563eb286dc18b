#!/usr/bin/env bash
# The demo: a tiny Linux VM under QEMU, its serial console behind
# consoleproxy with a console log, and the commands to try.
# Needs qemu-system-x86 (apt-get install qemu-system-x86 socat netcat-openbsd).
# Usage: scripts/demo.sh          run until Ctrl-C
#        scripts/demo.sh --check  boot, run one command through the proxy, exit
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
[ "${1:-}" = --check ] && check=true

if ! command -v qemu-system-x86_64 >/dev/null; then
  echo "the demo needs QEMU: apt-get install qemu-system-x86 socat netcat-openbsd" >&2
  exit 1
fi
scripts/guest-assets.sh
if [ ! -x ./consoleproxy ]; then
  echo "building consoleproxy"
  CGO_ENABLED=0 go build -o consoleproxy ./cmd/consoleproxy
fi

dir=$(mktemp -d /tmp/consoleproxy-demo.XXXXXX)
# KVM only where the CPU offers it; nested software hypervisors fail with it.
accel=tcg
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then accel=kvm; fi

./consoleproxy --upstream "unix:$dir/serial.sock" --listen "$dir/console.sock" \
  --listen-ro "$dir/console-ro.sock" --console-log "$dir/console.log" 2>"$dir/consoleproxy.log" &
proxy=$!
boot() {
  qemu-system-x86_64 -accel "$accel" -m 256 -nodefaults -no-reboot -display none -monitor none \
    -kernel .cache/guest/vmlinuz -initrd .cache/guest/initramfs.cpio.gz -append "console=ttyS0 panic=-1" \
    -chardev "socket,id=s0,path=$dir/serial.sock,server=on,wait=off" -serial chardev:s0 &
  qemu=$!
}
boot
cleanup() {
  kill "$qemu" 2>/dev/null || true
  kill -TERM "$proxy" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

echo "booting a VM under QEMU ($accel); its console log: $dir/console.log"
for _ in $(seq 1 1200); do
  grep -q CONSOLEPROXY-GUEST-READY "$dir/console.log" 2>/dev/null && break
  sleep 0.1
done
if ! grep -q CONSOLEPROXY-GUEST-READY "$dir/console.log"; then
  echo "the VM did not boot; consoleproxy's log:" >&2
  cat "$dir/consoleproxy.log" >&2
  exit 1
fi

if $check; then
  # Through the proxy, as a user would: type a command, read its answer.
  answer=$(printf 'echo $((20000+3))\n' | timeout 30 socat -t 5 - "UNIX-CONNECT:$dir/console.sock" | tr -d '\r' | grep -x 20003 || true)
  if [ "$answer" != 20003 ]; then
    echo "demo check failed: no answer through the proxy" >&2
    exit 1
  fi
  echo "demo check passed: the VM booted and answered through consoleproxy"
  exit 0
fi

cat <<MSG

The VM is up. In other terminals, try:

  socat -,raw,echo=0,escape=0x0f UNIX-CONNECT:$dir/console.sock   # a shell in the VM (Ctrl-O quits)
  nc -U $dir/console-ro.sock                                     # a read-only viewer, with the boot replayed
  printf 'uname -a\n' | nc -N -U $dir/console.sock               # one command, and its answer
  tail -F $dir/console.log                                       # the console log

Several at once is the point: each sees the boot history, then live output.
Restart the VM and watch the clients stay attached: press Enter here.
Ctrl-C stops the demo.
MSG
while read -r _; do
  kill "$qemu" 2>/dev/null || true
  wait "$qemu" 2>/dev/null || true
  echo "VM killed; booting it again on the same socket"
  boot
done
wait "$qemu"
