# Shared by docker/build.sh, docker/test.sh and docker/setup-test.sh (sourced, not run).
# Docker without any image registry (see the README's "Docker" section): Debian's
# docker.io, a dockerd we start ourselves when none runs, and a base image made locally
# with debootstrap from the Debian mirror.

BASE_IMAGE=utmem/bookworm:base
# The legacy builder: BuildKit would need buildx, which bookworm lacks.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

say() { echo "${LOG_PREFIX:-docker}: $*" >&2; }

# Installs docker.io, debootstrap and docker-compose when missing.
docker_tools() {
    local need=()
    command -v dockerd >/dev/null || need+=(docker.io)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v docker-compose >/dev/null || need+=(docker-compose)
    if [ ${#need[@]} -gt 0 ]; then
        say "installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
}

# Starts dockerd unless one answers already; docker_stop stops only the one started here.
DOCKERD_PID=""
docker_start() {
    if docker info >/dev/null 2>&1; then
        say "using the running dockerd"
        return
    fi
    DOCKERD_LOG=$(mktemp /tmp/utmem-dockerd.XXXXXX.log)
    say "starting dockerd (log: $DOCKERD_LOG)"
    dockerd --storage-driver=overlay2 >"$DOCKERD_LOG" 2>&1 &
    DOCKERD_PID=$!
    local _
    for _ in $(seq 150); do
        docker info >/dev/null 2>&1 && return
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.2
    done
    say "dockerd did not start:"
    tail -20 "$DOCKERD_LOG" >&2
    return 1
}

docker_stop() {
    [ -n "$DOCKERD_PID" ] || return 0
    say "stopping the dockerd started here (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null || true
    local _
    for _ in $(seq 100); do
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.2
    done
    wait "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=""
    rm -f "$DOCKERD_LOG"
}

# The Debian mirror this machine uses (the `bookworm` entry of its apt sources).
debian_mirror() {
    local m=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        m=$(awk '/^URIs:/ { u = $2 } /^Suites:.*(^| )bookworm( |$)/ { print u; exit }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
        m=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

# Makes $BASE_IMAGE (a minimal Debian 12) when it is missing; ~1 minute, then cached.
base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        return
    fi
    local rootfs mirror
    rootfs=$(mktemp -d /tmp/utmem-rootfs.XXXXXX)
    mirror=$(debian_mirror)
    say "making $BASE_IMAGE with debootstrap from $mirror (about a minute, once)"
    if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
        tail -20 "$rootfs.log" >&2
        rm -rf "$rootfs" "$rootfs.log"
        return 1
    fi
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
}

# Builds the binaries here (release; UTMEM_PROFILE=debug for a debug build, as CI does
# to share scripts/test's build) and the images utmem/hostd and utmem/redis from them.
build_images() {
    local profile=${UTMEM_PROFILE:-release} ctx image bin
    local target=${CARGO_TARGET_DIR:-target}/$profile flags=(--locked)
    [ "$profile" = debug ] || flags+=(--profile "$profile")
    say "cargo build ${flags[*]} (utmem-hostd, utmem, libredis_utmem.so)"
    cargo build "${flags[@]}" -p utmem-host -p utmem-client -p redis-utmem
    base_image
    ctx=$(mktemp -d /tmp/utmem-docker-ctx.XXXXXX)
    cp docker/hostd.Dockerfile docker/redis.Dockerfile docker/utmem-hostd.toml "$ctx/"
    # Builds carry debug info (release keeps some for perf); images need none.
    for bin in utmem-hostd utmem libredis_utmem.so; do
        if command -v strip >/dev/null; then
            strip --strip-debug -o "$ctx/$bin" "$target/$bin"
        else
            cp "$target/$bin" "$ctx/$bin"
        fi
    done
    for image in hostd redis; do
        say "docker build utmem/$image"
        if ! docker build --network host -q -t "utmem/$image:latest" -f "$ctx/$image.Dockerfile" "$ctx" >"$ctx/build.log" 2>&1; then
            cat "$ctx/build.log" >&2
            rm -rf "$ctx"
            return 1
        fi
    done
    rm -rf "$ctx"
}
