#!/usr/bin/env bash
# The hardened unit, booted for real: a Debian bookworm root made with debootstrap, the README's
# Pi install steps 1-5 run in it, then booted under systemd (252) with systemd-nspawn, where step 6
# (install and start the unit as shipped) runs and this script asserts that the service
#   - reaches "active (running)" and survives a watchdog period,
#   - serves the local app over HTTPS on loopback,
#   - delivers an approved request (doorbell-request send --wait against the container's
#     mosquitto; the evidence verifies),
#   - is restarted by the watchdog after `kill -STOP` and by Restart= after `kill -9`,
#   - stops cleanly and fast,
#   - keeps `systemd-analyze security` exposure at 2.0 or less.
# nspawn gets CAP_BPF and the bpf() system call so that DevicePolicy=closed is really enforced;
# --keep-unit --register=no because the host need not run systemd; a private network, so the
# container's broker and app are on its own loopback. Commands inside run through nsenter.
#
# Run as root. Packages are installed as needed; the root is cached in
# /var/cache/doorbell-agent-check (DOORBELL_CHECK_CACHE) and each run works in an overlay on it.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CHECK_NAME=systemd
# shellcheck source=scripts/lib/rootfs.sh
. scripts/lib/rootfs.sh

[ "$(id -u)" -eq 0 ] || die "run as root: debootstrap, nspawn and mounts need it"
T0=$(date +%s)
lap() { log "$1 ($(($(date +%s) - T0)) s so far)"; }

need_apt debootstrap systemd-container debian-archive-keyring

ROOT_PACKAGES=(python3 python3-venv mosquitto age ffmpeg sqlite3 systemd systemd-sysv dbus sudo
    ca-certificates)
BASE=$(build_root systemd amd64 "${ROOT_PACKAGES[@]}")
lap "root ready"

WORK=$(mktemp -d /var/tmp/doorbell-systemd.XXXXXX)
R="$WORK/root"
NSPAWN_PID=
cleanup() {
    local status=$? p
    set +e
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        [ -n "${LEADER:-}" ] && nsenter -t "$LEADER" -a -- systemctl poweroff 2>/dev/null
        for _ in $(seq 30); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 1; done
        kill -9 "$NSPAWN_PID" 2>/dev/null
    fi
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$R" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    sleep 0.5
    umount -R "$R" 2>/dev/null || umount -R -l "$R" 2>/dev/null
    rm -rf --one-file-system "$WORK"
    exit "$status"
}
trap cleanup EXIT
overlay_root "$BASE" "$WORK"
prepare_root "$R"
copy_source "$REPO" "$R/src"
install -d "$CHECK_CACHE/pip-amd64" "$CHECK_CACHE/apt-lists-amd64/partial"

# --- README steps 1-5 in a chroot (the host's network reaches Debian and PyPI) --------------
{
    echo 'set -euo pipefail'
    echo 'cd /src'
    cat <<'EOF'
edit_file() {
    case "$1" in
    */agent.yaml)
        cat >"$1" <<'YAML'
device_id: nspawn-check
state_dir: /var/lib/doorbell-agent
camera:
  source: synthetic
  fps: 5
  width: 320
  height: 240
recording:
  pre_roll: 1s
  post_roll: 1s
  max_clip: 5s
mqtt:
  host: 127.0.0.1
  port: 1883
app:
  bind: 127.0.0.1
  port: 8443
YAML
        ;;
    */mqtt-password) echo "not-used-by-this-broker" >"$1" ;;
    *) echo "edit_file: nothing to write for $1" >&2; return 1 ;;
    esac
}
EOF
    readme_pi_steps 1 5
} >"$R/root/install.sh"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount --make-rslave "$R/dev"
mount --bind "$CHECK_CACHE/pip-amd64" "$(install -d "$R/root/.cache/pip" && echo "$R/root/.cache/pip")"
mount --bind "$CHECK_CACHE/apt-lists-amd64" "$R/var/lib/apt/lists"
log "README steps 1-5 in the root:"
readme_pi_steps 1 5 | sed 's/^/    /' >&2
chroot "$R" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 \
    bash -x /root/install.sh >"$WORK/install.log" 2>&1 || {
    tail -40 "$WORK/install.log" >&2
    die "the README's install steps 1-5 failed"
}
umount -R "$R/proc" "$R/dev" "$R/root/.cache/pip" "$R/var/lib/apt/lists"
lap "installed as the README says"

# --- boot -------------------------------------------------------------------------------------
MACHINE="doorbell-check-$$"
setsid systemd-nspawn --quiet -D "$R" -M "$MACHINE" --boot --private-network \
    --capability=CAP_BPF --system-call-filter=bpf --keep-unit --register=no \
    </dev/null >"$WORK/console.log" 2>&1 &
