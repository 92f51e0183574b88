#!/usr/bin/env bash
# Checks packaging/: `systemd-analyze verify` of utmem-hostd.service (skipped, loudly,
# where systemd-analyze is missing), then the unit's own ExecStart command line run for
# real with the example /etc/utmem/utmem-hostd.toml (paths moved to a temp folder): it
# must start, answer `stats` on its admin socket, and remove its sockets on SIGTERM.
# Builds utmem-hostd (release; UTMEM_PROFILE=debug for a debug build, as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "packaging: $*" >&2; }
UNIT=packaging/systemd/utmem-hostd.service
CONFIG=packaging/etc/utmem/utmem-hostd.toml
PROFILE=${UTMEM_PROFILE:-release}
flags=(--locked)
[ "$PROFILE" = debug ] || flags+=(--profile "$PROFILE")
# The same packages as docker/lib.sh builds (same features): in CI, nothing to rebuild.
cargo build "${flags[@]}" -p utmem-host -p utmem-client -p redis-utmem
HOSTD=$(realpath "${CARGO_TARGET_DIR:-target}/$PROFILE/utmem-hostd")
work=$(mktemp -d /tmp/utmem-packaging.XXXXXX)
pid=""
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The unit as installed, except that ExecStart's binary is this build's.
sed "s#/usr/local/bin/utmem-hostd#$HOSTD#" "$UNIT" >"$work/utmem-hostd.service"
if command -v systemd-analyze >/dev/null; then
    say "systemd-analyze verify $UNIT"
    # verify prints problems and exits 0 for some of them: any output is a failure.
    out=$(systemd-analyze verify "$work/utmem-hostd.service" 2>&1) || { echo "$out" >&2; exit 1; }
    [ -z "$out" ] || { echo "$out" >&2; say "FAILED: systemd-analyze verify complained"; exit 1; }
else
    say "SKIPPED systemd-analyze verify: systemd-analyze is not installed here"
fi

say "the unit's ExecStart with the example config"
exec_line=$(sed -n 's/^ExecStart=//p' "$work/utmem-hostd.service")
[ -n "$exec_line" ] || { say "FAILED: no ExecStart in $UNIT"; exit 1; }
mkdir -p "$work/run/utmem"
exec_line=${exec_line//\/etc\/utmem\/utmem-hostd.toml/$PWD/$CONFIG}
exec_line=${exec_line//\/run\/utmem\//$work/run/utmem/}
read -r -a argv <<<"$exec_line"
(umask 0007 && exec "${argv[@]}") >"$work/hostd.log" 2>&1 &
pid=$!
ok=""
for _ in $(seq 100); do
    # The admin socket comes up first, the listeners right after it.
    if [ -S "$work/run/utmem/utmem.sock" ] &&
        "$HOSTD" stats --admin "$work/run/utmem/admin.sock" >/dev/null 2>&1; then
        ok=1
        break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$ok" ] || { cat "$work/hostd.log" >&2; say "FAILED: utmem-hostd did not start with $CONFIG"; exit 1; }
mode=$(stat -c %a "$work/run/utmem/utmem.sock")
[ "$mode" = 770 ] || { say "FAILED: socket mode $mode under UMask=0007, expected 770"; exit 1; }
kill -TERM "$pid"
wait "$pid" || { cat "$work/hostd.log" >&2; say "FAILED: utmem-hostd did not exit cleanly on SIGTERM"; exit 1; }
pid=""
[ -z "$(ls -A "$work/run/utmem")" ] || { say "FAILED: sockets left behind: $(ls "$work/run/utmem")"; exit 1; }
say "passed"
