"""Character vectors out of an R lazy-load database (`data/Rdata.rdb`), stdlib only.

An .rdb file is a sequence of records, each a big-endian u32 (the uncompressed length) followed by
a zlib stream holding one object in R's XDR serialization format. The janeaustenr package stores each
novel as one character vector (STRSXP) of lines; nothing else is needed here, so this reads exactly
that: the serialization header, then a STRSXP of CHARSXPs. Anything else is reported, not guessed.
"""
import struct
import zlib

STRSXP, CHARSXP = 16, 9


class RDataError(Exception):
    pass


def records(blob):
    """Yields the decompressed bytes of every record of an .rdb file."""
    pos = 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise RDataError(f"truncated record header at byte {pos}")
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        d = zlib.decompressobj()
        out = d.decompress(blob[pos + 4:])
        if len(out) != length or not d.eof:
            raise RDataError(f"record at byte {pos}: expected {length} bytes, got {len(out)}")
        pos = len(blob) - len(d.unused_data)
        yield out


def _int(buf, pos):
    return struct.unpack(">i", buf[pos:pos + 4])[0], pos + 4


def string_vector(obj):
    """Decodes a serialized STRSXP; returns its strings (NA as None)."""
    if obj[:2] != b"X\n":
        raise RDataError("not an XDR serialization")
    pos = 2
    version, pos = _int(obj, pos)
    pos += 8  # writer and minimal reader versions
    if version == 3:
        n, pos = _int(obj, pos)
        pos += n  # native encoding name
    elif version != 2:
        raise RDataError(f"serialization version {version}")
    flags, pos = _int(obj, pos)
    if flags & 0xFF != STRSXP:
        raise RDataError(f"object type {flags & 0xFF}, expected a character vector")
    count, pos = _int(obj, pos)
    out = []
    for _ in range(count):
        flags, pos = _int(obj, pos)
        if flags & 0xFF != CHARSXP:
            raise RDataError(f"element type {flags & 0xFF}, expected a string")
        n, pos = _int(obj, pos)
        if n == -1:
            out.append(None)
            continue
        raw = obj[pos:pos + n]
        pos += n
        # Bit 12 is R's LATIN1 mark; everything else is UTF-8 or ASCII.
        out.append(raw.decode("latin-1" if flags & (1 << 12) else "utf-8"))
    return out


def string_vectors(path):
    with open(path, "rb") as f:
        blob = f.read()
    return [string_vector(r) for r in records(blob)]
