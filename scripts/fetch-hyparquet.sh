#!/usr/bin/env bash
# Prepares the Parquet reader the lens pages of a parquet-mode site (`report build
# --lens-data parquet`) read their cells with, for `llava-interp report build` to vendor into
# site/vendor/hyparquet/ (no CDN).
#
#   bash scripts/fetch-hyparquet.sh [DEST]      # DEST defaults to .cache/hyparquet (git-ignored)
#
# Installs pinned npm packages with npm (registry access needed once) into DEST/npm and
# writes DEST/vendor/:
#   hyparquet.bundle.mjs   one ESM file: hyparquet (pure JS Parquet reader, async HTTP range
#                          reads) with hyparquet-compressors (zstd through fzstd), bundled and
#                          minified by esbuild; it exports parquetMetadataAsync, parquetRead,
#                          parquetReadObjects, asyncBufferFromUrl, cachedAsyncBuffer, compressors
#   LICENSE-*.txt, VERSION.json  licences, the pinned versions and the bundle's sha256
# The report build finds DEST/vendor under the repository by itself; elsewhere set
# LLAVA_INTERP_HYPARQUET=DEST/vendor. Rerunning with the same pins does nothing.
# Keep HYPARQUET_VERSION equal to report/hyparquet.py.
set -euo pipefail
HYPARQUET_VERSION=1.33.0
HYPARQUET_COMPRESSORS_VERSION=1.1.2
ESBUILD_VERSION=0.25.12  # as scripts/fetch-duckdb-wasm.sh

cd "$(dirname "$0")/.."
DEST="${1:-.cache/hyparquet}"
VENDOR="$DEST/vendor"
PINS="hyparquet=$HYPARQUET_VERSION hyparquet-compressors=$HYPARQUET_COMPRESSORS_VERSION esbuild=$ESBUILD_VERSION"

if [[ -f "$VENDOR/VERSION.json" ]] && grep -q "\"pins\": \"$PINS\"" "$VENDOR/VERSION.json"; then
    echo "hyparquet $HYPARQUET_VERSION already prepared in $VENDOR"
    exit 0
fi
command -v npm >/dev/null || { echo "Error: npm is needed (Node.js 18+); install Node.js and rerun" >&2; exit 1; }

mkdir -p "$DEST/npm"
# A package.json of its own, so npm never walks up into (or writes to) a parent project.
[[ -f "$DEST/npm/package.json" ]] || echo '{"name": "llava-interp-hyparquet-cache", "private": true}' > "$DEST/npm/package.json"
npm install --prefix "$DEST/npm" --no-save --no-audit --no-fund --loglevel=error \
    "hyparquet@$HYPARQUET_VERSION" "hyparquet-compressors@$HYPARQUET_COMPRESSORS_VERSION" "esbuild@$ESBUILD_VERSION"

MODULES="$DEST/npm/node_modules"
for pin in "hyparquet=$HYPARQUET_VERSION" "hyparquet-compressors=$HYPARQUET_COMPRESSORS_VERSION"; do
    name="${pin%%=*}" want="${pin#*=}"
    installed=$(node -p 'require(process.argv[1]).version' "$(cd "$MODULES/$name" && pwd)/package.json")
    [[ "$installed" == "$want" ]] || { echo "Error: npm installed $name $installed, not $want" >&2; exit 1; }
done

STAGE="$DEST/vendor.tmp"
rm -rf "$STAGE"
mkdir -p "$STAGE"
# The entry re-exports what the lens page uses (report/hyparquet.py, templates/static/lens-parquet.js).
cat > "$DEST/npm/entry.mjs" <<'EOF'
export { parquetMetadataAsync, parquetRead, parquetReadObjects, asyncBufferFromUrl, cachedAsyncBuffer } from "hyparquet";
export { compressors } from "hyparquet-compressors";
EOF
"$MODULES/.bin/esbuild" "$DEST/npm/entry.mjs" --bundle --format=esm --platform=browser \
    --target=es2020 --minify --legal-comments=eof --log-level=warning --outfile="$STAGE/hyparquet.bundle.mjs"
for name in hyparquet hyparquet-compressors fzstd hysnappy; do
    if [[ -f "$MODULES/$name/LICENSE" ]]; then
        cp "$MODULES/$name/LICENSE" "$STAGE/LICENSE-$name.txt"
    else
        license=$(node -p 'require(process.argv[1]).license' "$(cd "$MODULES/$name" && pwd)/package.json")
        echo "$name is released under the $license licence (package.json \"license\")." > "$STAGE/LICENSE-$name.txt"
    fi
done

node - "$STAGE" "$PINS" "$HYPARQUET_VERSION" "$HYPARQUET_COMPRESSORS_VERSION" "$ESBUILD_VERSION" <<'EOF'
const [stage, pins, hyparquet, compressors, esbuild] = process.argv.slice(2);
const fs = require("fs"), path = require("path"), crypto = require("crypto");
const files = {};
for (const name of ["hyparquet.bundle.mjs"]) {
  const data = fs.readFileSync(path.join(stage, name));
  files[name] = {bytes: data.length, sha256: crypto.createHash("sha256").update(data).digest("hex")};
}
const manifest = {pins, hyparquet, "hyparquet-compressors": compressors, esbuild, files};
fs.writeFileSync(path.join(stage, "VERSION.json"), JSON.stringify(manifest, null, 2) + "\n");
EOF
# Keep the one-line "pins" key greppable by the up-to-date check above.
grep -q "\"pins\": \"$PINS\"" "$STAGE/VERSION.json"

rm -rf "$VENDOR"
mv "$STAGE" "$VENDOR"
echo "Prepared hyparquet $HYPARQUET_VERSION in $VENDOR:"
ls -l "$VENDOR"
