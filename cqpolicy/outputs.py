"""Output folders that are either complete or absent: files are staged, then moved in at the end."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def check_out_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty ``path`` unless ``overwrite`` (call it before any work); returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {path} is not empty; choose a new folder or pass --overwrite")
    return path


class OutputDir:
    """Stage files in a sibling temporary folder; ``commit`` moves them into ``path``.

    An existing non-empty ``path`` is refused unless ``overwrite``. On any error the staging folder is
    removed and ``path`` is left as it was. ``across_ranks`` (every rank of a ``torchrun`` launch makes it
    together): rank 0 makes, commits or removes the one staging folder every rank writes into.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, across_ranks: bool = False):
        from cqpolicy.distributed import World, agree, broadcast_text, world

        self.path = check_out_dir(path, overwrite)
        self.world = world() if across_ranks else World()
        self.main = self.world.main
        parent, error = self.path.resolve().parent, ""
        if self.main:
            try:
                parent.mkdir(parents=True, exist_ok=True)
                staging = tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=parent)
            except OSError as exc:
                staging, error = "", f"--out {self.path} is not writable ({exc.strerror})"
        if self.world.size == 1:
            if error:
                raise PermissionError(error)
            self.staging = Path(staging)
            return
        agree(not error, error or f"--out {self.path} is not writable", PermissionError)
        self.staging = Path(broadcast_text(staging if self.main else None))

    def __enter__(self):
        return self

    def file(self, name: str) -> Path:
        return self.staging / name

    def commit(self) -> Path:
        from cqpolicy.distributed import barrier

        if self.world.size > 1:
            barrier()  # every rank has written its part
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            for item in self.staging.iterdir():
                os.replace(item, self.path / item.name)
            self.staging.rmdir()
        if self.world.size > 1:
            barrier()
        return self.path

    def __exit__(self, exc_type, *exc):
        if exc_type is not None and self.main:
            shutil.rmtree(self.staging, ignore_errors=True)
        return False


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable; filesystems that cannot open a directory are fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_yaml(path: str | os.PathLike, error: type[Exception], what: str):
    """``yaml.safe_load`` of ``path``; a missing or malformed file raises ``error`` in one line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def read_json(path: str | os.PathLike, error: type[Exception], missing: str):
    """``json.loads`` of ``path``; a missing (message ``missing``), unreadable or malformed file raises ``error``
    in one line."""
    import json

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(missing) from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 JSON text") from None
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
