#!/usr/bin/env bash
# Prepares the DuckDB-WASM files the site's SQL console (sql.html) needs, for
# `llava-interp report build` to vendor into site/vendor/duckdb-wasm/ (no CDN).
#
#   bash scripts/fetch-duckdb-wasm.sh [DEST]      # DEST defaults to .cache/duckdb-wasm (git-ignored)
#
# Installs pinned npm packages with npm (registry access needed once) into DEST/npm and
# writes DEST/vendor/:
#   duckdb-browser.bundle.mjs    the ESM entry of @duckdb/duckdb-wasm, bundled by esbuild with
#                                its one dependency (apache-arrow), so the browser needs no
#                                import map and no bare module specifiers
#   duckdb-browser-eh.worker.js  the single-threaded "eh" worker (no COOP/COEP headers needed)
#   duckdb-eh.wasm               the matching WebAssembly module (about 18 MB; DuckDB 0.9.1 with Parquet built in)
#   LICENSE-*.txt, VERSION.json  licences, the pinned versions and each file's sha256
# The report build finds DEST/vendor under the repository by itself; elsewhere set
# LLAVA_INTERP_DUCKDB_WASM=DEST/vendor. Rerunning with the same pins does nothing.
# Keep DUCKDB_WASM_VERSION equal to report/duckdb_wasm.py (tests/test_sql_console.py checks).
set -euo pipefail
DUCKDB_WASM_VERSION=1.28.0  # DuckDB 0.9.1: the last release with the parquet extension built into the WASM
APACHE_ARROW_VERSION=13.0.0 # the version @duckdb/duckdb-wasm 1.28.0 depends on (^13.0.0)
ESBUILD_VERSION=0.25.12

cd "$(dirname "$0")/.."
DEST="${1:-.cache/duckdb-wasm}"
VENDOR="$DEST/vendor"
PINS="duckdb-wasm=$DUCKDB_WASM_VERSION apache-arrow=$APACHE_ARROW_VERSION esbuild=$ESBUILD_VERSION"

if [[ -f "$VENDOR/VERSION.json" ]] && grep -q "\"pins\": \"$PINS\"" "$VENDOR/VERSION.json"; then
    echo "DuckDB-WASM $DUCKDB_WASM_VERSION already prepared in $VENDOR"
    exit 0
fi
command -v npm >/dev/null || { echo "Error: npm is needed (Node.js 18+); install Node.js and rerun" >&2; exit 1; }

mkdir -p "$DEST/npm"
# A package.json of its own, so npm never walks up into (or writes to) a parent project.
[[ -f "$DEST/npm/package.json" ]] || echo '{"name": "llava-interp-duckdb-wasm-cache", "private": true}' > "$DEST/npm/package.json"
npm install --prefix "$DEST/npm" --no-save --no-audit --no-fund --loglevel=error \
    "@duckdb/duckdb-wasm@$DUCKDB_WASM_VERSION" "apache-arrow@$APACHE_ARROW_VERSION" "esbuild@$ESBUILD_VERSION"

PKG="$DEST/npm/node_modules/@duckdb/duckdb-wasm"
DIST="$PKG/dist"
installed=$(node -p 'require(process.argv[1]).version' "$(cd "$PKG" && pwd)/package.json")
[[ "$installed" == "$DUCKDB_WASM_VERSION" ]] || { echo "Error: npm installed @duckdb/duckdb-wasm $installed, not $DUCKDB_WASM_VERSION" >&2; exit 1; }

STAGE="$DEST/vendor.tmp"
rm -rf "$STAGE"
mkdir -p "$STAGE"
"$DEST/npm/node_modules/.bin/esbuild" "$DIST/duckdb-browser.mjs" --bundle --format=esm --platform=browser \
    --target=es2020 --minify --legal-comments=eof --log-level=warning --outfile="$STAGE/duckdb-browser.bundle.mjs"
cp "$DIST/duckdb-browser-eh.worker.js" "$DIST/duckdb-eh.wasm" "$STAGE/"
cp "$DEST/npm/node_modules/apache-arrow/LICENSE.txt" "$STAGE/LICENSE-apache-arrow.txt"
cp "$DEST/npm/node_modules/apache-arrow/NOTICE.txt" "$STAGE/NOTICE-apache-arrow.txt"
cat > "$STAGE/LICENSE-duckdb-wasm.txt" <<'EOF'
@duckdb/duckdb-wasm is released under the MIT License (package.json "license": "MIT").
Copyright 2018-2025 Stichting DuckDB Foundation
https://github.com/duckdb/duckdb-wasm/blob/main/LICENSE
EOF

node - "$STAGE" "$PINS" "$DUCKDB_WASM_VERSION" "$APACHE_ARROW_VERSION" "$ESBUILD_VERSION" <<'EOF'
const [stage, pins, duckdbWasm, arrow, esbuild] = process.argv.slice(2);
const fs = require("fs"), path = require("path"), crypto = require("crypto");
const files = {};
for (const name of ["duckdb-browser.bundle.mjs", "duckdb-browser-eh.worker.js", "duckdb-eh.wasm"]) {
  const data = fs.readFileSync(path.join(stage, name));
  files[name] = {bytes: data.length, sha256: crypto.createHash("sha256").update(data).digest("hex")};
}
const manifest = {pins, "@duckdb/duckdb-wasm": duckdbWasm, "apache-arrow": arrow, esbuild, bundle: "eh", files};
fs.writeFileSync(path.join(stage, "VERSION.json"), JSON.stringify(manifest, null, 2) + "\n");
EOF
# Keep the one-line "pins" key greppable by the up-to-date check above.
grep -q "\"pins\": \"$PINS\"" "$STAGE/VERSION.json"

rm -rf "$VENDOR"
mv "$STAGE" "$VENDOR"
echo "Prepared DuckDB-WASM $DUCKDB_WASM_VERSION (eh bundle) in $VENDOR:"
ls -l "$VENDOR"