NSPAWN_PID=$!
LEADER=
for _ in $(seq 60); do
    kill -0 "$NSPAWN_PID" 2>/dev/null || break
    LEADER=$(pgrep -P "$NSPAWN_PID" | head -1 || true)
    [ -n "$LEADER" ] && [ "$(cat "/proc/$LEADER/comm" 2>/dev/null)" = systemd ] && break
    LEADER=
    sleep 0.5
done
if [ -z "$LEADER" ]; then
    tail -30 "$WORK/console.log" >&2
    die "systemd-nspawn could not boot the root here (console above): this check cannot run in this sandbox"
fi
IN=(nsenter -t "$LEADER" -a -- /usr/bin/env -i
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root)
in_ct() { "${IN[@]}" "$@"; }
state=$(in_ct timeout 120 systemctl is-system-running --wait || true)
case "$state" in
running | degraded) ;;
*)
    tail -30 "$WORK/console.log" >&2
    die "the container's systemd did not finish booting (state: ${state:-none})"
    ;;
esac
[ "$state" = running ] || in_ct systemctl --failed --no-pager >&2
in_ct systemctl is-active --quiet mosquitto || die "mosquitto is not running in the container"
lap "booted: $(in_ct systemctl --version | head -1), system $state"

show() { in_ct systemctl show -P "$1" doorbell-agent; }
is_running() { [ "$(show ActiveState)/$(show SubState)" = active/running ]; }
assert_running() {
    local what=$1 active sub
    active=$(show ActiveState)
    sub=$(show SubState)
    [ "$active/$sub" = active/running ] || {
        in_ct journalctl -u doorbell-agent --no-pager -n 30 >&2
        die "$what: the service is $active ($sub), not active (running)"
    }
}
wait_for() { # wait_for SECONDS WHAT COMMAND...
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 2; i++)); do
        "$@" && return 0
        sleep 0.5
    done
    die "timed out after $limit s waiting for $what"
}
restarted() { # restarted OLDPID: a new main process is up and the unit is active (running)
    local pid
    pid=$(show MainPID)
    [ "$pid" != 0 ] && [ "$pid" != "$1" ] && is_running
}

# --- README step 6: the unit as shipped ---------------------------------------------------------
log "README step 6 in the container:"
readme_pi_steps 6 6 | sed 's/^/    /' >&2
{
    echo 'set -euo pipefail'
    echo 'cd /src'
    readme_pi_steps 6 6
} >"$R/root/step6.sh"
in_ct bash -x /root/step6.sh >"$WORK/step6.log" 2>&1 || {
    cat "$WORK/step6.log" >&2
    in_ct journalctl -u doorbell-agent --no-pager -n 40 >&2
    die "README step 6 failed"
}
grep -q 'Active: active (running)' "$WORK/step6.log" || die "systemctl status did not say active (running)"
assert_running "after enable --now"
lap "active (running) as shipped"

