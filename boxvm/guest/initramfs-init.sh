#!/bin/busybox sh
# boxvm initramfs: load the virtio modules, find the guest root disk by its virtio
# serial, and hand over to the guest root's own init.
/bin/busybox mkdir -p /proc /sys /dev /newroot /bin /sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "boxvm: insmod $m failed"; done
find_disk() {
    for i in $(seq 1 200); do
        for b in /sys/block/vd*; do
            [ "$(cat $b/serial 2>/dev/null)" = "$1" ] && { echo /dev/${b##*/}; return 0; }
        done
        sleep 0.02
    done
    return 1
}
root=$(find_disk boxvm-guest) || { echo "boxvm: guest root disk not found"; poweroff -f; }
mount -t ext4 -o noatime "$root" /newroot || { echo "boxvm: cannot mount guest root"; poweroff -f; }
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/boxvm-init
