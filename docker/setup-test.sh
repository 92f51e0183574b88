#!/usr/bin/env bash
# Proves scripts/setup on a clean system: in a fresh Debian 12 container (the local
# debootstrap minbase image: no compiler, no python3, no CA certificates) it runs
# scripts/setup, then `cargo build -p redis-utmem`, so a missing install step fails here
# instead of on a user's machine. The host's Rust toolchain is bind-mounted read-only,
# and so is this checkout (the build goes to a target folder inside the container; the
# host's target/ is never touched). Crates come from the host's registry cache
# (read-only) or crates.io; the machine's local CAs and /etc/pip.conf are passed in. Starts and stops its own dockerd when none runs.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_PREFIX=setup-test
. docker/lib.sh
[ "$(id -u)" -eq 0 ] || { say "run as root (dockerd, apt)"; exit 1; }
start=$SECONDS

RUSTUP_DIR=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_DIR=${CARGO_HOME:-$HOME/.cargo}
if [ ! -x "$CARGO_DIR/bin/cargo" ] || [ ! -d "$RUSTUP_DIR/toolchains" ]; then
    say "no rustup toolchain in $RUSTUP_DIR and $CARGO_DIR"
    exit 1
fi
mounts=(-v "$PWD:/src:ro" -v "$RUSTUP_DIR:/opt/rustup:ro" -v "$CARGO_DIR/bin:/opt/cargo/bin:ro")
[ ! -d "$CARGO_DIR/registry" ] || mounts+=(-v "$CARGO_DIR/registry:/opt/cargo-host/registry:ro")
# This machine's own TLS trust and pip settings (a site CA for the registries, say): the
# container's ca-certificates, once scripts/setup installs it, picks the local CAs up.
[ ! -d /usr/local/share/ca-certificates ] ||
    mounts+=(-v /usr/local/share/ca-certificates:/usr/local/share/ca-certificates:ro)
[ ! -f /etc/pip.conf ] || mounts+=(-v /etc/pip.conf:/etc/pip.conf:ro)

docker_tools
trap docker_stop EXIT
docker_start
base_image

# Inside: the toolchain is found through PATH as after `rustup` with its defaults; a
# writable CARGO_HOME starts from a copy of the host's crate cache (saves the downloads).
# shellcheck disable=SC2016 # expanded inside the container
inside='set -euo pipefail
[ ! -d /opt/cargo-host/registry ] || cp -a /opt/cargo-host/registry /opt/cargo/
cd /src
echo "setup-test: scripts/setup" >&2
scripts/setup
echo "setup-test: cargo build --locked -p redis-utmem" >&2
cargo build --locked -p redis-utmem
test -f /build/target/debug/libredis_utmem.so
echo "setup-test: built $(ls -l /build/target/debug/libredis_utmem.so)" >&2'

say "scripts/setup and cargo build -p redis-utmem in a fresh $BASE_IMAGE container"
docker run --rm --network host "${mounts[@]}" \
    -e RUSTUP_HOME=/opt/rustup -e CARGO_HOME=/opt/cargo -e CARGO_TARGET_DIR=/build/target \
    -e PATH=/opt/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    -e CARGO_TERM_COLOR=never \
    "$BASE_IMAGE" bash -c "$inside" ||
    { say "FAILED: scripts/setup left something out, or the build failed (see above)"; exit 1; }
say "passed in $((SECONDS - start)) s"
