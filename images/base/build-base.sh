#!/usr/bin/env bash
# Build an equivalent of a public base image from Debian's packages, with no image
# registry: debootstrap a minbase root filesystem and `docker import` it.
#
#   build-base.sh IMAGE [--force]
#
#   IMAGE    python:3.11-slim-bookworm (also python:3-slim-bookworm, python:3.11-bookworm, ...)
#            debian:bookworm-slim      (also debian:bookworm, debian:12-slim, debian:12)
#   --force  rebuild even if IMAGE already exists in the engine
#
# Environment:
#   DEVLOOP_DEBIAN_MIRROR  Debian mirror to debootstrap from (default: the one this
#                          machine's apt uses, else http://deb.debian.org/debian)
#   DEVLOOP_BASE_WORKDIR   parent directory for the temporary root filesystem
#                          (default: /var/tmp; it must allow device nodes and exec)
#   DEVLOOP_VERBOSE=1      show debootstrap's full output
#   DOCKER_HOST etc.       honoured by the docker CLI as usual
#
# Exit codes: 0 built (or already there), 2 usage, 3 no offline recipe for IMAGE,
# 1 anything else (the message says what failed).
#
# The result is labelled dev.devloop.offline-base=true so it can be told apart from
# the real image. It is not byte-identical to the Docker Hub image: python comes from
# Debian (/usr/bin/python3, 3.11.2) rather than a source build in /usr/local, and there
# is no pip; `apt-get update && apt-get install python3-pip` works inside it.
set -euo pipefail

