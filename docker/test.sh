#!/usr/bin/env bash
# The compose stack, tested: builds the images (docker/build.sh's steps), starts
# docker/docker-compose.yml under a project of its own, and checks UTMEM.SET/GET through
# it, that each tenant is its own identity with its own pools and quota (tenant A never
# reads tenant B's values), and that Redis survives a restart of the utmem-hostd
# container (stays up, answers -UTMEMLOST for what it had offloaded, offloads new values).
# Removes what it started: containers, network, volumes, and the dockerd if it started it.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_PREFIX=docker-test
. docker/lib.sh
[ "$(id -u)" -eq 0 ] || { say "run as root (dockerd, apt)"; exit 1; }
command -v redis-cli >/dev/null || { say "redis-cli is missing: run scripts/setup"; exit 1; }
start=$SECONDS

PROJECT=utmem-test-$$
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export UTMEM_PORT_A UTMEM_PORT_B
UTMEM_PORT_A=$(free_port)
UTMEM_PORT_B=$(free_port)
compose() { docker-compose -p "$PROJECT" -f docker/docker-compose.yml "$@"; }
WORK=$(mktemp -d /tmp/utmem-docker-test.XXXXXX)
STACK_UP=""

cleanup() {
    local rc=$?
    if [ -n "$STACK_UP" ]; then
        if [ $rc -ne 0 ]; then
            say "FAILED; the containers' logs:"
            compose logs --no-color --tail 30 >&2 || true
        fi
        say "removing the stack (containers, network, volumes)"
        compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
        local left
        left=$( (docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"
            docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT"
            docker network ls -q --filter "label=com.docker.compose.project=$PROJECT") 2>&1)
        if [ -n "$left" ]; then
            say "FAILED: left behind by docker-compose down: $left"
            [ $rc -ne 0 ] || rc=1
        fi
    fi
    docker_stop
    rm -rf "$WORK"
    if [ $rc -eq 0 ]; then say "passed in $((SECONDS - start)) s"; fi
    exit $rc
}
trap cleanup EXIT

fail() {
    say "FAILED: $*"
    exit 1
}
cli() {
    local port=$1
    shift
    redis-cli -p "$port" "$@"
}
A=$UTMEM_PORT_A
B=$UTMEM_PORT_B
info() { cli "$1" INFO utmem | tr -d '\r' | awk -F: -v f="utmem_$2" '$1 == f { print $2 }'; }
# The host's view (admin socket, JSON): `host FIELD IDENTITY [POOL]` prints that
# identity's (or its pool's) bytes or values, 0 when it has none.
host() {
    compose exec -T hostd utmem-hostd stats --json --admin /run/utmem-admin/admin.sock |
        python3 -c 'import json, sys
field, ident, pool = sys.argv[1], sys.argv[2], (sys.argv[3:] or [None])[0]
n = 0
for i in json.load(sys.stdin)["identities"]:
    if i["name"] == ident:
        n = i[field] if pool is None else sum(p[field] for p in i["pools"] if p["name"] == pool)
print(n)' "$@"
}
wait_for() {
    local what=$1 i
    shift
    for i in $(seq 150); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    fail "timed out waiting for $what"
}
connected() { [ "$(info "$1" connected)" = 1 ]; }
same() { # port key file: UTMEM.GET returns exactly the file's bytes
    cli "$1" --raw UTMEM.GET "$2" | head -c "$(stat -c %s "$3")" | cmp -s - "$3"
}

docker_tools
docker_start
build_images

say "docker-compose up (project $PROJECT; tenant A on 127.0.0.1:$A, tenant B on 127.0.0.1:$B)"
STACK_UP=1
compose up -d >/dev/null 2>&1 || { compose up -d; fail "docker-compose up"; }
wait_for "tenant A" cli "$A" PING
wait_for "tenant B" cli "$B" PING
wait_for "tenant A to reach utmem-hostd" connected "$A"
wait_for "tenant B to reach utmem-hostd" connected "$B"

say "each tenant is its own uid identity"
ida=$(compose exec -T tenant-a utmem --connect unix:/run/utmem/utmem.sock ping)
idb=$(compose exec -T tenant-b utmem --connect unix:/run/utmem/utmem.sock ping)
grep -q "uid:1001" <<<"$ida" || fail "tenant A is not uid:1001: $ida"
grep -q "uid:1002" <<<"$idb" || fail "tenant B is not uid:1002: $idb"

