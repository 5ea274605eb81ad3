"""Putting a finished checkpoint directory in place so that no reader ever sees half of one.

The writer builds the complete new directory in a staging folder beside the target (same filesystem, so
renames are atomic), then:

- target absent: one `rename(staging, target)`.
- target present: every entry of the target that is not a weight file and not rewritten by the save
  (tokenizer files, README, chat template, subfolders ...) is hard-linked (copied where links are not
  possible) into the staging folder, which then replaces the target:
  * on Linux, `renameat2(RENAME_EXCHANGE)` swaps the two directories in one step: at every instant the
    target path holds either the old or the new complete checkpoint;
  * elsewhere (or where the filesystem refuses the exchange), `rename(target, old)` then
    `rename(staging, target)`. A crash between the two leaves the target path briefly absent, with the old
    checkpoint complete in `.<name>.old-*/checkpoint` and the new one complete in `.<name>.tmp-*`; a failure of the
    second rename moves the old one back.
  The old directory is deleted after the swap.

A process killed before the swap leaves only a `.<name>.tmp-*` folder beside an untouched target; such
folders can be deleted. Old weight files are never kept: a single-file save over a sharded checkpoint leaves
no stale shards or index behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from r1forge.checkpoint.keys import is_weight_file

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def make_staging_dir(target: Path) -> Path:
    """A fresh, uniquely named folder beside `target` (same filesystem, hidden from `ls`).

    Made with os.mkdir, not tempfile.mkdtemp, so that it gets the umask's permissions rather than 0700: it
    becomes the checkpoint directory, which other users may need to read.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(staging)
            return staging
        except FileExistsError:
            continue


def new_file_mode(directory: Path) -> int:
    """The permissions a plain open() gives a new file in `directory`: 0o666 less the umask (or what a default
    ACL says). Found by creating a probe file: reading the umask with os.umask means changing it, process-wide."""
    probe = directory / f".mode-probe-{secrets.token_hex(4)}"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        return stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.unlink(probe)


def apply_umask(staging: Path) -> None:
    """Give the files written into `staging` the permissions of a plain open() (typically 0o644).

    safetensors' save_file writes through a temporary file and leaves 0o600, which other users (a server
    running as another account, a shared cache) cannot read; torch.save and transformers give the umask's mode.
    Call before `replace_directory`: files carried over from the target are hard links and keep their modes.
    """
    mode = new_file_mode(staging)
    for entry in staging.iterdir():
        if entry.is_file() and not entry.is_symlink() and stat.S_IMODE(entry.stat().st_mode) != mode:
            os.chmod(entry, mode)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk, so a rename never publishes empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; the data files were synced already
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def carry_over(target: Path, staging: Path) -> list[str]:
    """Link the target's entries that the save keeps (not weight files, not already written) into `staging`."""
    kept = []
    for entry in sorted(target.iterdir()):
        dst = staging / entry.name
        if is_weight_file(entry.name) or dst.exists() or dst.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst)
        elif entry.is_dir():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dst))
        kept.append(entry.name)
    return kept


def exchange_directories(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux `renameat2(RENAME_EXCHANGE)`; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_directory(staging: Path, target: Path) -> None:
    """Make the complete `staging` directory appear at `target`, keeping the target's non-weight files."""
    if not target.exists():
        os.rename(staging, target)
        fsync_path(target.parent)
        return
    carry_over(target, staging)
    shutil.copymode(target, staging)  # the directory keeps its permissions
    fsync_path(staging)
    if exchange_directories(staging, target):
        old = staging  # after the exchange the staging name holds the old checkpoint
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "checkpoint")
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old / "checkpoint", target)
            old.rmdir()
            raise
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)
