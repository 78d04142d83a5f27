"""Reading JSON and checking output locations; writing files and directories atomically: the one
place for these.

Every JSON file the project reads (configs, tree files, manifests, shard indexes) goes through
`read_json` / `parse_json`: a bounded size (MAX_JSON_BYTES) and nesting depth (MAX_JSON_DEPTH),
strict JSON (no NaN / Infinity), so a hostile file costs bounded memory and time and every
failure is one SpecCompileError naming the file.

A reader never sees a half-written file or directory: everything is built under a temporary
name beside its destination (same filesystem), fsync'd, and renamed into place in one step; on
any exception, KeyboardInterrupt included, the temporary is removed and the destination is
left as it was.

    atomic_open(path)          a binary file object; `path` replaced when the block ends
    atomic_write_bytes(path, data) / atomic_write_text(path, text)
    atomic_dir(dest, existing="error" | "replace" | "merge")
                               a temporary directory; `dest` created or swapped when the block ends
    output_lock(dest)          an exclusive lock on `dest` for a whole build (`.NAME.lock` beside
                               it): a second writer fails at once; stale temporaries are removed
    path_inside(root, name)    `root / name` if `name` (read from a file) stays inside `root`

Parent directories that `atomic_dir` / `output_lock` create are removed again when the block
fails. A process killed outright (SIGKILL) cannot clean up: its `.NAME.tmp-*` directory stays
until the next `output_lock(dest)`, which removes it (no live writer holds the lock by then).
    check_new_dir(path, flag) / check_writable_dir(path, flag)
                               before any work: the output can be created there
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import SpecCompileError, brief

MAX_JSON_BYTES = 16 << 20  # far above any config, tree, manifest or shard index
MAX_JSON_DEPTH = 32  # the deepest legitimate file (a tokenizer config) nests about 5 levels


def read_json(path: str | Path, what: str, hint: str = "", max_bytes: int = MAX_JSON_BYTES,
              fix: str = "re-download or fix the file"):
    """The JSON value in `path`, read with bounded size and depth; a missing, unreadable, too
    large, too deeply nested or invalid file is a SpecCompileError `what: path: ...` (`hint`:
    the fix for a missing one, `fix` for the others)."""
    path = Path(path)
    if not os.path.isfile(path):
        raise SpecCompileError(f"{what}: {path} is missing" + (f"; {hint}" if hint else ""))
    raw = read_bounded(path, what, max_bytes, f"far more than such a file holds; {fix}")
    return parse_json(raw, f"{what}: {path}", fix)


def read_bounded(path: str | Path, what: str, max_bytes: int, fix: str) -> bytes:
    """The bytes of `path`, at most `max_bytes` of them read: an unreadable or larger file is a
    SpecCompileError `what: ...` (`fix` follows the size)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise SpecCompileError(f"{what}: cannot read {path} ({e.strerror or brief(e)})") from None
    if len(raw) > max_bytes:
        raise SpecCompileError(f"{what}: {path} is larger than {max_bytes >> 20} MiB, {fix}")
    return raw


def read_recorded(path: Path, nbytes: int, sha256: str, what: str, kind: str, listing: str, fix: str) -> bytes:
    """The bytes of `path` (a `kind`, e.g. "corpus part"), checked against the size and sha256 a
    `listing` (an index or manifest) records for it: missing, unreadable, another size or
    another sha256 is one SpecCompileError `what: ...; fix`."""
    if not path.is_file():
        raise SpecCompileError(f"{what}: {kind} {path} is missing; {fix}")
    data = read_bounded(path, what, nbytes, fix) if path.stat().st_size == nbytes else b""
    if len(data) != nbytes or hashlib.sha256(data).hexdigest() != sha256:
        raise SpecCompileError(f"{what}: {kind} {path} is corrupt (its size or sha256 differs from "
                               f"{listing}); {fix}")
    return data


def parse_json(text: str | bytes, where: str, fix: str):
    """`text` as JSON: strict (no NaN / Infinity), at most MAX_JSON_DEPTH levels deep; otherwise
    a SpecCompileError `where: ...; fix`."""
    def constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = json.loads(text, parse_constant=constant)
    except RecursionError:
        data = None  # nested past the interpreter's limit: reported below
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long to read
        reason = e.msg if isinstance(e, json.JSONDecodeError) else brief(e, 120)
        raise SpecCompileError(f"{where}: not valid JSON ({reason}); {fix}") from None
    else:
        if _depth_within(data, MAX_JSON_DEPTH):
            return data
    raise SpecCompileError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels; {fix}")


