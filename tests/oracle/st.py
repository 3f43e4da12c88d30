"""Minimal safetensors reader/writer with numpy + json + struct (no safetensors library here).

Format: [u64 little-endian header length N][N bytes of JSON header][raw little-endian tensor bytes].
Header: {"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
         "__metadata__": {"key": "string"}}; offsets are relative to the start of the byte buffer.

    write(path, {"q": np.ndarray, ...}, metadata=None)
    read(path) -> {"q": np.ndarray, ...}
    read_with_metadata(path) -> (tensors, metadata)
    read_header(path) -> (header dict, data offset)
"""
import json
import struct

import numpy as np

# dtype name -> numpy dtype (little-endian). BF16 is handled separately (numpy has no bfloat16).
_NP = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_SIZE = {"BF16": 2, **{k: v.itemsize for k, v in _NP.items()}}


def _dtype_name(a):
    for name, dt in _NP.items():
        if a.dtype == dt or (a.dtype.kind == dt.kind and a.dtype.itemsize == dt.itemsize):
            return name
    raise TypeError(f"safetensors: unsupported numpy dtype {a.dtype}")


def serialize(tensors, metadata=None, dtypes=None):
    """Bytes of a safetensors file. `dtypes` may force a name (e.g. {"x": "BF16"}) for float32 input."""
    header = {}
    blobs = []
    offset = 0
    for name in tensors:
        a = np.array(tensors[name], order="C", copy=False)
        forced = (dtypes or {}).get(name)
        if forced == "BF16":
            u = np.array(a, dtype="<f4", order="C").view("<u4")
            # round to nearest even
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
            raw, dname = u.tobytes(), "BF16"
        else:
            dname = forced or _dtype_name(a)
            raw = a.astype(_NP[dname], copy=False).tobytes()
        header[name] = {"dtype": dname, "shape": [int(s) for s in a.shape],
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)  # align the data to 8 bytes (as the reference lib does)
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(blobs)


def write(path, tensors, metadata=None, dtypes=None):
    with open(path, "wb") as f:
        f.write(serialize(tensors, metadata, dtypes))


def parse_header(buf):
    if len(buf) < 8:
        raise ValueError("safetensors: file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise ValueError(f"safetensors: header length {n} exceeds file size {len(buf)}")
    header = json.loads(buf[8:8 + n].decode("utf-8"))
    return header, 8 + n


def read_header(path):
    with open(path, "rb") as f:
        buf = f.read()
    return parse_header(buf)


def parse(buf):
    header, start = parse_header(buf)
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        dname = info["dtype"]
        shape = tuple(int(s) for s in info["shape"])
        b, e = info["data_offsets"]
        raw = buf[start + b:start + e]
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if len(raw) != e - b or e - b != numel * _SIZE[dname]:
            raise ValueError(f"safetensors: tensor {name!r}: bad data_offsets {b},{e} for {dname}{list(shape)}")
        if dname == "BF16":
            u = np.frombuffer(raw, dtype="<u2").astype("<u4") << 16
            a = u.view("<f4").reshape(shape).copy()
        else:
            a = np.frombuffer(raw, dtype=_NP[dname]).reshape(shape).copy()
        out[name] = a
    return out, meta


def read_with_metadata(path):
    with open(path, "rb") as f:
        buf = f.read()
    return parse(buf)


def read(path):
    return read_with_metadata(path)[0]
