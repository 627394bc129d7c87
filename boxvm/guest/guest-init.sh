#!/bin/sh
# boxvm guest init (stage 2, in the guest root): mount the container disk at /c,
# give it /proc, /sys, /dev and networking, then run the agent as PID 1.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
arg() { for w in $(cat /proc/cmdline); do case "$w" in "boxvm.$1="*) echo "${w#*=}";; esac; done; }
hostname "$(arg hostname)"
ip link set lo up
for b in /sys/block/vd*; do
    [ "$(cat $b/serial 2>/dev/null)" = boxvm-data ] && data=/dev/${b##*/}
done
mount -t ext4 -o noatime,noinit_itable "$data" /c || { echo "boxvm: cannot mount the container disk"; poweroff -f; }
for d in proc sys dev tmp etc; do [ -d /c/$d ] || mkdir -p /c/$d; done
mount -t proc proc /c/proc
mount -t sysfs sys /c/sys
mount --rbind /dev /c/dev
# The box's identity files live on tmpfs and are bind-mounted, as Docker does, so
# they never become part of the box's disk state.
echo "$(arg hostname)" > /run/hostname
echo "$(arg machine_id)" > /run/machine-id
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost\n' "$(arg hostname)" > /run/hosts
: > /run/resolv.conf
if [ "$(arg net)" = nat ]; then
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
    echo "nameserver 10.0.2.3" > /run/resolv.conf
fi
for f in hostname hosts resolv.conf machine-id; do
    [ -L /c/etc/$f ] && continue
    [ -e /c/etc/$f ] || : > /c/etc/$f
    mount --bind /run/$f /c/etc/$f
done
echo "boxvm: starting agent"
exec /usr/bin/python3.11 -u -X frozen_modules=on /opt/boxvm/agent.py
