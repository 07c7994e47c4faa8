#!/usr/bin/env bash
# Fetch the page's third-party front-end libraries again from the npm registry (`npm pack`, exact versions)
# into static/vendor/<lib>/, keeping only the files the page loads and each package's LICENSE.
# Run it after changing a version below; commit what it writes (the page never loads anything from a CDN).
# Needs npm and the registry; nothing is installed and no package script runs (`npm pack` only downloads).
set -euo pipefail
cd "$(dirname "$0")/.."

MARKDOWN_IT=15.0.3
DOMPURIFY=3.5.0
KATEX=0.19.1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

unpack() {  # unpack NAME VERSION: the package's tarball, unpacked in $work/NAME/package
  mkdir -p "$work/$1"
  (cd "$work/$1" && npm pack --silent "$1@$2" >/dev/null && tar -xzf ./*.tgz)
}

vendor() {  # vendor NAME VERSION FILE...: copy FILE (relative to the package) into static/vendor/NAME/
  local name=$1 version=$2 dest=static/vendor/$1
  shift 2
  rm -rf "$dest"
  mkdir -p "$dest"
  for file in "$@"; do
    mkdir -p "$dest/$(dirname "$file")"
    cp -R "$work/$name/package/$file" "$dest/$file"
  done
  echo "$version" >"$dest/VERSION"
  echo "static/vendor/$name: $name@$version"
}

unpack markdown-it "$MARKDOWN_IT"
vendor markdown-it "$MARKDOWN_IT" LICENSE dist/browser/markdown-it.umd.min.js
unpack dompurify "$DOMPURIFY"
vendor dompurify "$DOMPURIFY" LICENSE LICENSE-MPL dist/purify.min.js
unpack katex "$KATEX"
vendor katex "$KATEX" LICENSE dist/katex.min.js dist/katex.min.css dist/fonts