# Survive a watchdog period: the same process, no restart, still running.
PID=$(show MainPID)
WATCHDOG_S=$(python3 -c 'import re, sys
units = {"min": 60, "s": 1, "ms": 0.001}
print(int(sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(min|ms|s)", sys.argv[1]))))' \
    "$(show WatchdogUSec)")
[ "$WATCHDOG_S" -gt 0 ] || die "the unit has no watchdog (WatchdogUSec=$(show WatchdogUSec))"
log "waiting one watchdog period ($WATCHDOG_S s) plus 10 s"
sleep $((WATCHDOG_S + 10))
assert_running "after a watchdog period"
if [ "$(show MainPID)" != "$PID" ] || [ "$(show NRestarts)" != 0 ]; then
    die "the service was restarted during a quiet watchdog period"
fi
lap "survived a watchdog period"

# --- the local app over HTTPS on the container's loopback ---------------------------------------
in_ct /opt/doorbell-agent/venv/bin/python - <<'EOF' || die "the local app does not answer over HTTPS"
import ssl, urllib.request
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE  # the device's self-signed certificate; only loopback here
with urllib.request.urlopen("https://127.0.0.1:8443/login", context=ctx, timeout=30) as r:
    body = r.read().decode()
    assert r.status == 200 and "<form" in body, (r.status, body[:200])
    print(f"    app: HTTPS 200 on 127.0.0.1:8443/login ({r.headers['Content-Type']})")
EOF
lap "app served over HTTPS"

# --- an approved request is delivered -----------------------------------------------------------
AG=(sudo -u doorbell-agent doorbell-agent)
REQ=/opt/doorbell-agent/venv/bin/doorbell-request
in_ct "$REQ" keygen --id check-requester -o /root/requester >/dev/null
# The key as a JWK string: the service user cannot read root's key directory.
in_ct "${AG[@]}" requesters add --id check-requester --name "CI check" --kind neighbor \
    --key "$(cat "$R/root/requester/public-key.jwk")" >/dev/null || die "requesters add"
clips_final() { in_ct "${AG[@]}" clips list --json | python3 -c \
    'import json,sys; sys.exit(0 if sum(c["state"] == "final" for c in json.load(sys.stdin)) >= 2 else 1)'; }
wait_for 120 "two recorded clips" clips_final
FROM=$(date -u -d '-60 sec' +%Y-%m-%dT%H:%M:%SZ)
TO=$(date -u -d '-2 sec' +%Y-%m-%dT%H:%M:%SZ)
in_ct bash -c "cd /root && exec $REQ send --device nspawn-check --from $FROM --to $TO \
    --reason 'CI: boot check' --legal-basis consent --key /root/requester --wait \
    --timeout 5m -o /root/evidence" >"$WORK/send.log" 2>&1 &
SEND=$!
pending_one() { [ "$(in_ct "${AG[@]}" pending --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -ge 1 ]; }
wait_for 60 "the request to be pending" pending_one
JTI=$(in_ct "${AG[@]}" pending --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
in_ct "${AG[@]}" approve -- "$JTI" >&2 || die "approve $JTI"
if ! wait "$SEND"; then
    cat "$WORK/send.log" >&2
    die "doorbell-request send --wait did not receive the delivery"
fi
# send --wait has checked the manifest signature and every chunk's hash; `verify` re-checks the
# evidence offline against the device key pinned in the requester's key directory.
in_ct "$REQ" verify /root/evidence --key /root/requester \
    --identity /root/requester/age-identity.txt >&2 || die "the evidence does not verify"
checked="evidence verified offline"
in_ct find /root/evidence -type f | sed 's/^/    /' >&2
videos=$(in_ct find /root/evidence -name '*.mkv' -size +0 | wc -l)
[ "$videos" -ge 1 ] || die "no video in the evidence"
lap "approved request $JTI delivered ($videos video(s)); $checked"

# --- the watchdog restarts a stopped process ----------------------------------------------------
in_ct systemctl reset-failed doorbell-agent # StartLimitBurst counts every start, manual ones too
PID=$(show MainPID)
N=$(show NRestarts)
in_ct bash -c "kill -STOP $PID"
log "kill -STOP $PID: waiting for the watchdog ($WATCHDOG_S s), the abort and the restart"
wait_for $((WATCHDOG_S * 3 + 60)) "a restart after kill -STOP" restarted "$PID"
[ "$(show NRestarts)" -gt "$N" ] || die "not counted as a restart"
in_ct journalctl --no-pager -o cat | grep -i 'doorbell-agent.service: watchdog timeout' >&2 || {
    in_ct journalctl --no-pager -n 30 >&2
    die "the journal does not show a watchdog timeout"
}
assert_running "after the watchdog restart"
lap "watchdog restarted the stopped service"

# --- Restart= after kill -9 ---------------------------------------------------------------------
in_ct systemctl reset-failed doorbell-agent
PID=$(show MainPID)
in_ct bash -c "kill -9 $PID"
wait_for 60 "a restart after kill -9" restarted "$PID"
lap "restarted after kill -9"

# --- a clean, fast stop ---------------------------------------------------------------------------
in_ct systemctl reset-failed doorbell-agent
wait_for 60 "the service to run before stopping it" is_running
t0=$(date +%s.%N)
in_ct systemctl stop doorbell-agent
t1=$(date +%s.%N)
STOP_S=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
[ "$(show Result)" = success ] || die "stop result $(show Result)"
[ "$(show ExecMainStatus)" = 0 ] || die "the agent exited $(show ExecMainStatus) on SIGTERM"
python3 -c "import sys; sys.exit(0 if $STOP_S < 10 else 1)" || die "stopping took $STOP_S s"
lap "stopped cleanly in $STOP_S s"

# --- sandbox exposure ---------------------------------------------------------------------------
in_ct systemd-analyze security --no-pager doorbell-agent.service >"$WORK/security.log" 2>&1 || true
EXPOSURE=$(grep -oP 'Overall exposure level for doorbell-agent.service: \K[0-9.]+' "$WORK/security.log") ||
    {
        cat "$WORK/security.log" >&2
        die "systemd-analyze security printed no exposure level"
    }
python3 -c "import sys; sys.exit(0 if $EXPOSURE <= 2.0 else 1)" || die "exposure $EXPOSURE > 2.0"
in_ct systemctl start doorbell-agent
assert_running "started again"
lap "exposure $EXPOSURE (<= 2.0); systemd check passed"
