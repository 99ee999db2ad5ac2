#!/usr/bin/env bash
# Make an offline install bundle of the service on a connected machine, for an air-gapped host.
#
#   scripts/airgap-bundle.sh [--check] [OUT]       (OUT defaults to dist/airgap)
#
# OUT/wheelhouse/   every wheel the service needs (the base dependencies: no torch) and the
#                   project's own wheel, which carries /docs' Swagger UI and ReDoc files
# OUT/models/       models/default (or MODEL_DIR)
# OUT/install.sh    run on the air-gapped host: a venv from python3, `pip install --no-index`
#                   from the wheelhouse, the model beside it; needs nothing from any network
#
# --check: afterwards, install the bundle and serve it inside a network namespace that has only
# loopback (unshare -rn), answer /readyz, /predict (a generated PNG), /docs and its assets, then
# stop it. That is the air-gapped host, simulated: nothing outside this machine can be reached.
#
# Knobs (environment):
#   ORT_EXTRAS  onnxruntime-gpu extras: "" (default: CPU provider, ~0.5 GB bundle) or
#               "cuda,cudnn" (NVIDIA's CUDA/cuDNN wheels as in the GPU image, ~3 GB)
#   PYTHON      interpreter that builds the wheels (default python3); the target host needs the
#               same Python minor version and a compatible platform (manylinux x86_64). For
#               another target, add e.g. PIP_ARGS="--platform manylinux_2_28_x86_64
#               --python-version 3.11 --only-binary=:all:" (pip download rules apply).
#   MODEL_DIR   model folder to carry (default models/default)
set -euo pipefail

CHECK=0
if [[ ${1:-} == --check ]]; then
    CHECK=1
    shift
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${1:-$REPO/dist/airgap}" && cd "${1:-$REPO/dist/airgap}" && pwd)
PYTHON=${PYTHON:-python3}
ORT_EXTRAS=${ORT_EXTRAS-}
MODEL_DIR=${MODEL_DIR:-$REPO/models/default}
read -r -a PIP_ARGS <<<"${PIP_ARGS:-}"

log() { printf '[airgap] %s\n' "$*"; }

rm -rf "$OUT/wheelhouse" "$OUT/models"
mkdir -p "$OUT/wheelhouse" "$OUT/models"
log "building the wheelhouse in $OUT/wheelhouse (this machine needs PyPI)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A copy of the tracked tree: no stale build/ or .venv goes into the project's wheel.
git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 tar -cf - --no-recursion) | tar -xf - -C "$work"
requirements=("$work")
[[ -n $ORT_EXTRAS ]] && requirements+=("onnxruntime-gpu[$ORT_EXTRAS]")
"$PYTHON" -m pip wheel --quiet "${PIP_ARGS[@]}" --wheel-dir "$OUT/wheelhouse" "${requirements[@]}"
cp -r "$MODEL_DIR" "$OUT/models/default"

cat >"$OUT/install.sh" <<'EOF'
#!/usr/bin/env bash
# Install cxr-triage from this bundle with no network: ./install.sh [DEST] (default /opt/cxr-triage)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEST=${1:-/opt/cxr-triage}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
"$PYTHON" -m venv "$DEST/venv"
# Only the wheelhouse: no index, and no pip configuration of this host pointing anywhere else.
PIP_CONFIG_FILE=/dev/null "$DEST/venv/bin/python" -m pip install --quiet --no-index \
    --disable-pip-version-check --find-links "$HERE/wheelhouse" cxr-triage
rm -rf "$DEST/models" && cp -r "$HERE/models" "$DEST/models"
echo "installed; serve with:"
echo "  CXR_MODEL_DIR=$DEST/models/default $DEST/venv/bin/cxr-triage serve --host 0.0.0.0 --port 8000"
EOF
chmod +x "$OUT/install.sh"
log "bundle: $(du -sh "$OUT" | cut -f1), $(find "$OUT/wheelhouse" -name '*.whl' | wc -l) wheels"

((CHECK)) || exit 0

log "check: install and serve inside a loopback-only network namespace"
unshare -rn true 2>/dev/null || { log "cannot unshare a network namespace here"; exit 1; }
target=$(mktemp -d)
trap 'rm -rf "$work" "$target"' EXIT
env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT \
    unshare -rn "$PYTHON" - "$OUT" "$target" <<'EOF'
import fcntl, json, re, socket, struct, subprocess, sys, time, urllib.request, zlib

bundle, target = sys.argv[1], sys.argv[2]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # ip link set lo up
    ifr = struct.pack("16sh14x", b"lo", 0)
    flags = struct.unpack("16sh14x", fcntl.ioctl(s, 0x8913, ifr))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sh14x", b"lo", flags | 1))
print("  interfaces:", [name for _, name in socket.if_nameindex()])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    try:
        s.connect(("192.0.2.1", 9))
        sys.exit("  a route off this host exists: not an air gap")
    except OSError as exc:
        print("  off-host route:", exc.strerror)
started = time.monotonic()
subprocess.run([f"{bundle}/install.sh", target], check=True)
print(f"  offline install took {time.monotonic() - started:.0f} s")
log = open(f"{target}/serve.log", "w+")
server = subprocess.Popen(
    [f"{target}/venv/bin/cxr-triage", "serve", "--port", "0"], cwd=target, stdout=log,
    stderr=subprocess.STDOUT,
    env={"PATH": "/usr/bin:/bin", "CXR_MODEL_DIR": f"{target}/models/default",
         "CXR_PACS_ENABLED": "false", "CXR_AUDIT_DB": ""},
)
try:
    deadline, url = time.monotonic() + 300, None
    while url is None:
        assert server.poll() is None and time.monotonic() < deadline, open(log.name).read()[-2000:]
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", open(log.name).read())
        url = found and found.group(1)
        time.sleep(0.2)

    def get(path, data=None, ctype=None):
        req = urllib.request.Request(url + path, data=data, headers={"Content-Type": ctype} if ctype else {})
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()

    rows = b"".join(b"\0" + bytes((x + y) % 256 for x in range(256)) for y in range(256))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 256, 256, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    print("  /readyz", get("/readyz")[0])
    status, body = get("/predict", png, "image/png")
    print("  /predict", status, len(json.loads(body)["findings"]), "findings")
    status, page = get("/docs")
    assets = re.findall(rb'(?:src|href)="(/[^"]+)"', page)
    print("  /docs", status, "assets", [(a.decode(), get(a.decode())[0]) for a in assets])
    print("  /redoc", get("/redoc")[0])
finally:
    server.terminate()
    print("  server exit", server.wait(60))
EOF
log "check passed"
