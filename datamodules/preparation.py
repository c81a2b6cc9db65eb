"""Machinery shared by the preparation commands (``balance-prepare <dataset> --raw RAW --out OUT``).

- :func:`run_items` runs a per-item function over the items with a process pool (``--workers``) and a progress
  bar, skips the items whose output already exists (so an interrupted preparation resumes where it stopped), and
  collects every failure with its reason instead of stopping or dropping it silently.
- :func:`atomic_output` writes a file or a directory under a temporary name and renames it into place, so an
  output that exists is complete (what makes skipping safe).
- :func:`finish` writes ``OUT/prepare_report.txt``, prints a summary (ok, skipped as already done, failed with
  reasons) and exits non-zero when nothing usable is left.

A data set module supplies the items, a picklable per-item function (a module-level function, or a
``functools.partial`` of one) and a cheap "is it done" check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

REPORT_NAME = "prepare_report.txt"
TEMP_MARK = ".tmp-"
SHOWN_FAILURES = 20


@dataclass
class PrepareReport:
    """What a preparation did: items processed now, items skipped as already done, and failures with reasons."""

    ok: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return len(self.ok) + len(self.done)

    def counts(self) -> str:
        return f"{len(self.ok)} ok, {len(self.done)} skipped (already done), {len(self.failed)} failed"

    def text(self, title: str, details: Sequence[str] = ()) -> str:
        """The full report: a title line with the counts, ``details`` lines, then every failure (tab-separated)."""
        lines = [f"{title}: {self.counts()}", *details]
        if self.failed:
            lines.append(f"failed ({len(self.failed)}): item<TAB>reason")
            lines += [f"{item}\t{reason}" for item, reason in sorted(self.failed)]
        return "\n".join(lines) + "\n"


def _describe(error: BaseException) -> str:
    from datamodules.media import MediaError

    text = str(error) if isinstance(error, MediaError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())  # one line per failure in the report


def _guarded(work: Callable[[str], object], item: str) -> tuple[str, str | None]:
    try:
        work(item)
    except Exception as error:  # everything but KeyboardInterrupt/SystemExit is a reportable failure
        return item, _describe(error)
    return item, None


def _init_worker() -> None:
    # One thread per worker process: the pool is the parallelism.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def run_items(
    items: Sequence[str],
    work: Callable[[str], object],
    is_done: Callable[[str], bool] | None = None,
    workers: int | None = None,
    desc: str = "preparing",
) -> PrepareReport:
    """Runs ``work(item)`` for every item not done yet; returns the report.

    Args:
        items: item names (e.g. clip ids), unique.
        work: writes the item's outputs (atomically, see :func:`atomic_output`) or raises; must be picklable
            when ``workers > 1``. An exception becomes a failure with its message as the reason.
        is_done: ``is_done(item)`` is true when the item's outputs already exist (checked here, cheaply, before
            any work is handed out); such items are skipped.
        workers: processes (default: all cores); 1 runs in this process.
        desc: progress bar label.
    """
    report = PrepareReport()
    todo = []
    for item in items:
        if is_done is not None and is_done(item):
            report.done.append(item)
        else:
            todo.append(item)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=len(todo), desc=desc, unit="item", dynamic_ncols=True)

    def record(item: str, reason: str | None) -> None:
        if reason is None:
            report.ok.append(item)
        else:
            report.failed.append((item, reason))
        bar.update()

    try:
        if workers == 1:
            for item in todo:
                record(*_guarded(work, item))
        else:
            rest, crashes_in_a_row = todo, 0
            while rest:
                suspects, rest = _pool_round(rest, work, workers, record)
                # The pool broke (a worker died, e.g. a decoder crashing on a corrupt file): rerun each item that
                # was in flight alone, so the one that kills its process is reported and the others are done.
                for item in suspects:
                    crashed, _ = _pool_round([item], work, 1, record)
                    crashes_in_a_row = crashes_in_a_row + 1 if crashed else 0
                    if crashes_in_a_row > MAX_CRASHES_IN_A_ROW:
                        raise RuntimeError(f"{desc}: worker processes die on every item (last: {item}); run with "
                                           "--workers 1 to see the error")
                    if crashed:
                        record(item, CRASHED)
    finally:
        bar.close()
    return report


MAX_CRASHES_IN_A_ROW = 8
CRASHED = "the worker process died on this item (e.g. a decoder crash on a corrupt file)"


def _pool_round(items: Sequence[str], work: Callable[[str], object], workers: int,
                record: Callable[[str, str | None], None]) -> tuple[list[str], list[str]]:
    """Runs ``items`` in a fresh process pool, at most ``2 * workers`` in flight.

    Returns ``([], [])`` when every item was recorded, or, if the pool broke, the items in flight (suspects) and
    the items not submitted yet.
    """
    queue = deque(items)
    in_flight: dict[Future, str] = {}
    # spawn: torch's and FFmpeg's thread pools do not survive fork safely.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        try:
            while queue or in_flight:
                while queue and len(in_flight) < 2 * workers:
                    future = pool.submit(_guarded, work, queue[0])  # raises once the pool is broken
                    in_flight[future] = queue.popleft()
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    if isinstance(future.exception(), BrokenProcessPool):
                        raise future.exception()
                    record(*future.result())
                    del in_flight[future]
        except BrokenProcessPool:
            # Once broken, every outstanding future resolves (with BrokenProcessPool); keep what finished first.
            wait(in_flight)
            suspects = []
            for future, item in in_flight.items():
                if future.exception() is None:
                    record(*future.result())
                else:
                    suspects.append(item)
            return suspects, list(queue)
    return [], []


def _temporary(path: Path) -> Path:
    # Keeps the suffix (np.save appends ".npy" to names without it); dot-prefixed so listings skip it.
    return path.with_name(f".{path.stem}{TEMP_MARK}{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success renames it to ``path``, on failure removes it.

    Args:
        path: the final file or directory.
        directory: the output is a directory (created empty for the caller to fill; an existing ``path`` is
            replaced).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temporary(path)
    _remove(temp)
    if directory:
        temp.mkdir()
    try:
        yield temp
        if directory and path.exists():
            _remove(path)
        os.replace(temp, path)
    except BaseException:
        _remove(temp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temporaries(*directories: str | Path) -> int:
    """Removes temporaries left in ``directories`` by an interrupted run; returns how many."""
    count = 0
    for directory in directories:
        directory = Path(directory)
        if directory.is_dir():
            for entry in directory.glob(f".*{TEMP_MARK}*"):
                _remove(entry)
                count += 1
    return count


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as temp:
        temp.write_text(text)


def prepare_parser(name: str, description: str, raw_layout: str, cache_layout: str, source: str,
                   short_side: int, fps: float | None = None) -> argparse.ArgumentParser:
    """The ``balance-prepare <name>`` parser: ``--raw``, ``--out``, ``--workers``, ``--short-side`` and
    ``--jpeg-quality`` (and ``--fps`` for video), with the raw and cache layouts and the source in its help.

    Args:
        name: the data set's module and command name.
        description: one line on what the command turns into what.
        raw_layout: the raw download's layout, as shown to users.
        cache_layout: the cache's layout.
        source: where the raw download is obtained.
        short_side: the default ``--short-side`` (pixels of an image's or frame's short side in the cache).
        fps: the default ``--fps`` (frames kept per second of video); None: no ``--fps`` (images, not video).
    """
    parser = argparse.ArgumentParser(
        prog=f"balance-prepare {name}", description=description,
        epilog=f"Raw layout:\n{raw_layout}\n\nCache layout:\n{cache_layout}\n\nSource: {source}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--raw", required=True, help="the raw download (see the data set's README section)")
    parser.add_argument("--out", required=True, help="the cache directory to write (data.root for training)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: all cores; 1 runs in one process)")
    parser.add_argument("--short-side", type=int, default=short_side,
                        help=f"resize images so the short side has this many pixels (0: keep; default {short_side})")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    if fps is not None:
        parser.add_argument("--fps", type=float, default=fps, help=f"frames kept per second of video (default {fps:g})")
    return parser


def run_prepare_command(parser: argparse.ArgumentParser, name: str, out: str | Path,
                        prepare: Callable[[], object]) -> None:
    """Runs ``prepare()`` for the command ``parser`` parsed; a raw download that is missing or laid out otherwise
    exits with status 2 and the message; then prints the command that trains on the cache ``out``."""
    try:
        prepare()
    except FileNotFoundError as error:
        parser.exit(2, f"{parser.prog}: {error}\n")
    print(f"train with: python train.py data={name} model={name} data.root={Path(out).expanduser().resolve()}")


def finish(report: PrepareReport, out: str | Path, title: str, details: Sequence[str] = (),
           usable: int | None = None) -> Path:
    """Writes ``OUT/prepare_report.txt``, prints the summary, and exits with status 1 if nothing usable is left.

    Args:
        report: the run's report.
        out: the output directory.
        title: the command, e.g. ``"balance-prepare crema_d"``.
        details: extra lines for the report (e.g. the raw directory, what was found).
        usable: how many usable items the cache holds (default: ``report.usable``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_NAME
    atomic_write_text(path, report.text(title, details))
    usable = report.usable if usable is None else usable
    print(f"{title}: {report.counts()}; {usable} usable in {out}")
    for item, reason in sorted(report.failed)[:SHOWN_FAILURES]:
        print(f"  failed {item}: {reason}")
    if len(report.failed) > SHOWN_FAILURES:
        print(f"  ... and {len(report.failed) - SHOWN_FAILURES} more")
    print(f"report: {path}")
    if usable == 0:
        print(f"{title}: nothing usable was prepared (see {path})", file=sys.stderr)
        raise SystemExit(1)
    return path


def check_params(out: Path, params: dict, prog: str) -> None:
    """Refuses to resume into a cache prepared with other parameters (exit 2); records them for the next run."""
    path = out / "prepare_params.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != params:
            print(f"{prog}: {out} was prepared with {previous}, not {params}: use another --out "
                  "or delete it", file=sys.stderr)
            raise SystemExit(2)
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(params, indent=2))


