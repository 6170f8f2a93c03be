#!/bin/busybox sh
# /init of the vmgrid guest initramfs: load the virtio and CD-ROM modules, mount the root disk,
# hand over to guestd's PID 1 (python3 -m guestd.init).
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read m; do
  insmod "/lib/modules/$m" || echo "initramfs: cannot load $m"
done < /modules.load
root=/dev/vda
for word in $(cat /proc/cmdline); do
  case "$word" in root=*) root="${word#root=}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
  echo "initramfs: cannot mount the root disk $root"; exec sh
fi
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /usr/bin/python3 -m guestd.init