PROG=${0##*/}
SUITE=bookworm
T_START=$EPOCHREALTIME

log() { printf '%s\n' "$*" >&2; }
die() { log "$PROG: error: $*"; exit 1; }
usage() {
    log "usage: $PROG IMAGE [--force]"
    log "  e.g. $PROG python:3.11-slim-bookworm   or   $PROG debian:bookworm-slim"
    exit 2
}
# seconds since $1 (an $EPOCHREALTIME value), one decimal
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- arguments
[[ $# -ge 1 && $# -le 2 ]] || usage
IMAGE=$1
FORCE=0
if [[ $# -eq 2 ]]; then
    [[ $2 == --force ]] || usage
    FORCE=1
fi
[[ $IMAGE == -h || $IMAGE == --help ]] && usage

# Normalise the reference for matching: docker.io/library/python:3.11 -> python:3.11
ref=${IMAGE#docker.io/}
ref=${ref#index.docker.io/}
ref=${ref#library/}

# ---------------------------------------------------------------- recipe
# Debian bookworm ships python 3.11, so only references that promise 3.11 (or just
# "3") on bookworm can be built honestly.
case $ref in
    python:3.11*bookworm* | python:3-*bookworm* | python:3-bookworm)
        RECIPE=python
        INCLUDE=python3,ca-certificates
        CMD='["python3"]'
        ;;
    python:3.*bookworm*)
        log "$PROG: no offline recipe for $IMAGE (Debian $SUITE ships python 3.11 only; try python:3.11-slim-bookworm)"
        exit 3
        ;;
    debian:bookworm* | debian:12 | debian:12-* | debian:12.*)
        RECIPE=debian
        INCLUDE=
        CMD='["bash"]'
        ;;
    *)
        log "$PROG: no offline recipe for $IMAGE"
        log "  offline recipes exist for python:3.11-*bookworm* and debian:bookworm*"
        exit 3
        ;;
esac

# ---------------------------------------------------------------- preflight
command -v docker >/dev/null || die "the docker CLI is not installed"
if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    die "cannot reach the Docker engine${DOCKER_HOST:+ at $DOCKER_HOST}: $(docker version 2>&1 | tail -n 1)"
fi

if [[ $FORCE -eq 0 ]] && id=$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null); then
    offline=$(docker image inspect --format '{{index .Config.Labels "dev.devloop.offline-base"}}' "$IMAGE" 2>/dev/null || true)
    log "$PROG: $IMAGE already exists ($id${offline:+, built offline by devloop}); nothing to do (--force rebuilds it)"
    printf '%s\n' "$id"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "debootstrap must run as root (it creates device nodes and chroots); run: sudo $0 $*"

if ! command -v debootstrap >/dev/null; then
    log "$PROG: debootstrap is not installed; installing it with apt-get"
    command -v apt-get >/dev/null || die "debootstrap is missing and there is no apt-get to install it; install debootstrap and retry"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q debootstrap >&2; then
        log "$PROG: apt-get install failed; running apt-get update and retrying"
        apt-get update -q >&2 || die "apt-get update failed; install debootstrap by hand and retry"
        apt-get install -y -q debootstrap >&2 || die "could not install debootstrap with apt-get"
    fi
fi

# The mirror: DEVLOOP_DEBIAN_MIRROR, else what this machine's apt uses for bookworm,
# else any Debian mirror apt uses, else deb.debian.org.
detect_mirror() {
    local files=() f
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    [[ ${#files[@]} -gt 0 ]] || return 0
    # Prints "SCORE URI" per candidate: 2 = a deb source with suite bookworm,
    # 1 = a deb source whose URI looks like a Debian archive (not -security).
    awk -v suite="$SUITE" '
        function consider(types, uris, suites, enabled,    n, i, u, s, ns, j, score) {
            if (enabled ~ /^[Nn][Oo]$/ || (" " types " ") !~ / deb /) return
            n = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
            for (i = 1; i <= n; i++) {
                if (u[i] == "" || u[i] ~ /security/) continue
                score = 0
                for (j = 1; j <= ns; j++) if (s[j] == suite) score = 2
                if (score == 0 && u[i] ~ /\/debian\/?$/) score = 1
                if (score > 0) print score, u[i]
            }
        }
        function flush() { if (uris != "") consider(types, uris, suites, enabled); types = uris = suites = enabled = "" }
        FNR == 1 { flush() }
        /^[ \t]*#/ { next }
        FILENAME ~ /\.list$/ {
            if ($1 != "deb") next
            i = 2
            if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            consider("deb", $i, $(i + 1), "")
            next
        }
        /^[ \t]*$/ { flush(); next }
        tolower($1) == "types:"   { $1 = ""; types = $0 }
        tolower($1) == "uris:"    { $1 = ""; uris = $0 }
        tolower($1) == "suites:"  { $1 = ""; suites = $0 }
        tolower($1) == "enabled:" { enabled = $2 }
        END { flush() }
    ' "${files[@]}" 2>/dev/null | sort -s -k1,1nr | awk 'NR == 1 { print $2 }'
}
MIRROR=${DEVLOOP_DEBIAN_MIRROR:-}
MIRROR_FROM="DEVLOOP_DEBIAN_MIRROR"
if [[ -z $MIRROR ]]; then
    MIRROR=$(detect_mirror || true)
    MIRROR_FROM="this machine's apt sources"
fi
if [[ -z $MIRROR ]]; then
    MIRROR=http://deb.debian.org/debian
    MIRROR_FROM="default"
fi

# ---------------------------------------------------------------- temp dir + cleanup
WORKDIR=$(mktemp -d "${DEVLOOP_BASE_WORKDIR:-/var/tmp}/devloop-base.XXXXXX")
ROOTFS=$WORKDIR/rootfs
LOG=$WORKDIR/debootstrap.log
BG_PID=
cleanup() {
    local rc=$? m pgid
    trap - EXIT INT TERM
    if [[ -d $WORKDIR ]]; then
        # interrupted while debootstrap runs: stop it before unmounting anything
        if [[ -n ${BG_PID:-} ]]; then
            pgid=$(cat "$WORKDIR/debootstrap.pid" 2>/dev/null || true)
            if [[ -n $pgid ]]; then
                kill -TERM -- "-$pgid" 2>/dev/null || true
                # debootstrap may finish its current step first: give it 5 s, then KILL
                for _ in 1 2 3 4 5 6 7 8 9 10; do
                    kill -0 -- "-$pgid" 2>/dev/null || break
                    sleep 0.5
                done
                kill -KILL -- "-$pgid" 2>/dev/null || true
            fi
            wait "$BG_PID" 2>/dev/null || true
            log "$PROG: interrupted; stopped debootstrap and removed its files"
        fi
        # debootstrap can leave /proc, /sys, ... mounted in the target if it fails:
        # unmount them (deepest first) before removing anything.
        while read -r m; do
            umount -l "$m" 2>/dev/null || true
        done < <(awk -v d="$ROOTFS" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r)
        rm -rf --one-file-system "$WORKDIR" || log "$PROG: warning: could not remove $WORKDIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

STEPS=4
step() { log "[$1/$STEPS] $2 ..."; }
done_step() { log "[$1/$STEPS] done in $(since "$2")s"; }

log "$PROG: building $IMAGE offline (recipe: $RECIPE; mirror: $MIRROR, from $MIRROR_FROM)"

# ---------------------------------------------------------------- 1. debootstrap
t=$EPOCHREALTIME
step 1 "debootstrap $SUITE (${INCLUDE:-no extra packages})"
args=(--variant=minbase)
[[ -n $INCLUDE ]] && args+=("--include=$INCLUDE")
# Condense debootstrap's hundreds of lines: phase lines are shown as they come, runs
# of per-package lines (Retrieving/Validating, Extracting, Unpacking, Configuring X)
# become one line with a count. The full log is shown if it fails.
filter() {
    local line verb run= n=0
    end_run() { [[ -n $run ]] && log "      $(since "$t")s   ... $n packages"; run=; n=0; }
    while IFS= read -r line; do
        printf '%s\n' "$line" >>"$LOG"
        if [[ ${DEVLOOP_VERBOSE:-0} == 1 ]]; then
            log "      $line"
            continue
        fi
        [[ $line == [IWE]:\ * ]] || continue
        line=${line#?: }
        verb=${line%% *}
        [[ $verb == Validating ]] && verb=Retrieving
        case $line in
            *Release* | *" Packages"* | *" packages..." | *" system..." | *" extractor "*) verb= ;;
        esac
        case $verb in
            Retrieving | Extracting | Unpacking | Configuring)
                if [[ $verb != "$run" ]]; then
                    end_run
                    run=$verb
                    log "      $(since "$t")s ${verb,,} packages ..."
                fi
                [[ $line == Validating* ]] || n=$((n + 1))
                ;;
            *)
                end_run
                log "      $(since "$t")s $line"
                ;;
        esac
    done
    end_run
    return 0
}
# Run it in the background and `wait`, so that a signal to this script is handled at
# once (bash defers traps until a foreground command ends) and cleanup can stop it.
{
    # its own session and process group, so cleanup can stop all of it at once
    setsid debootstrap "${args[@]}" "$SUITE" "$ROOTFS" "$MIRROR" </dev/null 2>&1 &
    echo $! >"$WORKDIR/debootstrap.pid"
    rc=0; wait $! || rc=$?
    echo "$rc" >"$WORKDIR/debootstrap.rc"
} | filter &
BG_PID=$!
wait "$BG_PID" || true
BG_PID=
if [[ $(cat "$WORKDIR/debootstrap.rc" 2>/dev/null) != 0 ]]; then
    log "$PROG: error: debootstrap failed; the last lines of its log:"
    tail -n 30 "$LOG" | sed 's/^/    /' >&2
    [[ -f $ROOTFS/debootstrap/debootstrap.log ]] && tail -n 20 "$ROOTFS/debootstrap/debootstrap.log" | sed 's/^/    /' >&2
    log "$PROG: check that $MIRROR serves $SUITE (set DEVLOOP_DEBIAN_MIRROR to another mirror) and retry"
    exit 1
fi
done_step 1 "$t"

# ---------------------------------------------------------------- 2. trim
t=$EPOCHREALTIME
step 2 "trim the root filesystem (apt lists, caches, docs, man pages, logs)"
before=$(du -sm --one-file-system "$ROOTFS" | cut -f1)
(
    cd "$ROOTFS"
    rm -rf var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb \
        var/cache/apt/archives/partial/* var/cache/debconf/*-old var/lib/dpkg/*-old \
        var/log/*.log var/log/apt/* usr/share/man/* usr/share/info/* usr/share/lintian \
        usr/share/linda tmp/* var/tmp/*
    # docs: keep the copyright files (licences), drop the rest
    find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    find usr/share/doc -mindepth 1 -type d -empty -delete 2>/dev/null || true
    # locales: the image runs with LANG=C.UTF-8, which needs none of these
    find usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
    find . -xdev -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
    # keep later `apt-get install`s in the container slim too, as Docker's debian images do
    mkdir -p etc/dpkg/dpkg.cfg.d etc/apt/apt.conf.d
    cat > etc/dpkg/dpkg.cfg.d/docker-slim <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
    cat > etc/apt/apt.conf.d/docker-clean <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'APT::Install-Recommends "false";\n' > etc/apt/apt.conf.d/docker-no-recommends
    # this machine's identity does not belong in an image (the engine provides both)
    : > etc/resolv.conf
    printf 'localhost\n' > etc/hostname
    rm -f etc/machine-id var/lib/dbus/machine-id
    if [[ $RECIPE == python ]]; then
        # the official image has both `python` and `python3` on PATH
        mkdir -p usr/local/bin
        ln -sf /usr/bin/python3 usr/local/bin/python
        ln -sf /usr/bin/python3 usr/local/bin/python3
    fi
)
after=$(du -sm --one-file-system "$ROOTFS" | cut -f1)
log "      ${before} MiB -> ${after} MiB"
done_step 2 "$t"

# ---------------------------------------------------------------- 3. import
t=$EPOCHREALTIME
step 3 "docker import as $IMAGE"
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
old_id=$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
id=$(tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "CMD $CMD" \
    --change 'LABEL dev.devloop.offline-base=true' \
    --change "LABEL dev.devloop.offline-base.recipe=$RECIPE dev.devloop.offline-base.suite=$SUITE dev.devloop.offline-base.created=$created" \
    --message "devloop offline base: debootstrap --variant=minbase ${INCLUDE:+--include=$INCLUDE }$SUITE from $MIRROR" \
    - "$IMAGE") || die "docker import of $IMAGE failed (see the message above)"
if [[ -n $old_id && $old_id != "$id" ]]; then
    # --force: drop the image this one replaced, unless something still uses it
    # (a container, or an image built on it); then it stays, untagged.
    if docker image rm "$old_id" >/dev/null 2>&1; then
        log "      removed the image it replaced (${old_id:7:12})"
    else
        log "      the image it replaced (${old_id:7:12}) is still in use; left it untagged"
    fi
fi
done_step 3 "$t"

# ---------------------------------------------------------------- 4. check
t=$EPOCHREALTIME
step 4 "check the image runs"
if [[ $RECIPE == python ]]; then
    check=(python -c 'import sys, ssl, json, sqlite3, http.server, urllib.request; print("python", sys.version.split()[0])')
else
    check=(bash -c 'echo "debian $(cat /etc/debian_version)"')
fi
if ! out=$(docker run --rm --network none "$IMAGE" "${check[@]}" 2>&1); then
    log "$out"
    die "the new image $IMAGE was imported but does not run its check; rebuild it with --force"
fi
log "      $out"
done_step 4 "$t"

size=$(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')
log "$PROG: built $IMAGE ($id, $size) in $(since "$T_START")s"
printf '%s\n' "$id"