say "UTMEM.SET/GET through the stack; the same key name holds each tenant's own bytes"
head -c 100000 /dev/urandom >"$WORK/a"
head -c 100000 /dev/urandom >"$WORK/b"
[ "$(cli "$A" -x UTMEM.SET k <"$WORK/a")" = OK ] || fail "UTMEM.SET on tenant A"
[ "$(cli "$B" -x UTMEM.SET k <"$WORK/b")" = OK ] || fail "UTMEM.SET on tenant B"
[ "$(info "$A" offloaded_values)" = 1 ] || fail "tenant A did not offload its value"
[ "$(info "$B" offloaded_values)" = 1 ] || fail "tenant B did not offload its value"
same "$A" k "$WORK/a" || fail "tenant A's UTMEM.GET is not tenant A's value"
same "$B" k "$WORK/b" || fail "tenant B's UTMEM.GET is not tenant B's value"
# Same machine, local socket, uid identity: reads come straight from the mapped arena.
[ "$(info "$A" mapped_reads)" -ge 1 ] || fail "tenant A's read was not a mapped read"
[ "$(host bytes uid:1001)" = 100000 ] || fail "the host does not hold exactly tenant A's bytes for uid:1001"
[ "$(host bytes uid:1002)" = 100000 ] || fail "the host does not hold exactly tenant B's bytes for uid:1002"

say "tenant A cannot reach tenant B's pool, even by its name"
pool_b=$(info "$B" pool)
[ "$(host values uid:1002 "$pool_b")" = 1 ] || fail "tenant B's pool $pool_b does not hold its value"
# From tenant A's container (uid 1001) that name opens a pool of uid:1001: a different, empty one.
stats_ab=$(compose exec -T tenant-a utmem --connect unix:/run/utmem/utmem.sock --pool "$pool_b" stats)
grep -q "^identity *uid:1001" <<<"$stats_ab" || fail "tenant A's CLI is not uid:1001: $stats_ab"
for oid in 0 1 2; do
    if compose exec -T tenant-a utmem --connect unix:/run/utmem/utmem.sock --pool "$pool_b" get "$oid" >/dev/null 2>&1; then
        fail "tenant A read object $oid under tenant B's pool name"
    fi
done
[ "$(host values uid:1001 "$pool_b")" = 0 ] || fail "uid:1001's pool named $pool_b is not empty"
[ "$(host bytes uid:1002 "$pool_b")" = 100000 ] || fail "tenant B's pool changed"

say "tenant B's quota (2M in utmem-hostd.toml): the host takes up to it, the rest stays in Redis"
for i in $(seq 1 40); do
    cli "$B" -x UTMEM.SET "q$i" <"$WORK/b" >/dev/null
done
[ "$(info "$B" no_space_fallbacks)" -ge 1 ] || fail "tenant B never hit its quota"
hb=$(host bytes uid:1002)
[ "$hb" -le $((2 << 20)) ] || fail "the host holds $hb bytes for uid:1002, over its 2M quota"
[ "$(host bytes uid:1001)" = 100000 ] || fail "tenant B's quota spilled into tenant A"
same "$B" q40 "$WORK/b" || fail "a value kept in Redis over quota is not readable"
same "$B" q1 "$WORK/b" || fail "an offloaded value of tenant B is not readable"

say "restarting the utmem-hostd container"
run_id() { cli "$1" INFO server | tr -d '\r' | awk -F: '$1 == "run_id" { print $2 }'; }
run_a=$(run_id "$A")
run_b=$(run_id "$B")
compose restart -t 10 hostd >/dev/null 2>&1
wait_for "utmem-hostd to answer again" host bytes uid:1001
# The module reconnects when it next needs the host: the read first finds the host gone
# (-UTMEMDOWN while reconnecting), then the restarted host has no such value.
lost=""
for _ in $(seq 150); do
    lost=$(cli "$A" UTMEM.GET k 2>&1 | head -c 200 || true)
    case "$lost" in
    UTMEMLOST*) break ;;
    UTMEMDOWN*) sleep 0.2 ;;
    *) fail "UTMEM.GET of a value the restarted host lost answered: $lost" ;;
    esac
done
[[ "$lost" == UTMEMLOST* ]] || fail "no -UTMEMLOST after the host restart; last answer: $lost"
say "  tenant A: $lost"
[ "$(run_id "$A")" = "$run_a" ] || fail "tenant A's Redis restarted with the host"
[ "$(run_id "$B")" = "$run_b" ] || fail "tenant B's Redis restarted with the host"
[ "$(info "$A" lost_values)" = 1 ] || fail "tenant A does not count the lost value"
connected "$A" || fail "tenant A is not connected to the restarted host"
head -c 100000 /dev/urandom >"$WORK/a2"
[ "$(cli "$A" -x UTMEM.SET k2 <"$WORK/a2")" = OK ] || fail "UTMEM.SET after the restart"
[ "$(host bytes uid:1001)" = 100000 ] || fail "the new value did not go to the restarted host"
[ "$(host values uid:1001)" = 1 ] || fail "the restarted host holds other values of tenant A"
same "$A" k2 "$WORK/a2" || fail "the new value reads back wrong"
[ "$(cli "$B" -x UTMEM.SET k3 <"$WORK/a2")" = OK ] || fail "UTMEM.SET on tenant B after the restart"
b_offloads() { [ "$(host bytes uid:1002)" -ge 100000 ]; }
wait_for "tenant B to offload to the restarted host" b_offloads