def missing_cache_error(problem: str, *, title: str, root: Path | None, looks_raw: bool, command: str,
                        raw_layout: str, cache_layout: str, obtained: str, prepare: str,
                        download: str = "download") -> FileNotFoundError:
    """The error for a missing, incomplete or raw ``data.root``: it names the problem, the raw layout, the
    preparation command and the cache it writes, and where the data set is obtained.

    Args:
        problem: what is wrong, one line.
        title: the data set's name in messages.
        root: ``data.root`` (None when unset).
        looks_raw: whether ``root`` holds the raw download instead of a cache (the message then says so).
        command: the preparation command with placeholders (``... --raw RAW --out OUT``).
        raw_layout, cache_layout: the layouts, as the data set's documentation draws them.
        obtained: where the data comes from, completing "<title> is obtained ..." (e.g. ``"from <url>"``).
        prepare: the preparation command's name and data set (``"balance-prepare crema_d"``).
        download: what the raw data is called ("download", "release").
    """
    hint = ""
    if root is not None and looks_raw:
        hint = (f"\n{root} looks like the raw {download}: prepare it into another directory with "
                f"`{prepare} --raw {root} --out OUT` and set data.root=OUT.")
    # A directory holding any prepared cache is no place to write this one.
    out = "OUT" if root is None or prepared_dataset(root) is not None else str(root)
    return FileNotFoundError(
        f"{title}: {problem}.{hint}\n"
        f"data.root must be a cache prepared from the raw {download} with\n  {command}\n"
        f"(then data.root=OUT; here: --out {out}), where RAW is laid out as\n"
        f"{raw_layout}\nThe cache it writes:\n{cache_layout}\n"
        f"{title} is obtained {obtained}; nothing is downloaded automatically."
    )


