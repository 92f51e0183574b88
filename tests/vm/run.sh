#!/usr/bin/env bash
# Boots two Linux guests under QEMU (TCG) whose AF_VSOCK reaches utmem-hostd on this
# host through vhost-device-vsock (hybrid vsock: a guest's connection to CID 2 port P
# lands on the host Unix socket <uds>_P), and runs utmem-vmtest plus redis-server with
# the module inside each. Prints each guest's closing `vmtest: N passed, M failed` line;
# exits non-zero on any failure or timeout. Cached under target/vm/.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=$ROOT/target/vm
PORT=7719
mkdir -p "$CACHE"

die() { echo "tests/vm: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "missing $1: $2"; }

# ---- prerequisites -------------------------------------------------------------
install_prereqs() {
    local SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    # busybox must be the static build (busybox-static): the guest has no libc of its own.
    if ! command -v qemu-system-x86_64 >/dev/null || ! command -v busybox >/dev/null ||
        ldd "$(command -v busybox)" >/dev/null 2>&1; then
        if [ ! -f /etc/apt/sources.list.d/bookworm-backports.sources ] && ! grep -rqs bookworm-backports /etc/apt/sources.list.d/; then
            printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' |
                $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
        fi
        echo "tests/vm: installing qemu-system-x86 and busybox-static (bookworm-backports)" >&2
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports \
            qemu-system-x86 qemu-utils busybox-static >/dev/null ||
            die "cannot install qemu-system-x86 / busybox-static from bookworm-backports"
    fi
    if ! command -v cpio >/dev/null; then
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cpio >/dev/null || die "cannot install cpio"
    fi
    if ! command -v vhost-device-vsock >/dev/null; then
        echo "tests/vm: installing vhost-device-vsock 0.3.0 (cargo install)" >&2
        cargo install --locked --quiet vhost-device-vsock@0.3.0 ||
            die "cannot install vhost-device-vsock 0.3.0 from crates.io"
    fi
    need qemu-system-x86_64 "apt-get install -t bookworm-backports qemu-system-x86"
    need vhost-device-vsock "cargo install vhost-device-vsock@0.3.0"
    need redis-server "apt-get install redis-server"
    need redis-benchmark "apt-get install redis-tools"
}

# ---- guest kernel ----------------------------------------------------------------
prepare_kernel() {
    [ -f "$CACHE/kernel/vmlinuz" ] && return
    local pkg
    pkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1)
    [ -n "$pkg" ] || die "cannot resolve the Debian cloud kernel package"
    echo "tests/vm: downloading $pkg (extracted, not installed)" >&2
    rm -rf "$CACHE/kernel.tmp" && mkdir -p "$CACHE/kernel.tmp"
    (cd "$CACHE/kernel.tmp" && apt-get download "$pkg" >/dev/null && dpkg -x ./*.deb root) ||
        die "cannot download $pkg"
    local k=$CACHE/kernel.tmp/root
    mkdir -p "$CACHE/kernel.tmp/out/modules"
    cp "$k"/boot/vmlinuz-* "$CACHE/kernel.tmp/out/vmlinuz"
    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
             vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
        f=$(find "$k/lib/modules" -name "$m.ko*" | head -1)
        [ -n "$f" ] || continue # built in
        case "$f" in
            *.xz) xz -dc "$f" > "$CACHE/kernel.tmp/out/modules/$m.ko" ;;
            *.zst) zstd -qdc "$f" > "$CACHE/kernel.tmp/out/modules/$m.ko" ;;
            *) cp "$f" "$CACHE/kernel.tmp/out/modules/$m.ko" ;;
        esac
    done
    rm -rf "$CACHE/kernel" && mv "$CACHE/kernel.tmp/out" "$CACHE/kernel" && rm -rf "$CACHE/kernel.tmp"
}

# ---- guest programs and initramfs --------------------------------------------------
build_guest() {
    echo "tests/vm: building the module, utmem-hostd and the static guest test binary" >&2
    cargo build --locked --quiet -p redis-utmem -p utmem-host
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --quiet \
        --target x86_64-unknown-linux-gnu -p utmem-vmtest
}

copy_with_libs() { # copy_with_libs FILE DEST_DIR_IN_ROOT
    local root=$1 f=$2 dest=$3
    mkdir -p "$root$dest"
    cp "$f" "$root$dest/"
    ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -nL "$lib" "$root$lib"
    done
}

make_initramfs() {
    local root=$CACHE/initramfs
    rm -rf "$root" && mkdir -p "$root"/{bin,dev,proc,sys,tmp,modules}
    cp "$(command -v busybox)" "$root/bin/busybox"
    cp "$CACHE"/kernel/modules/*.ko "$root/modules/" 2>/dev/null || true
    for b in redis-server redis-cli redis-benchmark; do
        copy_with_libs "$root" "$(command -v $b)" /bin
    done
    copy_with_libs "$root" "$ROOT/target/debug/libredis_utmem.so" /
    strip "$root/libredis_utmem.so"
    strip -o "$root/utmem-vmtest" "$ROOT/target/x86_64-unknown-linux-gnu/debug/utmem-vmtest"
    cp "$ROOT/tests/vm/init" "$root/init" && chmod +x "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$CACHE/initramfs.cpio.gz"
}

# ---- run -----------------------------------------------------------------------------
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

install_prereqs
prepare_kernel
build_guest
make_initramfs

W=$(mktemp -d /tmp/utmem-vm.XXXXXX)
UUID=5ec0a1d0-0000-4000-8000-000000000001
printf '[[shared]]\nuuid = "%s"\ngrant = ["nobody"]\n' "$UUID" > "$W/hostd.toml"
"$ROOT/target/debug/utmem-hostd" --config "$W/hostd.toml" --quota 64M --capacity 1G \
    --listen "unix:$W/vm-a.vsock_$PORT=vm-a" --listen "unix:$W/vm-b.vsock_$PORT=vm-b" \
    --admin "unix:$W/admin.sock" 2> "$W/hostd.log" &
PIDS+=($!)

boot() { # boot NAME CID ROLE
    local name=$1 cid=$2 role=$3
    vhost-device-vsock --vm "guest-cid=$cid,socket=$W/$name.vhost,uds-path=$W/$name.vsock" \
        > "$W/$name.vdv.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do [ -S "$W/$name.vhost" ] && break; sleep 0.1; done
    timeout 240 qemu-system-x86_64 -machine q35 -accel tcg -m 512M -smp 1 \
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
        -chardev socket,id=vs0,path="$W/$name.vhost" -device vhost-user-vsock-pci,chardev=vs0 \
        -kernel "$CACHE/kernel/vmlinuz" -initrd "$CACHE/initramfs.cpio.gz" \
        -append "console=ttyS0 quiet panic=-1 vmtest.id=$name vmtest.role=$role" \
        -display none -monitor none -serial "file:$W/$name.serial" -no-reboot &
    QPID=$!
}

for _ in $(seq 50); do [ -S "$W/admin.sock" ] && break; sleep 0.1; done
boot vm-a 3 filler
QA=$QPID
boot vm-b 4 keeper
QB=$QPID
rc=0
wait "$QA" || rc=1
wait "$QB" || rc=1

status=0
for name in vm-a vm-b; do
    line=$(grep -a "^vmtest: [0-9]* passed, [0-9]* failed" "$W/$name.serial" | tail -1 | tr -d '\r')
    grep -a "^vmtest: FAIL" "$W/$name.serial" | tr -d '\r' | sed "s/^/$name: /" || true
    if [ -z "$line" ]; then
        echo "$name: no vmtest line (timeout or crash); serial log:"
        tail -30 "$W/$name.serial"
        status=1
        continue
    fi
    echo "$name: $line"
    case "$line" in *" 0 failed") ;; *) status=1 ;; esac
done
# Host side: the guests' bytes landed in their own identities and were freed after DEL.
stats=$("$ROOT/target/debug/utmem-hostd" stats --json --admin "$W/admin.sock")
python3 - "$stats" <<'PY' || status=1
import json, sys
s = json.loads(sys.argv[1])
ids = {i["name"]: i for i in s["identities"]}
ok = True
for vm in ("vm-a", "vm-b"):
    i = ids.get(vm)
    if not i or i["puts"] < 1000:
        print(f"host: {vm}: too few PUTs landed ({i and i['puts']})"); ok = False; continue
    left = [(p["name"], p["values"]) for p in i["pools"] if p["name"].startswith("redis-") and p["values"]]
    if left:
        print(f"host: {vm}: values left after DEL/FLUSHALL: {left}"); ok = False
    else:
        print(f"host: {vm}: {i['puts']} PUTs landed in its own pools, redis pools empty after DEL")
sys.exit(0 if ok else 1)
PY
[ $rc -eq 0 ] || { echo "tests/vm: a guest did not finish in time"; status=1; }
[ $status -eq 0 ] && rm -rf "$W" || echo "tests/vm: logs kept in $W"
exit $status
