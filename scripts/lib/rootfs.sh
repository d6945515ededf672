# shellcheck shell=bash
# Shared by scripts/check-arm64.sh and scripts/check-systemd.sh (sourced, not run): Debian
# packages on the host, a cached debootstrap root per set of inputs, and a throw-away overlay
# on top of it for each run, so the cache is never changed by what a check does inside.

CHECK_CACHE="${DOORBELL_CHECK_CACHE:-/var/cache/doorbell-agent-check}"
SUITE=bookworm

log() { printf '%s [%s] %s\n' "$(date -u +%H:%M:%S)" "${CHECK_NAME:-check}" "$*" >&2; }
die() {
    log "FAIL: $*"
    exit 1
}

# Install the host's Debian packages that are missing (idempotent; waits for another dpkg).
need_apt() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    log "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local try
    for try in 1 2 3 4 5 6; do
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
            return 0
        fi
        log "apt-get failed (dpkg busy?), retrying in 20 s ($try/6)"
        sleep 20
    done
    die "could not install ${missing[*]}"
}

# The Debian mirror this machine's apt uses (debootstrap goes the same way), else deb.debian.org.
debian_mirror() {
    local uri
    uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
        grep -oE 'https?://[^ ]+/debian/?$' | head -1 || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    echo "${uri%/}"
}

# build_root NAME ARCH PACKAGES... : print the path of a cached root for these inputs,
# debootstrapping it first when absent. The key covers everything the root is made from.
build_root() {
    local name=$1 arch=$2
    shift 2
    local mirror key dir tmp
    mirror=$(debian_mirror)
    key=$(printf '%s\n' "v1" "$SUITE" "$arch" "$mirror" "$@" | sha256sum | cut -c1-16)
    dir="$CHECK_CACHE/$name-$arch-$key"
    if [ -f "$dir/.complete" ]; then
        log "cached root $dir"
        echo "$dir"
        return 0
    fi
    install -d -m 0755 "$CHECK_CACHE"
    # One builder at a time; a second run waits, then finds the root made.
    exec {lock}>"$CHECK_CACHE/.$name-$arch.lock"
    flock "$lock"
    if [ -f "$dir/.complete" ]; then
        flock -u "$lock"
        echo "$dir"
        return 0
    fi
    # Roots for other inputs, and ones left half-made by an interrupted run (no .complete),
    # are removed, never reused (after unmounting what debootstrap may have left mounted).
    local old
    for old in "$CHECK_CACHE/$name-$arch-"*; do
        [ -d "$old" ] || continue
        umount -R "$old/proc" "$old/sys" 2>/dev/null || true
        rm -rf --one-file-system "$old"
    done
    tmp="$dir.tmp"
    log "debootstrap $SUITE $arch from $mirror into $tmp ($*)"
    local inc
    inc=$(IFS=,; echo "$*")
    if ! debootstrap --arch="$arch" --variant=minbase --include="$inc" \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$SUITE" "$tmp" "$mirror" >"$CHECK_CACHE/$name-$arch.debootstrap.log" 2>&1; then
        tail -20 "$CHECK_CACHE/$name-$arch.debootstrap.log" >&2
        umount -R "$tmp/proc" "$tmp/sys" 2>/dev/null || true
        die "debootstrap failed (log: $CHECK_CACHE/$name-$arch.debootstrap.log)"
    fi
    # Same mirror for apt-get inside the root, with the security suite as on this machine.
    cat >"$tmp/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
EOF
    rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*_Packages
    touch "$tmp/.complete"
    mv "$tmp" "$dir"
    flock -u "$lock"
    echo "$dir"
}

# overlay_root LOWER WORK : mount a writable overlay of LOWER at WORK/root (upper in WORK).
overlay_root() {
    local lower=$1 work=$2
    install -d "$work/upper" "$work/ovl" "$work/root"
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$work/upper,workdir=$work/ovl" \
        "$work/root" || die "cannot mount an overlay on $work/root"
}

# prepare_root ROOT : what a debootstrapped root lacks to reach the network as this host does:
# its resolver, its trust store (for PyPI), and an /etc/hosts (minbase has none, so not even
# `localhost` resolves; sudo also looks the host name up).
prepare_root() {
    local root=$1
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n127.0.1.1 %s\n' \
        "$(hostname)" >"$root/etc/hosts"
}

# Copy the project's tracked and new (not ignored) files into DEST, as a clean clone would have.
copy_source() {
    local repo=$1 dest=$2
    install -d "$dest"
    (cd "$repo" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -C "$dest" -xf -
}

# readme_pi_steps FIRST LAST : the shell lines of the README's "Install on a Raspberry Pi" steps
# FIRST..LAST, as the checks run them: `sudoedit FILE` becomes `edit_file FILE` (the caller
# defines it to write what the check needs) and the interactive `journalctl -f` is left out.
# Both checks follow the README this way, so the steps they test are the ones users read.
readme_pi_steps() {
    local first=$1 last=$2 readme=${3:-README.md}
    awk -v first="$first" -v last="$last" '
        /^## Install on a Raspberry Pi/ { s = 1; next }
        s && /^## / { exit }
        s && /^[0-9]+\. / { step = $1 + 0 }
        s && /^ *```sh/ { b = 1; next }
        s && b && /^ *```/ { b = 0; next }
        s && b && step >= first && step <= last { sub(/^   /, ""); print }
    ' "$readme" | sed -e 's/^\( *\)\(sudo \)\{0,1\}sudoedit /\1edit_file /' -e '/journalctl .*-f$/d'
}
