#!/usr/bin/env bash
# The image test (`make image-test`, run by .ci/run): builds the Dockerfile with buildah and runs the image
# with podman (runc), the example model as the model command, and checks it over loopback:
#   - POST /invocations answers 200 through the proxy, and sagemaker_invocations_total is 1 on /metrics;
#   - the image's HEALTHCHECK reports healthy (`podman healthcheck run`);
#   - every process in the container runs as uid 10001;
#   - `podman stop` returns within 10 s, the container exits 0, and the model was stopped cleanly
#     (it logs uvicorn's "Finished server process [<its pid>]", which a SIGKILL never gets to print);
#   - a second container whose model is killed (kill -9) exits non-zero on its own;
#   - `--version` says the image runs the compiled build (mypyc), and the image has no C compiler.
#
# Needs root on Debian 12 (bookworm) or alike; no Docker daemon and no registry access. It installs podman,
# buildah, runc and mmdebstrap with apt-get when they are missing. When python:3.11-slim-bookworm cannot be
# pulled, a stand-in is built from Debian's packages with mmdebstrap and `podman import`ed under that name;
# the stand-in's tarball is kept between runs in $IMAGE_TEST_CACHE (default /var/tmp/sagemaker-metrics-proxy-image-test).
# All other state (storage, configuration, containers) lives in a temporary directory removed on exit.
#
# Settings (environment): IMAGE_TEST_STANDIN=1 skips the pull and always uses the stand-in base;
# IMAGE_TEST_CA_BUNDLE is the CA bundle passed to the build as the pip_ca secret (default: $PIP_CERT, else
# /etc/ssl/certs/ca-certificates.crt; none when the file is missing); IMAGE_TEST_KEEP=1 keeps the temporary
# directory for a look afterwards (its containers are removed all the same).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=localhost/sagemaker-metrics-proxy:image-test
BASE=docker.io/library/python:3.11-slim-bookworm
CACHE=${IMAGE_TEST_CACHE:-/var/tmp/sagemaker-metrics-proxy-image-test}
CA_BUNDLE=${IMAGE_TEST_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
MODEL_COMMAND="python -m example_model --host 127.0.0.1 --port 8081 --log-level info"
READY_WITHIN=60 # seconds from `podman run` until /readyz answers 200

started=$EPOCHREALTIME
stage_name=""
stage_started=""
timings=()

ms_since() { # milliseconds since an $EPOCHREALTIME value
    local now=$EPOCHREALTIME
    echo $(((${now/[.,]/} - ${1/[.,]/}) / 1000))
}
end_stage() {
    if [[ -n $stage_name ]]; then
        local ms
        ms=$(ms_since "$stage_started")
        timings+=("$(printf '%6.1f s  %s' "$((ms / 100))e-1" "$stage_name")")
        stage_name=""
    fi
}
stage() {
    end_stage
    stage_name=$*
    stage_started=$EPOCHREALTIME
    echo "image-test: $*" >&2
}
fail() { # message [log file to show]
    echo "image-test: FAILED: $1" >&2
    if [[ -n ${2:-} && -s ${2:-} ]]; then
        echo "image-test: --- last lines of $2 (IMAGE_TEST_KEEP=1 keeps it) ---" >&2
        tail -n 40 "$2" >&2
    fi
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "runs as root (rootful podman and buildah, apt-get): sudo make image-test"

# --- Tools -------------------------------------------------------------------------------------------------
stage "tools: podman, buildah, runc, mmdebstrap, iptables, curl"
missing=()
for tool in podman buildah runc mmdebstrap iptables curl; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get to install them"
    echo "image-test: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- A private podman/buildah: configuration and storage in a temporary directory ---------------------------
WORK=$(mktemp -d /tmp/sagemaker-metrics-proxy-image-test.XXXXXX)
# From here on podman and buildah see only this directory's configuration and storage.
export CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf TMPDIR=$WORK
# containers/image keeps a blob-info cache in /var/lib/containers/cache for root whatever the storage root is.
[[ -e /var/lib/containers ]] && had_var_lib_containers=1 || had_var_lib_containers=0
containers=()

cleanup() {
    local rc=$?
    set +e
    end_stage
    if ((rc != 0)); then
        for c in "${containers[@]}"; do
            echo "image-test: --- last lines of container $c ---" >&2
            podman logs --tail 30 "$c" >&2 2>&1
        done
    fi
    if ((${#timings[@]})); then
        echo "image-test: time per stage:" >&2
        printf '  %s\n' "${timings[@]}" >&2
    fi
    if [[ -s $CONTAINERS_STORAGE_CONF ]]; then # never the host's own storage
        if ((${#containers[@]})); then
            podman rm --force --time 0 "${containers[@]}" >/dev/null 2>&1
        fi
        buildah rm --all >/dev/null 2>&1
    fi
    grep -o " $WORK/[^ ]*" /proc/self/mounts | sort -r | xargs -r umount -l 2>/dev/null
    if [[ ${IMAGE_TEST_KEEP:-} == 1 ]]; then
        echo "image-test: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    ((had_var_lib_containers)) || rm -rf /var/lib/containers
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# runc, not crun; ulimits within the host's hard limits (runc cannot raise them here, and podman's defaults
# are above them on small hosts); cgroupfs and a file event log, since there may be no systemd.
nofile=$(ulimit -Hn)
[[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
nproc=$(ulimit -Hu)
[[ $nproc == unlimited || $nproc -gt 4096 ]] && nproc=4096
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$WORK/tmp"
EOF
write_storage_conf() {
    cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "$1"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
}
write_storage_conf overlay
if ! podman info >"$WORK/podman-info.log" 2>&1; then
    echo "image-test: overlay storage does not work here; using vfs (slower)" >&2
    rm -rf "$WORK/storage" "$WORK/run"
    write_storage_conf vfs
    podman info >"$WORK/podman-info.log" 2>&1 || fail "podman does not start" "$WORK/podman-info.log"
fi

# --- The base image -----------------------------------------------------------------------------------------
stage "base image: pull $BASE"
if [[ ${IMAGE_TEST_STANDIN:-} != 1 ]] && timeout 300 podman pull -q "$BASE" >"$WORK/pull.log" 2>&1; then
    echo "image-test: pulled the real base" >&2
else
    [[ ${IMAGE_TEST_STANDIN:-} == 1 ]] || echo "image-test: cannot pull it ($(tail -n 1 "$WORK/pull.log" | cut -c1-160)); using a stand-in" >&2
    stage "base image: stand-in from Debian's packages (mmdebstrap)"
    # The host's mirror (its sources, when it is bookworm too) and its apt network settings (proxies, dates).
    sources=()
    if grep -qs '^VERSION_CODENAME=bookworm$' /etc/os-release; then
        for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
            if [[ -s $f ]] && grep -Eqs '^[[:space:]]*(deb |Types:.*\bdeb\b)' "$f"; then
                sources=("$f")
                break
            fi
        done
    fi
    apt-config dump | grep -E '^Acquire::((https?|ftp)::(Proxy|CaInfo|Verify-Peer)|Check-Valid-Until|Check-Date)' >"$WORK/apt-host.conf" || true
    args=(--variant=minbase --format=tar
        '--include=python3,python3-venv,python-is-python3,ca-certificates'
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
        --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*')
    # The cached tarball is the one made with these arguments, sources and apt settings.
    key=$( (printf '%s\n' "${args[@]}" "${sources[@]}"; cat "$WORK/apt-host.conf" "${sources[@]}") | sha256sum | cut -c1-16)
    args+=(--aptopt="$WORK/apt-host.conf")
    tarball=$CACHE/python-3.11-slim-bookworm-standin-$key.tar
    mkdir -p "$CACHE"
    if [[ -s $tarball ]]; then
        echo "image-test: cached: $tarball" >&2
    else
        find "$CACHE" -maxdepth 1 -name 'python-3.11-slim-bookworm-standin-*' -delete
        mmdebstrap "${args[@]}" bookworm "$WORK/standin.tar" "${sources[@]}" >"$WORK/mmdebstrap.log" 2>&1 ||
            fail "mmdebstrap could not build the stand-in base" "$WORK/mmdebstrap.log"
        mv "$WORK/standin.tar" "$tarball"
    fi
    stage "base image: podman import"
    # Debian's python3 is /usr/bin/python3 (python-is-python3 gives `python`); the real base's PATH starts at /usr/local/bin.
    podman import -q \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        "$tarball" "$BASE" >"$WORK/import.log" 2>&1 || fail "podman import of the stand-in base failed" "$WORK/import.log"
fi

# --- Build --------------------------------------------------------------------------------------------------
stage "build: buildah build --format docker"
build=(buildah build --format docker --pull=never --runtime "$(command -v runc)" --layers=false
    --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" -t "$IMAGE")
if [[ -s $CA_BUNDLE ]]; then
    build+=(--secret "id=pip_ca,src=$CA_BUNDLE")
fi
"${build[@]}" . >"$WORK/build.log" 2>&1 || fail "buildah build failed" "$WORK/build.log"
[[ $(podman image inspect --format '{{.User}} {{json .HealthCheck.Test}}' "$IMAGE") == "10001 "*healthz* ]] ||
    fail "the image lost its USER or HEALTHCHECK: $(podman image inspect --format '{{.User}} {{json .HealthCheck}}' "$IMAGE")"

stage "check: the compiled build, and no build tools in the image"
version=$(podman run --rm "$IMAGE" --version 2>"$WORK/version.log") || fail "--version failed: $version" "$WORK/version.log"
[[ $version == *"compiled build"* ]] || fail "the image does not run the compiled build: $version"
echo "image-test: $version" >&2
if podman run --rm --entrypoint sh "$IMAGE" -c 'command -v gcc || command -v cc' >/dev/null 2>&1; then
    fail "the image has a C compiler: build tools belong in the build stage only"
fi

# --- Run ----------------------------------------------------------------------------------------------------
# Two containers: one for the requests and a clean stop, one whose model gets killed. Ports are published
# to free loopback ports (rootful podman: CNI bridge and iptables), so nothing on the host's 8080/9090 matters.
stage "run: two containers, until both are ready"
start_container() { # name
    local name=$1
    containers+=("$name")
    podman run -d --name "$name" \
        -p 127.0.0.1::8080 -p 127.0.0.1::9090 \
        -e SAGEMAKER_PROXY_MODEL_COMMAND="$MODEL_COMMAND" \
        -e SAGEMAKER_PROXY_UPSTREAM=http://127.0.0.1:8081 \
        -e SAGEMAKER_PROXY_ENDPOINT_NAME=image-test \
        "$IMAGE" >/dev/null 2>"$WORK/run-$name.log" || fail "podman run $name failed" "$WORK/run-$name.log"
    # Without systemd, podman reports (harmlessly, in that log) that it cannot add a healthcheck timer;
    # the test runs the healthcheck itself.
}
host_port() { # container, container port -> 127.0.0.1:port
    podman port "$1" "$2/tcp"
}
wait_ready() { # container
    local c=$1 admin deadline=$((SECONDS + READY_WITHIN))
    admin=$(host_port "$c" 9090)
    until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$admin/readyz") == 200 ]]; do
        [[ $(podman inspect --format '{{.State.Running}}' "$c") == true ]] ||
            fail "container $c exited before it was ready (exit code $(podman inspect --format '{{.State.ExitCode}}' "$c"))"
        ((SECONDS < deadline)) ||
            fail "container $c: /readyz did not answer 200 within ${READY_WITHIN}s (does serve start SAGEMAKER_PROXY_MODEL_COMMAND?)"
        sleep 0.2
    done
}
model_pid() { # container -> pid of the model server in the container's pid namespace
    local pid
    pid=$(podman top "$1" pid args | awk 'NR > 1 && /example_model/ && $2 !~ /(^|\/)(sh|bash|dash)$/ {print $1}')
    [[ $pid =~ ^[0-9]+$ ]] || fail "container $1: no single model process: $(podman top "$1" pid args | tr '\n' ';')"
    echo "$pid"
}

served=smp-image-test-served
killed=smp-image-test-killed
start_container "$served"
start_container "$killed"
wait_ready "$served"
wait_ready "$killed"

stage "check: invocation, metrics, healthcheck, uid"
proxy=$(host_port "$served" 8080)
admin=$(host_port "$served" 9090)
status=$(curl -s -o "$WORK/invocation.json" -w '%{http_code}' --max-time 10 -X POST "http://$proxy/invocations" \
    -H 'Content-Type: application/json' -d '{"instances": [[6.7, 3.0, 5.2, 2.3]]}')
[[ $status == 200 ]] || fail "POST /invocations answered $status: $(head -c 300 "$WORK/invocation.json")"
grep -q '"virginica"' "$WORK/invocation.json" || fail "POST /invocations: not the model's answer: $(head -c 300 "$WORK/invocation.json")"
echo "image-test: POST /invocations -> 200 $(head -c 120 "$WORK/invocation.json")" >&2

count=$(curl -sf --max-time 5 "http://$admin/metrics" | awk '/^sagemaker_invocations_total[{ ]/ {n += $NF} END {print n + 0}')
[[ $count == 1 ]] || fail "sagemaker_invocations_total is $count on /metrics, not 1"
echo "image-test: sagemaker_invocations_total 1" >&2

podman healthcheck run "$served" >"$WORK/healthcheck.log" 2>&1 || fail "podman healthcheck run: not healthy" "$WORK/healthcheck.log"
health=$(podman inspect --format '{{.State.Health.Status}}' "$served")
[[ $health == healthy ]] || fail "HEALTHCHECK status is '$health', not healthy"
echo "image-test: HEALTHCHECK healthy" >&2

processes=0
for hpid in $(podman top "$served" hpid | tail -n +2); do
    uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$hpid/status" 2>/dev/null) || continue
    [[ $uids == "10001 10001 10001 10001" ]] ||
        fail "a process runs with uids $uids (real, effective, saved, fs), not 10001: $(tr '\0' ' ' <"/proc/$hpid/cmdline")"
    processes=$((processes + 1))
done
((processes >= 2)) || fail "expected the proxy and the model in the container, found $processes process(es)"
echo "image-test: all $processes processes run as uid 10001" >&2

stage "check: podman stop"
pid=$(model_pid "$served")
t0=$EPOCHREALTIME
podman stop --time 10 "$served" >/dev/null 2>"$WORK/stop.log" || fail "podman stop failed" "$WORK/stop.log"
stop_ms=$(ms_since "$t0")
code=$(podman inspect --format '{{.State.ExitCode}}' "$served")
((stop_ms < 10000)) || fail "podman stop took ${stop_ms} ms: the container did not stop on SIGTERM (exit code $code)"
[[ $code == 0 ]] || fail "the container exited $code after podman stop, not 0"
podman logs "$served" >"$WORK/served.out" 2>&1
grep -q "Finished server process \[$pid\]" "$WORK/served.out" ||
    fail "the model (pid $pid) was not stopped cleanly: no 'Finished server process [$pid]' in the container's log"
echo "image-test: podman stop: ${stop_ms} ms, exit code 0, the model finished cleanly" >&2

stage "check: a killed model ends the container"
pid=$(model_pid "$killed")
podman exec "$killed" sh -c "kill -9 $pid" || fail "could not kill the model (pid $pid) in $killed"
code=$(timeout 30 podman wait "$killed") || fail "the container went on running for 30 s after its model was killed"
[[ $code != 0 ]] || fail "the container exited 0 after its model was killed; it must exit non-zero"
echo "image-test: model killed -> the container exited $code on its own" >&2

end_stage
echo "image-test: passed in $(($(ms_since "$started") / 1000)) s" >&2
