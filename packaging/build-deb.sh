#!/usr/bin/env bash
# Build the vipd Debian package in build/deb (never committed): copies the tracked source tree, puts
# packaging/debian in place, derives the packaged unit from systemd/vipd.service, runs
# dpkg-buildpackage (dh-virtualenv: dependencies from PyPI only), then lintian (fails on errors).
# Usage: packaging/build-deb.sh [OUTDIR]   -> OUTDIR/vipd_<version>_<arch>.deb (default build/deb)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-$root/build/deb}")"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")"
src="$out/src/vipd-$version"
rm -rf "$out/src"
mkdir -p "$src"
# tracked and new (not ignored) files: what a commit of this tree would hold, without .venv or build outputs
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c \
    'test -e "{}" && cp --parents -a "{}" "'"$src"'"')
cp -a "$root/packaging/debian" "$src/debian"
# the one unit, with the packaged path of the binary
sed 's|/usr/local/bin/vipd|/usr/sbin/vipd|g' "$root/systemd/vipd.service" > "$src/debian/vipd.service"
(cd "$src" && dpkg-buildpackage -us -uc -b >"$out/build.log" 2>&1) || { tail -40 "$out/build.log"; exit 1; }
deb="$(ls "$out"/src/vipd_"$version"_*.deb)"
mv "$out"/src/vipd_"$version"_* "$out/"
deb="$out/$(basename "$deb")"
lintian --fail-on error --suppress-tags-from-file "$root/packaging/lintian-suppress" "$deb" | tee "$out/lintian.log"
echo "$deb"
