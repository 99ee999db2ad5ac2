#!/usr/bin/env bash
# Refresh the Swagger UI and ReDoc files that /docs and /redoc serve from app/api/static/.
#
# They come from the upstream npm packages (swagger-ui-dist by SmartBear, Apache-2.0; redoc by
# Redocly, MIT), each copied with its licence files, so the service needs no CDN. One line is
# changed: ReDoc 2 always renders the Redocly logo from cdn.redoc.ly in its side menu, so that
# URL becomes an empty data: URI (the image then fails to load and ReDoc hides it; the
# "API docs by Redocly" text stays). tests/test_docs_browser.py fails if either page reaches
# anything but the service, so an upgrade that adds a remote fetch is caught.
#
# Usage (needs npm and the registry): scripts/vendor-docs-assets.sh [SWAGGER_VERSION] [REDOC_VERSION]
# Redoc stays on major 2: FastAPI's get_redoc_html() is written for it, and 3.x adds telemetry.
set -euo pipefail

SWAGGER_VERSION=${1:-5.35.0}
REDOC_VERSION=${2:-2.5.4}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATIC=$REPO/app/api/static
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

(cd "$WORK" && npm pack --silent "swagger-ui-dist@$SWAGGER_VERSION" "redoc@$REDOC_VERSION" >/dev/null)
mkdir -p "$WORK/swagger" "$WORK/redoc"
tar -xzf "$WORK/swagger-ui-dist-$SWAGGER_VERSION.tgz" -C "$WORK/swagger"
tar -xzf "$WORK/redoc-$REDOC_VERSION.tgz" -C "$WORK/redoc"

rm -rf "$STATIC/swagger-ui" "$STATIC/redoc"
mkdir -p "$STATIC/swagger-ui" "$STATIC/redoc"
for f in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css LICENSE NOTICE \
    favicon-32x32.png; do
    cp "$WORK/swagger/package/$f" "$STATIC/swagger-ui/$f"
done
for f in bundles/redoc.standalone.js bundles/redoc.standalone.js.LICENSE.txt LICENSE; do
    cp "$WORK/redoc/package/$f" "$STATIC/redoc/$(basename "$f")"
done
# Source maps are not shipped: drop the comments that point browsers' dev tools at them.
sed -i '/^\/[/*]# sourceMappingURL=/d' "$STATIC/swagger-ui/swagger-ui-bundle.js" \
    "$STATIC/swagger-ui/swagger-ui.css" "$STATIC/redoc/redoc.standalone.js"

logo='"https://cdn.redoc.ly/redoc/logo-mini.svg"'
count=$(grep -o "$logo" "$STATIC/redoc/redoc.standalone.js" | wc -l)
[[ $count == 1 ]] || { echo "expected the Redocly logo URL once in redoc $REDOC_VERSION, found $count" >&2; exit 1; }
sed -i "s|$logo|\"data:,\"|" "$STATIC/redoc/redoc.standalone.js"

{
    echo "swagger-ui-dist $SWAGGER_VERSION (Apache-2.0, SmartBear Software): swagger-ui/"
    echo "redoc $REDOC_VERSION (MIT, Redocly): redoc/ (Redocly logo URL replaced by \"data:,\")"
    echo "Made by scripts/vendor-docs-assets.sh; sha256 of each file:"
    (cd "$STATIC" && sha256sum swagger-ui/* redoc/*)
} >"$STATIC/VERSIONS.txt"
cat "$STATIC/VERSIONS.txt"
