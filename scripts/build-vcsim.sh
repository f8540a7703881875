#!/bin/sh
# Build hotvm's vcsim (scripts/vcsim/main.go) offline from Debian's golang-go and
# golang-github-vmware-govmomi-dev (sources under /usr/share/gocode). Idempotent: rebuilds only when
# main.go is newer than the binary. Prints the binary's path on its last line.
#   VCSIM_CACHE  where the binary and Go's build cache go (default: ~/.cache/hotvm/vcsim, never committed)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${VCSIM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hotvm/vcsim}
src=$here/scripts/vcsim/main.go
bin=$cache/vcsim
if ! command -v go >/dev/null 2>&1; then
    echo "build-vcsim: 'go' not found: apt-get install golang-go golang-github-vmware-govmomi-dev" >&2
    exit 2
fi
if [ ! -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]; then
    echo "build-vcsim: govmomi sources missing: apt-get install golang-github-vmware-govmomi-dev" >&2
    exit 2
fi
if [ -x "$bin" ] && [ "$bin" -nt "$src" ]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache/gopath/src/hotvm-vcsim" "$cache/go-build"
cp "$src" "$cache/gopath/src/hotvm-vcsim/main.go"
cd "$cache/gopath/src/hotvm-vcsim"
GO111MODULE=off GOPATH="$cache/gopath:/usr/share/gocode" GOCACHE="$cache/go-build" \
    GOPROXY=off go build -o "$bin.tmp" .
mv "$bin.tmp" "$bin"
echo "$bin"