def prepared_dataset(root: Path) -> str | None:
    """The ``dataset`` named by the cache in ``root`` (its ``meta.json``), or None where there is none."""
    try:
        meta = json.loads((Path(root) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("dataset") if isinstance(meta, dict) else None


def read_cache_meta(root: Path | None, required: Sequence[str], dataset: str, version: int, title: str,
                    missing_error: Callable[[str], Exception]) -> dict:
    """Checks that ``root`` is a complete cache of ``dataset`` at ``version`` and returns its ``meta.json``.

    Every problem is raised as ``missing_error(problem)``, the datamodule's error that names the expected layouts,
    the preparation command and the source.

    Args:
        root: the cache directory (``data.root``), or None when unset.
        required: the files and directories a complete cache holds (``meta.json`` among them).
        dataset: the ``dataset`` field of ``meta.json``.
        version: the cache version ``meta.json`` must carry.
        title: the data set's name in messages.
        missing_error: builds the exception from a one-line problem.
    """
    if root is None:
        raise missing_error("data.root is not set")
    if not root.is_dir():
        raise missing_error(f"{root} does not exist")
    other = prepared_dataset(root)
    if other is not None and other != dataset:
        raise missing_error(f"{root} is a prepared {other} cache, not a {title} one")
    missing = [name for name in required if not (root / name).exists()]
    if missing:
        raise missing_error(f"{root} is not a complete {title} cache (missing {', '.join(missing)})")
    meta = json.loads((root / "meta.json").read_text())
    if meta.get("dataset") != dataset or meta.get("version") != version:
        raise missing_error(f"{root}/meta.json is not a version {version} {title} cache's")
    return meta


def report_reason(error: object, raw: Path, path: Path | None = None) -> str:
    """An error's message as the report gives it: the raw root dropped from its paths, and with ``path`` (the
    item's file) that path's own ``<path>: `` prefix too, which FFmpeg's messages repeat and the report names
    already."""
    text = str(error) if path is None else str(error).replace(f"{path}: ", "")
    return text.replace(f"{raw}/", "")


def not_a_directory(path: Path) -> str | None:
    """Why ``path`` cannot be a raw download's directory, or ``None`` if it can: it does not exist, or it is a file
    (often the archive the data set comes in, not yet extracted)."""
    if path.is_dir():
        return None
    if path.exists():
        return (f"{path} is a file, not a directory: give the directory the download extracts to (extract an "
                "archive first)")
    return f"{path} does not exist"
