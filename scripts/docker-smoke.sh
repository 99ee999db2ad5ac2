#!/usr/bin/env bash
# End-to-end check of the serving image on a machine that cannot pull from any image registry:
#   1. installs docker.io (and debootstrap) with apt-get when missing, starts dockerd if needed;
#   2. builds a local base image (Debian bookworm minbase + python3 + python3-venv) with
#      debootstrap and `docker import`, standing in for python:3.11-slim-bookworm;
#   3. builds the project image on it (--build-arg BASE_IMAGE=...), pip reaching PyPI as usual;
#   4. runs it the way docs/deployment.md and deploy/k8s do (read-only root, non-root user,
#      tmpfs for /tmp and the audit DB), waits for /readyz and for Docker's own HEALTHCHECK,
#      POSTs a chest X-ray PNG to /predict, reads /metrics, checks a bad upload gets a 4xx,
#      runs a second container on a mounted model folder and a third with no network at all
#      (--network none: /readyz, /predict and the /docs, /redoc assets from inside), brings up docker-compose.yml's
#      CPU service on the same image (docker compose v2, or docker-compose from apt), and
#      stops the first container gracefully;
#   5. cleans up on any exit: containers, the compose project, the project image (unless
#      kept), the dockerd it started.
#
# Usage: sudo scripts/docker-smoke.sh        (as root; takes 5-15 minutes the first time)
# Knobs (environment):
#   CXR_SMOKE_ORT_EXTRAS   onnxruntime-gpu extras for the build (default "cuda,cudnn"; "" = CPU)
#   CXR_SMOKE_MODEL_DIR    model folder inside the repo (default models/default, else a tiny
#                          test model is built into build/docker-smoke-model)
#   CXR_SMOKE_PORT         host ports on 127.0.0.1: this one and the next two (default 18080)
#   CXR_SMOKE_BUILD_NETWORK  network for RUN steps of the build (default host)
#   CXR_SMOKE_KEEP_IMAGE=1 keep the built image; CXR_SMOKE_REBUILD_BASE=1 redo the base image
#   CXR_SMOKE_WORK         scratch folder (default /tmp/cxr-docker-smoke)
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${CXR_SMOKE_WORK:-/tmp/cxr-docker-smoke}
BASE_TAG=${CXR_SMOKE_BASE:-cxr-local/bookworm-python3:smoke}
IMAGE=${CXR_SMOKE_IMAGE:-cxr-triage:smoke}
PORT=${CXR_SMOKE_PORT:-18080}
PORT2=$((PORT + 1))
ORT_EXTRAS=${CXR_SMOKE_ORT_EXTRAS-cuda,cudnn}
BUILD_NETWORK=${CXR_SMOKE_BUILD_NETWORK:-host}
MIRROR=${CXR_SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CONTAINER=cxr-smoke-$$
CONTAINER2=cxr-smoke-mounted-$$
CONTAINER3=cxr-smoke-airgap-$$
PROJECT=cxr-smoke-$$
PORT3=$((PORT + 2))
COMPOSE=()
COMPOSE_UP=0
STARTED_DOCKERD=0
MADE_MODEL=""
T0=$(date +%s)

export DOCKER_BUILDKIT=0 # the classic builder ships with every daemon; no buildx plugin needed
log() { printf '[%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [[ $rc -ne 0 ]]; then
        for c in "$CONTAINER" "$CONTAINER2" "$CONTAINER3"; do
            docker inspect "$c" >/dev/null 2>&1 || continue
            log "logs of $c (tail):"
            docker logs --tail 25 "$c" 2>&1 | cut -c1-300 | sed 's/^/    /'
        done
    fi
    docker rm -f "$CONTAINER" "$CONTAINER2" "$CONTAINER3" >/dev/null 2>&1
    if [[ $COMPOSE_UP == 1 ]]; then
        (cd "$REPO" && "${COMPOSE[@]}" --profile cpu down -v --remove-orphans >/dev/null 2>&1)
    fi
    if [[ "${CXR_SMOKE_KEEP_IMAGE:-0}" != 1 ]]; then
        docker rmi "$IMAGE" >/dev/null 2>&1 && log "removed image $IMAGE"
        docker image prune -f --filter label=cxr-triage.stage=builder >/dev/null 2>&1
    fi
    [[ -n "$MADE_MODEL" ]] && rm -rf "$MADE_MODEL"
    if [[ $STARTED_DOCKERD == 1 && -f "$WORK/dockerd.pid" ]]; then
        local pid
        pid=$(cat "$WORK/dockerd.pid")
        kill "$pid" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        log "stopped the dockerd this script started (pid $pid)"
    fi
    if [[ $rc -eq 0 ]]; then log "SMOKE OK"; else log "SMOKE FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ $(id -u) == 0 ]] || die "run as root (apt-get, dockerd, debootstrap)"
mkdir -p "$WORK"

# --- 1. docker and debootstrap ----------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if docker info >/dev/null 2>&1; then
    log "using the running docker daemon"
else
    for driver in overlay2 vfs; do
        log "starting dockerd (storage driver $driver), log in $WORK/dockerd.log"
        dockerd --storage-driver "$driver" --pidfile "$WORK/dockerd.pid" \
            >"$WORK/dockerd.log" 2>&1 &
        STARTED_DOCKERD=1
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 && break
        kill "$(cat "$WORK/dockerd.pid" 2>/dev/null)" 2>/dev/null || true
        sleep 2
        STARTED_DOCKERD=0
    done
    docker info >/dev/null 2>&1 || die "dockerd did not start; see $WORK/dockerd.log"
fi
log "docker server $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}')"

# --- 2. local base image ------------------------------------------------------------------------
if [[ "${CXR_SMOKE_REBUILD_BASE:-0}" != 1 ]] && docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    log "base image $BASE_TAG already here"
else
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    log "debootstrap bookworm minbase + python3 into $rootfs (from $MIRROR)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $WORK/debootstrap.log"
    # Trust what the host trusts (a TLS-inspecting proxy's CA, say), so pip in the build can
    # reach PyPI through the same network path as the host.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
        log "copied the host's extra CA certificates into the base image"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs"
    log "imported $BASE_TAG ($(docker image inspect -f '{{.Size}}' "$BASE_TAG" | numfmt --to=iec))"
fi

# --- 3. model folder and project image ----------------------------------------------------------
MODEL_DIR=${CXR_SMOKE_MODEL_DIR:-models/default}
if [[ ! -f "$REPO/$MODEL_DIR/model.onnx" ]]; then
    [[ -z "${CXR_SMOKE_MODEL_DIR:-}" ]] || die "no model.onnx in $REPO/$MODEL_DIR"
    MODEL_DIR=build/docker-smoke-model
    MADE_MODEL="$REPO/$MODEL_DIR"
    log "models/default not there yet: building the tiny test model into $MODEL_DIR"
    (cd "$REPO" && "${PYTHON:-$REPO/.venv/bin/python}" -c \
        "from pathlib import Path; from tests.model_fixtures import build_tiny_model; \
build_tiny_model(Path('$MODEL_DIR'))")
fi
log "model folder: $MODEL_DIR ($(du -sh "$REPO/$MODEL_DIR" | cut -f1))"

log "docker build (BASE_IMAGE=$BASE_TAG, ORT_EXTRAS='$ORT_EXTRAS'), log in $WORK/build.log"
build_start=$(date +%s)
if ! docker build --network "$BUILD_NETWORK" \
        --build-arg BASE_IMAGE="$BASE_TAG" \
        --build-arg ORT_EXTRAS="$ORT_EXTRAS" \
        --build-arg MODEL_DIR="$MODEL_DIR" \
        -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1; then
    tail -30 "$WORK/build.log" | sed 's/^/    /'
    die "docker build failed"
fi
log "built $IMAGE in $(($(date +%s) - build_start)) s, size $(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec)"
log "image user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE") healthcheck=$(docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE" | cut -c1-60)..."

docker run --rm --entrypoint python3 "$IMAGE" -c '
import importlib.util, json, os, onnxruntime as ort
print(json.dumps({
    "uid": os.getuid(),
    "torch_installed": importlib.util.find_spec("torch") is not None,
    "onnxruntime": ort.__version__,
    "providers": ort.get_available_providers(),
}))' | sed 's/^/    /'
if [[ "$ORT_EXTRAS" == *cudnn* ]]; then
    docker run --rm --entrypoint sh "$IMAGE" -c \
        'ldconfig -p | grep -E "libcudnn\.so|libcublasLt\.so|libcudart\.so" | sed "s/^/    /"'
fi

# --- 4. run it ----------------------------------------------------------------------------------
log "docker run: read-only root, tmpfs /tmp and /var/lib/cxr-triage, 127.0.0.1:$PORT -> 8000"
docker run -d --name "$CONTAINER" --read-only \
    --tmpfs /tmp --tmpfs /var/lib/cxr-triage:uid=10001,gid=10001,mode=0750 \
    -e CXR_PROVIDERS=auto -e CXR_LOG_JSON=true \
    -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null

PY=python3
command -v "$PY" >/dev/null || PY="$REPO/.venv/bin/python"
wait_ready() { # container, port, seconds
    "$PY" - "$@" <<'EOF'
import subprocess, sys, time, urllib.request
name, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.monotonic()
while time.monotonic() - start < limit:
    state = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}}", name],
                           capture_output=True, text=True).stdout.strip()
    if state != "running":
        print(f"    container {name} is {state or 'gone'}")
        sys.exit(1)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            if r.status == 200:
                print(f"    /readyz 200 after {time.monotonic() - start:.1f} s: {r.read().decode()[:200]}")
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
}
wait_ready "$CONTAINER" "$PORT" 240 || die "/readyz not 200 within 240 s"

