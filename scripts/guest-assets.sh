#!/usr/bin/env bash
# Prepares a tiny Linux guest for the QEMU end-to-end test and the demo,
# from Debian packages only, cached in .cache/guest (git-ignored):
#   vmlinuz            the kernel of linux-image-cloud-amd64, which has the
#                      8250 serial console built in (console=ttyS0 works
#                      without modules)
#   initramfs.cpio.gz  busybox-static and an init that prints a banner and
#                      runs a shell on the serial console
# Needs apt-get (download only; nothing is installed) and dpkg-deb.
# Usage: scripts/guest-assets.sh [DIR]   (default: .cache/guest)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.cache/guest}
# The cache is keyed by this script, so a changed init is rebuilt.
stamp=$(sha256sum scripts/guest-assets.sh | cut -c1-16)
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "guest assets ready in $out"
  exit 0
fi
mkdir -p "$out"
work=$(mktemp -d)
chmod 755 "$work" # apt-get download runs as _apt where it can
trap 'rm -rf "$work"' EXIT

cd "$work"
# The metapackage names the versioned image package; download that one.
image=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)
if [ -z "$image" ]; then
  echo "cannot resolve linux-image-cloud-amd64 (run apt-get update first)" >&2
  exit 1
fi
apt-get download -q "$image" busybox-static >/dev/null
dpkg-deb -x linux-image-*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
cd - >/dev/null
cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz.tmp"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo
echo "CONSOLEPROXY-GUEST-READY $(uname -r)"
# The kernel writes to the console at any moment, even in the middle of a
# line the shell is writing (late boot messages such as the TSC
# recalibration come after the prompt). The boot log is what tests and the
# demo replay; after it, only emergencies may interleave with the shell.
dmesg -n 1
# A shell on the serial console, with it as the controlling terminal.
exec setsid cttyhack sh -l
INIT
chmod 755 "$root/init"
( cd "$root" && find . | "$work/busybox/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -9 ) > "$out/initramfs.cpio.gz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "$stamp" > "$out/stamp"
echo "guest assets ready in $out ($image, busybox-static)"
