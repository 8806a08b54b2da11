"""Paths that are local files or URLs (``gs://bucket/run``, any ``etils.epath`` / fsspec scheme).

Every module that reads or writes a run's files (workdir, data, checkpoints, model directories,
reports) goes through here, so a workdir on GCS behaves like a local one:

* :func:`absolute` / :func:`join`: a local path made absolute, a URL left as it is;
* :func:`exists`, :func:`isdir`, :func:`listdir`, :func:`open`, :func:`read_text`,
  :func:`makedirs`, :func:`remove`, :func:`rmtree`, :func:`mtime`;
* :func:`write_text` / :func:`write_json` / :func:`write_bytes`: readers see the old file or the
  whole new one, never a truncated one (locally a temporary sibling, fsync and rename; on an
  object store the object is written whole, which is already atomic);
* :func:`local_copy`: a local directory or file holding a URL's content, for libraries that only
  read local files (tokenizers, ``np.load``); :func:`upload` the other way; :func:`copy`
  between any two (within one bucket, by the store itself);
* :class:`Mirror`: a local directory kept in step with a URL, for writers that append
  (JSONL metrics, TensorBoard events, profiler traces).

``STORAGE_EMULATOR_HOST`` (the variable Google's client libraries honor) sends ``gs://`` to a local
emulator: :func:`honor_emulator` points TensorStore (what orbax writes arrays with) and gcsfs
(what ``etils.epath`` reads and writes other files with) at it. It runs on import, before either
library opens a connection.
"""
from __future__ import annotations

import builtins
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def honor_emulator() -> None:
    """Route gs:// to ``STORAGE_EMULATOR_HOST`` for TensorStore, gcsfs and google-cloud-cpp
    (ArrayRecord's reader of TFDS datasets) when it is set."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    if "://" not in host:
        host = "http://" + host
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    # TensorStore asks for a token before any request; an emulator accepts any.
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    # gcsfs would otherwise probe the bucket's type over gRPC at the real endpoint, retrying for
    # a minute per bucket; an emulator has only flat buckets.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", host)


honor_emulator()


def is_url(path: PathLike) -> bool:
    return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
    """An absolute local path (``~`` expanded), or the URL unchanged."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(os.path.expanduser(text))


def join(base: PathLike, *parts: str) -> str:
    text = os.fspath(base)
    if not is_url(text):
        return os.path.join(text, *parts)
    for part in parts:
        text = text.rstrip("/") + "/" + part.lstrip("/")
    return text


def dirname(path: PathLike) -> str:
    text = os.fspath(path)
    if not is_url(text):
        return os.path.dirname(os.path.abspath(text))
    return text.rstrip("/").rsplit("/", 1)[0]


def basename(path: PathLike) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) \
        else os.path.basename(os.fspath(path))


def _epath(path: PathLike):
    from etils import epath
    return epath.Path(os.fspath(path))


def exists(path: PathLike) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: PathLike) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: PathLike) -> bool:
    return _epath(path).is_file() if is_url(path) else os.path.isfile(path)


def listdir(path: PathLike) -> list[str]:
    """Entry names (not paths) in ``path``, sorted."""
    if is_url(path):
        return sorted(child.name for child in _epath(path).iterdir())
    return sorted(os.listdir(path))


