"""Writing outputs atomically: a reader sees the old file or the whole new one, never half.

A model with external data is two files that must change together. write_model() writes both
into a private folder beside OUT, gives the new weights a file name the current OUT does not
use (OUT.data or OUT.1.data, alternately), moves the weights into place, then renames the graph
over OUT (the one step that switches readers from the old model to the new one), and only then
removes the old weights. At every instant OUT loads, as the old model or the new one.

Temporaries are named .NAME.PID.XXXX.tmp: an interrupted write removes its own (Ctrl-C,
SIGTERM in the CLI), and the next write to the same path removes those of writers that died.
Nothing is ever written through a symbolic link: a link at an output path is replaced.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

_TMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")


class OutputError(Exception):
    """An output cannot be written; the message is one sentence naming the path and what to do."""


def _default_mode(executable: bool = False) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if executable else 0o666) & ~umask


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def data_names(out: str | os.PathLike) -> tuple[str, str]:
    """The two file names write_model() gives OUT's external data, used alternately."""
    name = Path(out).name
    return f"{name}.data", f"{name}.1.data"


# ---------------------------------------------------------------- checks before writing


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when a and b are one file: the same resolved path, or (both existing) one inode."""
    a, b = Path(a), Path(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output path that is (resolves to, or is a hard link of) a file the input reads."""
    inputs = list(inputs)
    for out in outputs:
        for given in inputs:
            if same_file(out, given):
                raise OutputError(
                    f"the output {out} would overwrite {given}, which the input model reads; "
                    "choose another output path."
                )


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Raise OutputError unless path can be written (made beside it, then renamed into place),
    its missing folders created. folder=True: the output is a folder, which may exist already.

    Nothing is left behind: a probe file is made and removed in the nearest existing folder.
    """
    path = Path(path)
    if path.is_dir() and not folder:
        raise OutputError(f"{path} is a folder; give a file path for the output.")
    if folder and os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"{path} exists and is not a folder; choose another path.")
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"{parent} is not a folder, so {path} cannot be written there; choose another path."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"cannot write {path}: {parent} is not writable ({_reason(e)}); choose another output path."
        ) from None


# ---------------------------------------------------------------- temporaries


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of earlier writes to path whose writer process has died."""
    path = Path(path)
    removed = []
    for entry in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
        match = _TMP.fullmatch(entry.name)
        if match is None or match["name"] != path.name:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create the folder of {path} ({_reason(e)}); choose another path."
        ) from None


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An advisory lock on the folder: two writers to one folder take turns."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- writers


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp) for a temporary file beside `path`, then rename it over `path`.

    The file gets the permissions a plain open() would give (mkstemp's are owner-only). A link
    at `path` is replaced, not followed. OSErrors become OutputError.
    """
    path = Path(path)
    _make_parent(path)
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write {path} ({_reason(e)}); choose a writable path.") from None
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"writing {path} failed ({_reason(e)}); nothing was changed.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def referenced_files(model_path: str | os.PathLike) -> set[str]:
    """External data locations the model file at model_path names; empty when it cannot be read."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

        model = onnx.load(str(model_path), load_external_data=False)
        return {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}
    except Exception:  # noqa: BLE001 - a missing or foreign file references nothing of ours
        return set()


def write_model(
    out: str | os.PathLike,
    save: Callable[[str, str | None], None],
    *,
    external: bool,
    keep: Iterable[str | os.PathLike] = (),
) -> str | None:
    """Write a model and its external data at OUT as one unit; returns the data file's name.

    save(graph_path, data_name) writes the graph to graph_path and, when data_name is not None,
    the weights to data_name in the same folder (the graph naming it). Files in `keep` (the
    input model's) are never removed or replaced.
    """
    out = Path(out)
    _make_parent(out)
    keep = list(keep)
    with _folder_lock(out.parent):
        remove_stale_temporaries(out)
        names = data_names(out)
        in_use = referenced_files(out) if os.path.lexists(out) else set()
        data_name = next(n for n in names if n not in in_use) if external else None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_prefix(out), suffix=".tmp", dir=out.parent))
        except OSError as e:
            raise OutputError(f"cannot write {out} ({_reason(e)}); choose a writable path.") from None
        placed: Path | None = None
        try:
            save(str(tmp / out.name), data_name)
            os.chmod(tmp / out.name, _default_mode())
            if data_name is not None and (tmp / data_name).exists():
                os.chmod(tmp / data_name, _default_mode())
                placed = out.parent / data_name
                os.replace(tmp / data_name, placed)  # not yet named by OUT: invisible to readers
            os.replace(tmp / out.name, out)  # the switch from the old model to the new one
            placed = None
        except OSError as e:
            _discard(placed, tmp)
            raise OutputError(
                f"writing {out} failed ({_reason(e)}); the previous file is unchanged."
            ) from None
        except BaseException:
            _discard(placed, tmp)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        for name in names:  # the previous weights, or those of an interrupted write
            old = out.parent / name
            if name != data_name and os.path.lexists(old) and not any(same_file(old, k) for k in keep):
                with contextlib.suppress(OSError):
                    old.unlink()
    return data_name


def _discard(placed: Path | None, tmp: Path) -> None:
    if placed is not None:
        with contextlib.suppress(OSError):
            placed.unlink()
    shutil.rmtree(tmp, ignore_errors=True)


def write_folder(target: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """fill(tmp) for a temporary folder beside target, then rename it to target: readers see the
    old folder or the whole new one. A full target is moved aside first, then deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)  # left by writers that were killed
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        os.chmod(tmp, _default_mode(executable=True))  # mkdtemp's folder is owner-only
        _rename_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(tmp: Path, target: Path) -> None:
    if not target.exists() or not any(target.iterdir()):
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old)
