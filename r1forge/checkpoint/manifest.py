"""`checksums.json`: the size and SHA-256 of every file a save wrote, so that damaged bytes are never used silently.

Why: safetensors headers catch truncation, but a flipped bit inside a tensor, the optimizer state or a config value
loads without complaint (and a resumed run trains on). Every r1forge save ends by hashing the files it just wrote
(still in the page cache, one thread per file) into this manifest, inside the staging folder, so it is in place
before the directory is published, never after:

    {"format": "r1forge-checksums-v1", "algorithm": "sha256",
     "files": {"model.safetensors": {"size": 1234, "sha256": "9f86..."}, ...},
     "manifest_sha256": "..."}          # of the rest, so that a flipped byte in the manifest itself is caught too

SHA-256 because it is what the Hugging Face Hub shows as a safetensors file's LFS object id (so a download can be
compared by eye) and it runs at about a GB/s with the SHA extensions every recent CPU has.

Verification levels (`verify=` of `load_checkpoint` / `load_model`, else $R1FORGE_VERIFY_CHECKPOINT):
  "size"  (the default for loading) every listed file exists with its size: free, catches truncated copies;
  "full"  every listed file's SHA-256 too (resuming a training run always does this);
  "none"  nothing.
Only the top-level files the manifest lists are checked: files added to the directory later (a README, a
tokenizer copied in) are not. A directory without a manifest (a Hugging Face download, a checkpoint written by
transformers or by an older r1forge) loads unverified, with a debug-level note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from r1forge.checkpoint.atomic import fsync_path
from r1forge.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "checksums.json"
FORMAT = "r1forge-checksums-v1"
VERIFY_LEVELS = ("none", "size", "full")
VERIFY_ENV = "R1FORGE_VERIFY_CHECKPOINT"
DEFAULT_LOAD_LEVEL = "size"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in large chunks (hashlib releases the GIL, so files hash in parallel)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    if len(paths) <= 1:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(file_sha256, paths))


def _self_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _listed_files(directory: Path) -> list[str]:
    """The top-level regular files of a checkpoint directory, manifest and hidden files left out."""
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and not p.is_symlink() and p.name != MANIFEST_FILE and not p.name.startswith("."))


def write_manifest(directory: Path, names: Iterable[str] | None = None,
                   reuse: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Hash `names` (default: every top-level file) of `directory` into `directory/checksums.json`; returns it.

    `reuse`: entries of files this same save hashed a moment ago (kept when the size still matches), so that a
    training checkpoint does not hash its weights twice. The manifest is written to a temporary name, fsynced
    and renamed, so a reader sees the old manifest or the new one, never half of one.
    """
    names = sorted(names) if names is not None else _listed_files(directory)
    files: dict[str, dict[str, Any]] = {}
    to_hash: list[str] = []
    for name in names:
        size = (directory / name).stat().st_size
        old = (reuse or {}).get(name)
        if old is not None and old.get("size") == size and isinstance(old.get("sha256"), str):
            files[name] = {"size": size, "sha256": old["sha256"]}
        else:
            files[name] = {"size": size}
            to_hash.append(name)
    for name, digest in zip(to_hash, _hash_all([directory / n for n in to_hash]), strict=True):
        files[name]["sha256"] = digest
    manifest: dict[str, Any] = {"format": FORMAT, "algorithm": "sha256", "files": files}
    manifest["manifest_sha256"] = _self_digest(manifest)
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, directory / MANIFEST_FILE)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of `directory` (None when it has none); CheckpointError naming it when it is damaged."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}): the checkpoint's files cannot be verified") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("algorithm") != "sha256"
            or manifest.get("manifest_sha256") != _self_digest(manifest)):
        raise CheckpointError(f"{path} is corrupt (its own checksum does not match): the checkpoint's files cannot "
                              "be verified")
    return manifest


def resolve_level(verify: str | None) -> str:
    """`verify` itself, else $R1FORGE_VERIFY_CHECKPOINT, else "size"; ValueError naming where a bad value came from."""
    source = "verify"
    if verify is None:
        verify, source = os.environ.get(VERIFY_ENV) or DEFAULT_LOAD_LEVEL, f"${VERIFY_ENV}"
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"{source} must be one of {VERIFY_LEVELS}, got {verify!r}")
    return verify


def verify_checkpoint(directory: str | os.PathLike, verify: str | None = None,
                      names: Iterable[str] | None = None) -> dict[str, Any] | None:
    """Check the files `directory/checksums.json` lists (or only `names` of them) at level `verify`.

    Returns:
        The manifest, or None when the directory has none (nothing verified: a Hugging Face download).
    Raises:
        CheckpointError: naming every file that is missing, has another size or (level "full") other bytes.
    """
    directory = Path(directory)
    level = resolve_level(verify)
    if level == "none":
        return None
    manifest = read_manifest(directory)
    if manifest is None:
        logger.debug("%s has no %s: its files are not verified", directory, MANIFEST_FILE)
        return None
    listed: dict[str, dict[str, Any]] = manifest["files"]
    wanted = [n for n in (names if names is not None else listed) if n in listed]
    problems: list[str] = []
    present: list[str] = []
    for name in wanted:
        path, expected = directory / name, listed[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected.get("size"):
            problems.append(f"{path}: {path.stat().st_size} bytes, {MANIFEST_FILE} says {expected.get('size')}")
        else:
            present.append(name)
    if level == "full":
        for name, digest in zip(present, _hash_all([directory / n for n in present]), strict=True):
            if digest != listed[name].get("sha256"):
                problems.append(f"{directory / name}: sha256 {digest[:16]}... but {MANIFEST_FILE} says "
                                f"{str(listed[name].get('sha256'))[:16]}... (damaged bytes)")
    if problems:
        raise CheckpointError(f"checkpoint {directory} failed verification against its {MANIFEST_FILE}:\n  "
                              + "\n  ".join(problems) + f"\n(a file changed on purpose is re-sealed with "
                              f"`python -m r1forge.checkpoint.manifest {directory}`)")
    return manifest


if __name__ == "__main__":  # re-seal a checkpoint after editing a file of it on purpose
    import sys

    for arg in sys.argv[1:] or ["."]:
        written = write_manifest(Path(arg), reuse=None)
        print(f"{Path(arg) / MANIFEST_FILE}: {len(written['files'])} files hashed")