def _depth_within(data, limit: int) -> bool:
    """Whether `data`'s lists and objects nest at most `limit` deep (iteratively: no recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return True


def read_json_object(path: Path, what: str,
                     hint: str = "point at a Hugging Face checkpoint directory that contains config.json",
                     fix: str = "re-download or fix the file") -> dict:
    """The JSON object in `path` (`read_json`); a non-object is a SpecCompileError too."""
    data = read_json(path, what, hint, fix=fix)
    if not isinstance(data, dict):
        raise SpecCompileError(f"{what}: {path} must hold a JSON object, not a {_json_type(data)}; {fix}")
    return data


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def check_new_dir(path: str | Path, flag: str) -> None:
    """Before any work: `path` does not exist (not even as a dangling symlink) and can be created
    (its nearest existing ancestor is a directory we can write in)."""
    path = Path(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise SpecCompileError(f"{flag} {path} is a dangling symbolic link; remove it or choose "
                               "another path")
    if os.path.lexists(path):
        raise SpecCompileError(f"{flag} {path} already exists; remove it or choose another path")
    _check_can_create_in(path, flag)


def check_writable_dir(path: str | Path, flag: str) -> None:
    """Before any work: `path` is a directory we can write in, or can be created as one."""
    path = Path(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SpecCompileError(f"{flag} {path} exists and is not a directory; choose a directory")
    if os.path.islink(path) and not os.path.exists(path):
        raise SpecCompileError(f"{flag} {path} is a dangling symbolic link; remove it or choose "
                               "another path")
    _check_can_create_in(path / "x" if os.path.isdir(path) else path, flag)


def _check_can_create_in(path: Path, flag: str) -> None:
    """Walk up from `path`'s parent to the first ancestor that exists; it must be a directory in
    which a directory can be made (tried for real, then removed: permissions, read-only
    filesystems, quotas)."""
    parent = path.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if os.path.islink(parent) and not os.path.exists(parent):
        raise SpecCompileError(f"{flag} {path}: {parent} is a dangling symbolic link; choose "
                               "another path")
    if not os.path.isdir(parent):
        raise SpecCompileError(f"{flag} {path}: {parent} is not a directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".spec-write-probe-", dir=parent))
    except OSError as e:
        raise SpecCompileError(f"{flag} {path}: cannot write in {parent} ({e.strerror or brief(e)}); "
                               "choose a writable location") from None


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """`with atomic_open(p) as f: f.write(...)`: writes `.NAME.tmp-*` beside `p`, fsyncs it and
    `os.replace`s `p` with it when the block ends; on an exception `p` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(dest: str | Path, existing: str = "error",
               carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """`with atomic_dir(d) as tmp:` build the directory in `tmp` (`.NAME.tmp-*` beside `d`); when
    the block ends its files are fsync'd and it becomes `d` in one rename. On any exception
    (KeyboardInterrupt too) `tmp` is removed and `d` is as it was.

    `existing` says what happens if `d` exists by then:
      "error"    FileExistsError (an empty `d` is replaced, as `os.replace` does);
      "replace"  `d` is swapped for the new directory as a whole;
      "merge"    the same, but entries of `d` the block did not write are carried over (hard
                 links, so nothing is copied and the old directory stays whole until the swap),
                 those whose name `carry` rejects excepted (default: all carried).
    The swap is one atomic `renameat2(RENAME_EXCHANGE)` on Linux; elsewhere the old directory
    is renamed aside first, so `d` is briefly missing, but never partial."""
    if existing not in ("error", "replace", "merge"):
        raise ValueError(f"atomic_dir: existing={existing!r}; expected error, replace or merge")
    dest = Path(dest)
    created = _make_parents(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except BaseException:
        _remove_dirs(created)
        raise
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result gets the usual mode
        yield tmp
        _usual_modes(tmp)
        _fsync_tree(tmp)
        if not dest.exists():
            os.replace(tmp, dest)
        elif existing == "error":
            try:
                os.replace(tmp, dest)  # succeeds only over an empty directory
            except OSError as e:
                raise FileExistsError(errno.EEXIST, f"{dest} already exists") from e
        else:
            if existing == "merge":
                _carry_over(dest, tmp, carry)
            _swap(tmp, dest)
            shutil.rmtree(tmp)  # now the old directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        raise
    _fsync_dir(dest.parent)


@contextlib.contextmanager
def output_lock(dest: str | Path, what: str = "--out") -> Iterator[Path]:
    """`with output_lock(d):` the one writer of `d` for the whole block: an exclusive `flock` on
    `.NAME.lock` beside `d` (the holder's pid written in it), released and removed when the block
    ends. A second `output_lock(d)`, in this or another process, fails at once with a
    SpecCompileError naming the holder's pid (`what`: the flag that named `d`, for the message).

    Once held, `.NAME.tmp-*` siblings of `d` are stale (only a holder builds there, and the
    kernel drops a killed holder's lock), so they are removed. Parent directories created for
    the lock file are removed again if the block fails. Yields the lock file's path."""
    dest = Path(dest)
    created = _make_parents(dest)
    lock = dest.parent / f".{dest.name}.lock"
    try:
        fd = _take_lock(lock, dest, what)
    except BaseException:
        _remove_dirs(created)
        raise
    try:
        for stale in [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.tmp-")]:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        yield lock
    except BaseException:
        _release_lock(lock, fd)
        _remove_dirs(created)
        raise
    _release_lock(lock, fd)


def _take_lock(lock: Path, dest: Path, what: str) -> int:
    """An fd holding an exclusive flock on `lock`, the file at that path when taken (a holder
    that unlinked it on release leaves a dead inode, so retry on a fresh file)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpecCompileError(f"{what} {dest} is being written by another process (pid {pid}, "
                                   f"lock {lock}); wait for it to finish or choose another path") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _release_lock(lock: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()  # while still held: a waiter that opened it retries on a fresh file
    os.close(fd)


def _make_parents(path: Path) -> list[Path]:
    """Create `path`'s missing parent directories; returns those this call created, innermost
    first (one another process made meanwhile is not ours)."""
    missing = []
    for p in path.absolute().parents:
        if p.is_dir():
            break
        missing.append(p)
    created = []
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        except BaseException:
            _remove_dirs(created[::-1])
            raise
        created.append(p)
    return created[::-1]


def _remove_dirs(dirs: list[Path]) -> None:
    """Remove `dirs` (innermost first) where empty: what `_make_parents` created, undone."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def path_inside(root: Path, name: object, plain: bool = False, links: bool = True) -> Path | None:
    """`root / name` if `name`, a string read from a manifest or index, names something inside
    `root`: relative, no empty, `.` or `..` component (`plain`: one component, no separator at
    all). `links=False` also requires the path to resolve inside `root` with symlinks followed
    (a link out is refused). None otherwise."""
    if not isinstance(name, str) or "\0" in name or "\\" in name:
        return None
    parts = name.split("/")
    if (plain and len(parts) != 1) or any(p in ("", ".", "..") for p in parts):
        return None
    path = Path(root) / name
    if not links:
        top = Path(root).resolve()
        real = path.resolve()
        if real == top or not real.is_relative_to(top):
            return None
    return path


def _carry_over(old: Path, new: Path, carry: Callable[[str], bool] | None = None) -> None:
    """Hard-link (copy where links fail) the entries of `old` that `new` does not have (and,
    with `carry`, whose name it accepts)."""
    for src in old.iterdir():
        dst = new / src.name
        if dst.exists() or dst.is_symlink() or (carry is not None and not carry(src.name)):
            continue
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _swap(new: Path, dest: Path) -> None:
    """Afterwards `dest` holds what `new` held and `new` the old `dest`."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(dest), _RENAME_EXCHANGE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dest))
    # No atomic exchange here: move the old one aside, the new one in, the old one to `new`.
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, aside)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(aside, dest)
        raise
    os.replace(aside, new)


def _usual_modes(root: Path) -> None:
    """Files some writers create private (0600: safetensors' `save_file`, `tempfile.mkstemp`) get
    the usual mode, as any other file the block wrote: an engine or draft built by one user is
    readable by the service that runs it. Other modes are left as written."""
    mode = 0o666 & ~_umask()
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and os.stat(p).st_mode & 0o777 == 0o600 and mode != 0o600:
                os.chmod(p, mode)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
