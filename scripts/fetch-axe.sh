#!/usr/bin/env bash
# Installs a pinned axe-core (the accessibility engine) for tests/test_site_validation.py,
# which injects DEST/node_modules/axe-core/axe.min.js into each site page with Playwright.
#
#   bash scripts/fetch-axe.sh [DEST]      # DEST defaults to .cache/axe-core (git-ignored)
#
# npm (registry access needed once); rerunning with the same pin does nothing.
set -euo pipefail
AXE_CORE_VERSION=4.10.3

cd "$(dirname "$0")/.."
DEST="${1:-.cache/axe-core}"
PKG="$DEST/node_modules/axe-core"
if [[ -f "$PKG/axe.min.js" ]] && [[ "$(node -p 'require(process.argv[1]).version' "$(cd "$PKG" && pwd)/package.json")" == "$AXE_CORE_VERSION" ]]; then
    echo "axe-core $AXE_CORE_VERSION already installed in $PKG"
    exit 0
fi
command -v npm >/dev/null || { echo "Error: npm is needed (Node.js 18+); install Node.js and rerun" >&2; exit 1; }
mkdir -p "$DEST"
# A package.json of its own, so npm never walks up into (or writes to) a parent project.
[[ -f "$DEST/package.json" ]] || echo '{"name": "llava-interp-axe-cache", "private": true}' > "$DEST/package.json"
npm install --prefix "$DEST" --no-save --no-audit --no-fund --loglevel=error "axe-core@$AXE_CORE_VERSION"
installed=$(node -p 'require(process.argv[1]).version' "$(cd "$PKG" && pwd)/package.json")
[[ "$installed" == "$AXE_CORE_VERSION" ]] || { echo "Error: npm installed axe-core $installed, not $AXE_CORE_VERSION" >&2; exit 1; }
echo "Installed axe-core $AXE_CORE_VERSION in $PKG"
