"""The mta binary the GPU benches drive (bench/attn_gpu.py, bench/train_gpu.py)."""
import pathlib
import sys


def require(path, script):
    """Exits with one line when `path` is not a file, naming env.sh where gpu-pack.sh's compressed copy
    (PATH.xz, which env.sh unpacks) is still all there is."""
    if not pathlib.Path(path).is_file():
        hint = " (source .device/env.sh first: it unpacks the binaries)" if pathlib.Path(path + ".xz").is_file() else ""
        sys.exit(f"{pathlib.Path(script).name}: no mta binary at {path}{hint}")
