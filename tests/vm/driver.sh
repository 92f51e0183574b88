#!/usr/bin/env bash
# Builds driver/utmem.ko for the guest kernel that tests/vm/run.sh boots (Debian's
# cloud kernel), against that kernel's headers downloaded and extracted, not installed.
# Usage: tests/vm/driver.sh [CACHE]   (CACHE defaults to target/vm in the repo)
# Output: CACHE/driver/utmem.ko (its path is printed on stdout); progress on stderr.
# Cached: headers are downloaded once per kernel release, the module is rebuilt only
# when driver/ or include/utmem_device.h is newer than it.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${1:-$ROOT/target/vm}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

log() { echo "tests/vm/driver: $*" >&2; }
die() { log "$*"; exit 1; }

# ---- build tools (the headers' Makefile uses gcc-12; objtool needs libelf) ------
missing=()
command -v gcc-12 >/dev/null || missing+=(gcc)
command -v make >/dev/null || missing+=(make)
dpkg-query -W -f='${Status}' libelf1 2>/dev/null | grep -q "ok installed" || missing+=(libelf1)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null ||
        die "cannot install ${missing[*]}"
fi

# ---- which kernel ------------------------------------------------------------------
# The release string inside a bzImage (boot protocol: kernel_version at 0x20e).
bzimage_release() {
    local off
    off=$(od -An -tu2 -j $((0x20e)) -N2 "$1" | tr -d ' ')
    [ -n "$off" ] && [ "$off" -gt 0 ] || return 1
    dd if="$1" bs=1 skip=$((off + 0x200)) count=200 2>/dev/null | tr '\0' '\n' | head -1 | cut -d' ' -f1
}
# Same resolution as run.sh's prepare_kernel.
resolve_image_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1
}

if [ -f "$CACHE/kernel/vmlinuz" ]; then
    # run.sh boots this cached image: build for exactly it.
    KREL=$(bzimage_release "$CACHE/kernel/vmlinuz") ||
        die "cannot read the release of $CACHE/kernel/vmlinuz"
    log "guest kernel (cached image): $KREL"
else
    pkg=$(resolve_image_pkg)
    if [ -z "$pkg" ]; then
        $SUDO apt-get update -qq
        pkg=$(resolve_image_pkg)
    fi
    [ -n "$pkg" ] || die "cannot resolve the Debian cloud kernel package (apt-cache depends linux-image-cloud-amd64)"
    KREL=${pkg#linux-image-}
    log "guest kernel (apt): $KREL"
fi
case "$KREL" in
    [0-9]*.[0-9]*-cloud-amd64) ;;
    *) die "unexpected kernel release '$KREL'" ;;
esac

# ---- headers -----------------------------------------------------------------------
HDR=$CACHE/headers
KDIR=$HDR/usr/src/linux-headers-$KREL
if [ "$(cat "$HDR/.release" 2>/dev/null)" != "$KREL" ] || [ ! -f "$KDIR/Makefile" ]; then
    series=$(echo "$KREL" | cut -d. -f1,2)          # 6.1
    abi=${KREL%-cloud-amd64}                        # 6.1.0-NN
    ver=$(apt-cache show --no-all-versions "linux-headers-$KREL" 2>/dev/null | sed -n 's/^Version: //p' | head -1)
    if [ -z "$ver" ]; then
        $SUDO apt-get update -qq
        ver=$(apt-cache show --no-all-versions "linux-headers-$KREL" 2>/dev/null | sed -n 's/^Version: //p' | head -1)
    fi
    [ -n "$ver" ] || die "apt knows no linux-headers-$KREL (if $CACHE/kernel is an old image, delete it and rerun tests/vm/run.sh)"
    pkgs=("linux-headers-$KREL=$ver" "linux-headers-$abi-common=$ver" "linux-kbuild-$series=$ver")
    log "downloading ${pkgs[*]} (extracted, not installed)"
    t0=$SECONDS
    rm -rf "$HDR.tmp" && mkdir -p "$HDR.tmp/debs"
    (cd "$HDR.tmp/debs" && apt-get download -q "${pkgs[@]}") > "$HDR.tmp/apt.log" 2>&1 ||
        { cat "$HDR.tmp/apt.log" >&2; die "cannot download the kernel headers"; }
    for d in "$HDR.tmp"/debs/*.deb; do dpkg -x "$d" "$HDR.tmp/root"; done
    # The Makefile includes /usr/src/linux-headers-$abi-common: point it at our copy.
    sed -i "s|/usr/src/|$HDR/usr/src/|g" "$HDR.tmp/root/usr/src/linux-headers-$KREL/Makefile"
    echo "$KREL" > "$HDR.tmp/root/.release"
    rm -rf "$HDR" && mv "$HDR.tmp/root" "$HDR" && rm -rf "$HDR.tmp"
    # The Makefile was rewritten with the final path before the move.
    grep -q "^include $HDR/usr/src/" "$KDIR/Makefile" || die "unexpected headers Makefile: $(cat "$KDIR/Makefile")"
    log "headers ready in $((SECONDS - t0)) s"
fi

# ---- module ------------------------------------------------------------------------
OUT=$CACHE/driver
KO=$OUT/utmem.ko
vermagic() {
    if command -v modinfo >/dev/null; then
        modinfo -F vermagic "$1"
    else
        objcopy -O binary --only-section=.modinfo "$1" /dev/stdout | tr '\0' '\n' | sed -n 's/^vermagic=//p'
    fi
}
stale=yes
if [ -f "$KO" ] && [ "$(vermagic "$KO" | cut -d' ' -f1)" = "$KREL" ] &&
    [ -z "$(find driver include/utmem_device.h -newer "$KO" -print -quit)" ]; then
    stale=no
fi
if [ $stale = yes ]; then
    log "building utmem.ko for $KREL"
    t0=$SECONDS
    B=$OUT/build
    rm -rf "$B" && mkdir -p "$B/driver" "$B/include"
    cp driver/utmem.c driver/Kbuild driver/Makefile "$B/driver/"
    cp include/utmem_device.h "$B/include/"
    make -s -C "$B/driver" KDIR="$KDIR" > "$B/make.log" 2>&1 ||
        { cat "$B/make.log" >&2; die "module build failed"; }
    # Warnings (other than kbuild's BTF notice) are worth seeing.
    grep -v "Skipping BTF generation" "$B/make.log" >&2 || true
    strip --strip-debug -o "$KO.tmp" "$B/driver/utmem.ko"
    mv "$KO.tmp" "$KO"
    log "built in $((SECONDS - t0)) s"
fi
vm=$(vermagic "$KO")
[ "$(echo "$vm" | cut -d' ' -f1)" = "$KREL" ] ||
    die "vermagic of $KO is '$vm', but the guest kernel is $KREL"
echo "$KO"
