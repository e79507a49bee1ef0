#!/usr/bin/env bash
# Generate Python code for every .proto under proto/ into nodeagent/pb/ (committed).
# With --check, generate into a temporary tree and fail if it differs (drift check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=nodeagent/pb
mode=${1:-}
if [ "$mode" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
protos=$( { [ -d proto ] && cd proto && find . -name '*.proto' | sed 's|^\./||' | sort; } || true)
if [ -z "$protos" ]; then echo "gen: no protos"; exit 0; fi
mkdir -p "$out"
wkt=$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
gapi=$("$PY" -c 'import google.rpc.status_pb2 as m, os; print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))')
# shellcheck disable=SC2086
"$PY" -m grpc_tools.protoc -Iproto -I"$wkt" -I"$gapi" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" $protos
# Generated modules import each other as top-level packages (istio.workload...);
# rewrite those imports to live under nodeagent.pb.
find "$out" -name '*.py' -o -name '*.pyi' | while read -r f; do
  sed -i -E 's/^from (istio|envoy)([. ])/from nodeagent.pb.\1\2/; s/^import (istio|envoy)\./import nodeagent.pb.\1./' "$f"
done
find "$out" -type d -exec touch {}/__init__.py \;
if [ "$mode" = "--check" ]; then
  if ! diff -r -x __pycache__ "$out" nodeagent/pb >/dev/null; then
    echo "gen: nodeagent/pb is out of date with proto/ (run make gen)" >&2
    diff -r -x __pycache__ "$out" nodeagent/pb | head -20 >&2
    exit 1
  fi
  echo "gen: up to date"
fi
