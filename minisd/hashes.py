"""File hashes as the Stable Diffusion tools write them, each computed once per file and cached on disk.

    model_hash(path)   AUTOMATIC1111's "Model hash": sha256 of the whole file, first 10 hex digits (a diffusers
                       folder, which webui does not load: of its unet/ weights file)
    lora_hash(path)    webui's "Lora hashes" entry (civitai's AutoV3): for .safetensors the sha256 of the bytes after
                       the header (8-byte little-endian length n, then n bytes of JSON), so editing the metadata keeps
                       the hash; for other files the sha256 of the whole file; first 12 hex digits. (webui shows the
                       file's `sshs_model_hash` metadata instead where there is one: for kohya's and minisd's files
                       that is the same value.)
    kohya_hashes(...)  kohya's `sshs_model_hash` / `sshs_legacy_hash` metadata, from the tensors and the ss_* metadata
    cached(...)        any such value, cached by file (train.py: the base U-Net's tensor hash, minisd_base_unet_sha256,
                       keyed by the checkpoint's U-Net file and the dtype it was loaded in)

The cache (as webui's cache.json does it) is a JSON file, by default $XDG_CACHE_HOME/minisd/hashes.json
(~/.cache/...), keyed by the resolved path, the size and the modification time: a changed file is hashed again.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import save as safetensors_bytes

from .checkpoint import CheckpointError
from .layouts import weights_file

BLOCK = 1 << 20  # bytes read at a time


def default_cache():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minisd" / "hashes.json"


def sha256_file(path, start=0):
    """sha256 (hex) of the file's bytes from offset `start` to the end."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for chunk in iter(lambda: f.read(BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def safetensors_data_start(path):
    """The offset of a .safetensors file's tensor bytes: 8 + the header length stored in its first 8 bytes."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    if size < 8 or 8 + n > size:
        raise CheckpointError(f"{path}: not a safetensors file (header of {n} bytes in a file of {size})")
    return 8 + n


def safetensors_data_sha256(path):
    """sha256 of a .safetensors file's tensor bytes (all that follows the header)."""
    return sha256_file(path, safetensors_data_start(path))


def cached(path, kind, compute, cache):
    """compute(path) -> str, or its value from `cache` (a JSON file) if the file's size and mtime are unchanged.
    An unreadable cache counts as empty; one that cannot be written is left as it is."""
    path, cache = Path(path).resolve(), Path(cache)
    stat = path.stat()
    key = f"{kind}:{path}"
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    table = table if isinstance(table, dict) else {}
    entry = table.get(key)
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    table[key] = {**stamp, "sha256": compute(path)}
    try:  # another process may write too: each writes a whole file and renames it into place
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, suffix=".tmp", delete=False) as f:
            json.dump(table, f)
        os.replace(f.name, cache)
    except OSError:
        pass
    return table[key]["sha256"]


def unet_file(path):
    """The file a checkpoint's U-Net comes from: the file itself, or the unet/ weights file that minisd.load reads
    from a diffusers folder (its .safetensors before .bin before the fp16 variants)."""
    path = Path(path)
    return weights_file(path / "unet", "diffusion_pytorch_model") if path.is_dir() else path


def model_hash(path, cache=None):
    """webui's "Model hash" of a checkpoint file (a diffusers folder: of its U-Net weights)."""
    return cached(unet_file(path), "file", sha256_file, cache or default_cache())[:10]


def lora_hash(path, cache=None):
    """webui's "Lora hashes" value of an adapter file."""
    if Path(path).suffix != ".safetensors":
        return cached(path, "file", sha256_file, cache or default_cache())[:12]
    return cached(path, "safetensors-data", safetensors_data_sha256, cache or default_cache())[:12]


def kohya_hashes(tensors, metadata):
    """(sshs_model_hash, sshs_legacy_hash) as kohya's trainers write them: both from the bytes of the file that the
    tensors and only the ss_* metadata would make. model: sha256 of the bytes after the header (the full 64 hex
    digits; equal to the written file's, whatever else its metadata holds); legacy: sha256 of the 64 KiB at offset
    1 MiB (of nothing, for a smaller file), first 8 hex digits."""
    raw = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    start = 8 + int.from_bytes(raw[:8], "little")
    return hashlib.sha256(raw[start:]).hexdigest(), hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