PNG=$(ls "$REPO"/../shared/data/nih/images/nih-1024/*.png 2>/dev/null | head -1 || true)
check_predict() { # port: /predict with a PNG and with garbage, then /metrics
    "$PY" - "$1" "${PNG:-}" <<'EOF'
import json, struct, sys, urllib.error, urllib.request, zlib

port, png_path = int(sys.argv[1]), sys.argv[2]
if png_path:
    data, source = open(png_path, "rb").read(), png_path.rsplit("/", 1)[-1]
else:  # a synthetic 256x256 8-bit gradient, written with zlib alone
    rows = b"".join(b"\0" + bytes((x + y) % 256 for x in range(256)) for y in range(256))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 256, 256, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    source = "synthetic gradient"

def call(path, body=None, ctype=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                 headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()

status, ctype, body = call("/predict?heatmap=true", data, "image/png")
print(f"    {source} ({len(data)} bytes) -> HTTP {status}")
assert status == 200, body[:500]
doc = json.loads(body)
top = sorted(doc["findings"], key=lambda f: -f["probability"])[:3]
print(f"    model {doc['model']}, {len(doc['findings'])} findings, top: "
      + ", ".join(f"{f['label']} {f['probability']:.3f}" for f in top))
print(f"    triage {doc['triage']}")
print(f"    heatmap {doc['heatmap']['method']} grid {len(doc['heatmap']['grid'])}x"
      f"{len(doc['heatmap']['grid'][0])}, timing_ms {doc['timing_ms']}")

status, ctype, body = call("/predict", b"this is not an image", "image/png")
print(f"    garbage upload -> HTTP {status} {ctype}: {body[:120].decode(errors='replace')}")
assert 400 <= status < 500 and ctype.startswith("application/problem+json"), status

status, ctype, body = call("/metrics")
wanted = ("cxr_requests_total", "cxr_request_duration_seconds", "cxr_batch_size",
          "cxr_queue_depth", "cxr_inference_duration_seconds", "cxr_decode_duration_seconds",
          "cxr_model_info")
text = body.decode()
lines = [ln for ln in text.splitlines() if ln.startswith(("cxr_requests_total", "cxr_model_info"))]
missing = [m for m in wanted if m not in text]
print(f"    /metrics HTTP {status}: " + "; ".join(lines[:4]))
assert status == 200 and not missing, missing
EOF
}
log "POST /predict with a chest X-ray PNG"
check_predict "$PORT"

log "waiting for Docker's HEALTHCHECK to report healthy"
health=""
for _ in $(seq 60); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")
    [[ $health == healthy ]] && break
    sleep 2
done
[[ $health == healthy ]] || die "container health is '$health'"
log "    health: $health (HEALTHCHECK exit code $(docker inspect -f '{{(index .State.Health.Log 0).ExitCode}}' "$CONTAINER"))"

log "second container: the model folder mounted read-only at /models/mounted"
docker run -d --name "$CONTAINER2" --read-only \
    --tmpfs /tmp --tmpfs /var/lib/cxr-triage:uid=10001,gid=10001,mode=0750 \
    -e CXR_MODEL_DIR=/models/mounted \
    -v "$REPO/$MODEL_DIR:/models/mounted:ro" \
    -p "127.0.0.1:$PORT2:8000" "$IMAGE" >/dev/null
wait_ready "$CONTAINER2" "$PORT2" 240 || die "mounted-model container not ready"
"$PY" - "$PORT2" <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/model", timeout=10) as r:
    card = json.load(r)
print(f"    /v1/model: {card['name']} {card['version']} ({card['architecture']}), "
      f"{len(card['labels'])} labels")
EOF

log "docker-compose.yml: the cxr-triage-cpu service (profile cpu) on this image"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    if ! command -v docker-compose >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
    fi
    COMPOSE=(docker-compose)
fi
export COMPOSE_PROJECT_NAME=$PROJECT BASE_IMAGE=$BASE_TAG CXR_CPU_IMAGE=$IMAGE \
    CXR_CPU_PORT=$PORT3 CXR_BIND=127.0.0.1
(cd "$REPO" && "${COMPOSE[@]}" --profile cpu --profile monitoring config -q) \
    || die "compose rejects docker-compose.yml"
log "    $("${COMPOSE[@]}" version 2>/dev/null | head -1): config valid"
COMPOSE_UP=1
(cd "$REPO" && "${COMPOSE[@]}" --profile cpu up -d --no-build cxr-triage-cpu) \
    >"$WORK/compose.log" 2>&1 || die "compose up failed; see $WORK/compose.log"
COMPOSED=$(cd "$REPO" && "${COMPOSE[@]}" --profile cpu ps -q cxr-triage-cpu)
wait_ready "$COMPOSED" "$PORT3" 240 || die "compose service not ready"
check_predict "$PORT3"
for _ in $(seq 60); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$COMPOSED")
    [[ $health == healthy ]] && break
    sleep 2
done
[[ $health == healthy ]] || die "compose service health is '$health'"
log "    compose service healthy; read-only root: $(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$COMPOSED")"

log "air gap: a container with no network but its own loopback (--network none), checked from inside"
docker run -d --name "$CONTAINER3" --network none --read-only \
    --tmpfs /tmp --tmpfs /var/lib/cxr-triage:uid=10001,gid=10001,mode=0750 "$IMAGE" >/dev/null
docker exec -i "$CONTAINER3" python3 - <<'EOF' || die "the image does not serve without a network"
import json, os, re, struct, time, urllib.request, zlib

url = "http://127.0.0.1:%s" % os.environ.get("PORT", "8000")
def get(path, data=None, ctype=None):
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": ctype} if ctype else {})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, r.read()
deadline = time.monotonic() + 240
while True:
    try:
        if get("/readyz")[0] == 200:
            break
    except OSError:
        pass
    assert time.monotonic() < deadline, "not ready within 240 s"
    time.sleep(1)
rows = b"".join(b"\0" + bytes((x + y) % 256 for x in range(256)) for y in range(256))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 256, 256, 8, 0, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
status, body = get("/predict", png, "image/png")
assert status == 200, status
assets = re.findall(rb'(?:src|href)="(/[^"]+)"', get("/docs")[1] + get("/redoc")[1])
served = {a.decode(): get(a.decode())[0] for a in assets}
assert served and all(code == 200 for code in served.values()), served
print(f"    /readyz 200, /predict 200 ({len(json.loads(body)['findings'])} findings), docs assets {served}")
EOF
docker rm -f "$CONTAINER3" >/dev/null

log "docker stop (SIGTERM, graceful shutdown)"
stop_start=$(date +%s)
docker stop -t 30 "$CONTAINER" >/dev/null
log "    stopped in $(($(date +%s) - stop_start)) s, exit code $(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")"
docker logs --tail 5 "$CONTAINER" 2>&1 | cut -c1-200 | sed 's/^/    /'