def makedirs(path: PathLike) -> None:
    """Create ``path`` and its parents; an object store has no directories, so nothing to do."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def mtime(path: PathLike) -> float:
    if is_url(path):
        return _epath(path).stat().mtime
    return os.path.getmtime(path)


def open(path: PathLike, mode: str = "r", encoding: str | None = "utf-8") -> IO[Any]:  # noqa: A001
    """``builtins.open`` for local paths, ``epath.Path.open`` for URLs (no appending there)."""
    if "b" in mode:
        encoding = None
    if not is_url(path):
        return builtins.open(path, mode, encoding=encoding)
    if "a" in mode:
        raise ValueError(f"{path}: an object store cannot append; write through a Mirror")
    return _epath(path).open(mode) if encoding is None else _epath(path).open(mode, encoding=encoding)


def read_text(path: PathLike) -> str:
    with open(path) as f:
        return f.read()


def read_bytes(path: PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` so that readers see the old content or all of the new, never a part.

    Locally: a temporary sibling, fsynced, then renamed over the target (so a power cut cannot
    leave the name pointing at an empty file). An object store writes objects whole.
    """
    target = os.fspath(path)
    if is_url(target):
        _epath(target).write_bytes(data)
        return
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.",
                                    suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def write_text(path: PathLike, text: str) -> None:
    """:func:`write_bytes` of ``text`` in UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """:func:`write_text` of ``json.dumps(obj, **dump_kwargs)`` plus a final newline."""
    write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def remove(path: PathLike) -> None:
    """Delete a file; a missing one is not an error."""
    if is_url(path):
        p = _epath(path)
        if p.exists():
            p.unlink()
    elif os.path.lexists(path):
        os.remove(path)


def rmtree(path: PathLike) -> None:
    """Delete a directory tree; a missing one is not an error."""
    if is_url(path):
        p = _epath(path)
        if p.exists():
            p.rmtree()
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def upload(local: PathLike, target: PathLike) -> None:
    """Copy a local file or directory tree to ``target`` (a URL or a local path), file by file,
    each one written whole."""
    local = os.fspath(local)
    if os.path.isdir(local):
        for root, _, files in os.walk(local):
            rel = os.path.relpath(root, local)
            for name in sorted(files):
                parts = [] if rel == "." else rel.split(os.sep)
                upload(os.path.join(root, name), join(target, *parts, name))
        return
    with builtins.open(local, "rb") as f:
        write_bytes(target, f.read())


def _download(source: str, local: str, skip: tuple[str, ...] = ()) -> None:
    src = _epath(source)
    if src.is_dir():
        os.makedirs(local, exist_ok=True)
        for child in src.iterdir():
            if not any(fnmatch.fnmatchcase(child.name, pattern) for pattern in skip):
                _download(os.fspath(child), os.path.join(local, child.name), skip)
    else:
        with builtins.open(local, "wb") as f:
            f.write(src.read_bytes())


def copy(source: PathLike, target: PathLike) -> None:
    """Copy a file or directory tree to ``target``, replacing files of the same names.

    Between two URLs of one store, the store copies the objects itself: no bytes pass through
    this host, so a model directory in a bucket copies in seconds. Otherwise each file is read
    and written whole.
    """
    src, dst = os.fspath(source), os.fspath(target)
    if not is_url(src):
        upload(src, dst)
    elif not is_url(dst):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        _download(src, dst)
    elif src.split("://")[0] == dst.split("://")[0]:
        import fsspec
        fs, root = fsspec.core.url_to_fs(src)
        if not fs.isdir(root):
            fs.copy(root, dst)
            return
        files = fs.find(root)
        if files:
            fs.copy(files, [join(dst, name[len(root):].lstrip("/")) for name in files])
    else:
        upload(local_copy(src), dst)


def cache_dir() -> str:
    """Where :func:`local_copy` keeps downloads: ``$RLHF_JAX_CACHE`` or ``~/.cache/rlhf_jax``."""
    return os.environ.get("RLHF_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rlhf_jax")


def _skipped(relative: str, skip: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(part, pattern) for part in relative.split("/") if part
               for pattern in skip)


def _version(url: str, skip: tuple[str, ...]) -> str:
    """A digest of the names, sizes and object versions under ``url`` (what a copy must match)."""
    import fsspec
    fs, _, (root,) = fsspec.get_fs_token_paths(url)
    fs.invalidate_cache()
    if fs.isfile(root):
        entries = {"": fs.info(root)}
    else:
        entries = {name[len(root.rstrip("/")):]: info
                   for name, info in fs.find(root, detail=True).items()}
    listing = sorted(
        (name, info.get("size"), str(info.get("generation") or info.get("mtime")
                                     or info.get("updated") or info.get("ETag") or ""))
        for name, info in entries.items() if not _skipped(name, skip))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:12]


def local_copy(path: PathLike, *, skip: tuple[str, ...] = ()) -> str:
    """A local path holding ``path``'s content: the path itself when it is local; for a URL, a
    copy (file or directory tree) in :func:`cache_dir`, downloaded unless one of the same
    version (names, sizes, object generations) is already there.

    For readers that only take local files (transformers' tokenizers, ``np.load``). A copy is
    downloaded into a staging directory and renamed into place, so a kill never leaves a half
    copy that looks complete, and processes of one host that download the same version at once
    end up sharing one (the first rename wins). Older versions of the same URL are removed.
    ``skip``: ``fnmatch`` patterns; entries under a directory whose names match one (files or
    whole subtrees, at any depth) are not downloaded, e.g. the weights beside a tokenizer.
    """
    text = os.fspath(path)
    if not is_url(text):
        return absolute(text)
    if not exists(text):
        raise FileNotFoundError(f"{text}: no such file or directory")
    key = hashlib.sha256("\0".join((text, *skip)).encode()).hexdigest()[:16]
    root = os.path.join(cache_dir(), "downloads")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{key}-{_version(text, skip)}-{basename(text)}")
    if not os.path.exists(final):
        staging = tempfile.mkdtemp(dir=root, prefix=f".{key}.")
        try:
            _download(text, os.path.join(staging, "x"), skip)
            try:
                os.rename(os.path.join(staging, "x"), final)
            except OSError:
                if not os.path.exists(final):     # not another process's identical copy
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(f"{key}-") and os.path.join(root, name) != final:
            rmtree(os.path.join(root, name))      # an older version of this URL
    return final


@contextlib.contextmanager
def writable_local(target: PathLike) -> Iterator[str]:
    """A local directory to write into; its files end up at ``target`` when the block ends.

    For writers that only take local paths (``tokenizer.save_pretrained``). Locally it is
    ``target`` itself; for a URL, a temporary directory uploaded on a clean exit.
    """
    text = os.fspath(target)
    if not is_url(text):
        os.makedirs(text, exist_ok=True)
        yield text
        return
    with tempfile.TemporaryDirectory(prefix="rlhf_jax_upload_") as staging:
        yield staging
        upload(staging, text)


class Mirror:
    """A local directory standing in for ``target``, for writers that append or keep files open.

    Local targets are used directly (``sync`` does nothing). For a URL, the existing files under
    it are downloaded first (a resumed run appends to its old metrics), writers use
    :attr:`local`, and :meth:`sync` uploads every file whose size or mtime changed since the
    last sync. A crash loses what was written since the last sync: callers sync after each
    record that matters (a metrics line) and on close. With ``download=False`` nothing is
    downloaded up front; :meth:`pull` fetches the files a writer is about to append to (a
    workdir's metrics, not its checkpoints).
    """

    def __init__(self, target: PathLike, *, download: bool = True) -> None:
        self.target = absolute(target)
        self.remote = is_url(self.target)
        self._seen: dict[str, tuple[int, int]] = {}
        self._pulled: set[str] = set()
        if not self.remote:
            self.local = self.target
            os.makedirs(self.local, exist_ok=True)
            return
        self.local = tempfile.mkdtemp(prefix="rlhf_jax_mirror_")
        if download and isdir(self.target):
            for name in listdir(self.target):
                _download(join(self.target, name), os.path.join(self.local, name))
            self._seen = self._stats()

    def path(self, *parts: str) -> str:
        return os.path.join(self.local, *parts)

    def pull(self, name: str) -> str:
        """The local path of file ``name`` (``/``-separated, relative to the target), downloaded
        from the target first if it is there; call it before writing the file. Asks the store
        once per name."""
        local = self.path(name)
        if self.remote and name not in self._pulled:
            self._pulled.add(name)
            remote = join(self.target, name)
            if isfile(remote):
                os.makedirs(os.path.dirname(local), exist_ok=True)
                _download(remote, local)
                st = os.stat(local)
                self._seen[os.path.relpath(local, self.local)] = (st.st_size, st.st_mtime_ns)
        return local

    def _stats(self) -> dict[str, tuple[int, int]]:
        stats = {}
        for root, _, files in os.walk(self.local):
            for name in files:
                full = os.path.join(root, name)
                st = os.stat(full)
                stats[os.path.relpath(full, self.local)] = (st.st_size, st.st_mtime_ns)
        return stats

    def sync(self) -> None:
        if not self.remote:
            return
        stats = self._stats()
        for rel, stat in sorted(stats.items()):
            if self._seen.get(rel) != stat:
                upload(os.path.join(self.local, rel), join(self.target, *rel.split(os.sep)))
        self._seen = stats

    def close(self) -> None:
        """Upload what changed and delete the local copy (for a URL target)."""
        if not self.remote:
            return
        try:
            self.sync()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
