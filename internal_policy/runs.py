"""The run folder: the tables a profiling run leaves on disk, guarding the folder, and reading it back.

Figures, stage detection and BuPO's `internal_layer="auto"` read runs through it (pandas only).
Layers are numbered as in the paper: 1..L, 0 = the embedding output.

A run folder is written only by the process that holds its lock (`run.lock`, taken with
`filelock`), and only if it is new, empty, or already a run: `claim_run_dir` refuses a folder
holding files this tool did not write, so nothing of the user's is ever overwritten or deleted.
A damaged file of a run (run.json, a shard, a `.done` marker) is an `InputError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout

from .errors import InputError, RunBusyError

SUMMARY = "summary.csv"
TOKENS = "tokens.parquet"
RECORDS = "records.parquet"
RUN_JSON = "run.json"
LOCK = "run.lock"
GENERATION_SETTINGS = Path("generation") / "settings.json"
SUMMARY_COLUMNS = ("layer", "component", "n_tokens")
"""Columns every summary.csv has, whatever statistics it holds."""
SHARD_FILE = re.compile(r"[0-9a-f]{16}\.(sums\.parquet|records\.parquet|tokens\.parquet|done)(\.tmp)?")
"""Names of the files a profile writes into `shards/` (a batch's hash, what it holds, `.tmp` while written)."""


def read_json(path: Path, fix: str = "restore it, or start again with another --out") -> object:
    """A JSON file this tool wrote; a damaged one is an InputError that names it and says `fix`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is damaged (not valid JSON: {err}); {fix}") from None


def _is_ours(path: Path) -> bool:
    """Whether a folder holds a profile run or a generation (their settings files carry our keys)."""
    for name, key in ((RUN_JSON, "layer_numbering"), (GENERATION_SETTINGS, "prompt_ids_sha1")):
        if (path / name).is_file():
            try:
                saved = json.loads((path / name).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return True  # a damaged file of ours: reading it later names the file
            if isinstance(saved, dict) and key in saved:
                return True
    return False


def writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check it is a folder this process can write (else an InputError)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path} is an existing file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create --out {path} ({err.strerror}); give a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into --out {path} (permission denied); give a folder you can write to")
    return path


def claim_run_dir(path: str | Path, lock: bool = True) -> FileLock | None:
    """Create or accept `path` as a run folder and take its lock (without waiting); return the lock.

    Refused with an InputError: a path that is a file, a folder that cannot be written, and a folder
    holding any file when it is not a run (neither run.json nor generation settings of this tool).
    A lock held elsewhere raises `RunBusyError`. The lock is re-entrant within a process (a resume
    after an interrupted attempt in the same session); `lock=False` only checks (ranks other than 0).
    """
    path = Path(path)
    if path.is_dir() and not _is_ours(path):
        other = next((p for p in path.rglob("*") if not p.is_dir() and p.name != LOCK), None)
        if other is not None:
            raise InputError(f"--out {path} is a folder that is not a run and is not empty (it holds "
                             f"{other.relative_to(path)}); give a new or empty folder, nothing of yours is overwritten")
    writable_dir(path)
    if not lock:
        return None
    run_lock = FileLock(path / LOCK, is_singleton=True)
    try:
        run_lock.acquire(timeout=0)
    except Timeout:
        raise RunBusyError(f"{path} is in use by another internal-policy process (it holds {path / LOCK}); "
                           "wait for it to finish, or give another --out") from None
    return run_lock


def finished_ids(shards: Path) -> set[str]:
    """Record ids of the finished batches: the union of the `.done` markers (lists of ids)."""
    done: set[str] = set()
    for marker in shards.glob("*.done"):
        fix = "delete it, then --resume to recompute that batch"
        ids = read_json(marker, fix)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InputError(f"{marker} is damaged (not a list of record ids); {fix}")
        done.update(ids)
    return done


def remove_unfinished(shards: Path) -> None:
    """Delete the shard files of batches that never got their `.done` marker (only names this tool writes)."""
    for path in shards.iterdir():
        unfinished = path.name.endswith(".tmp") or not (shards / f"{path.name[:16]}.done").exists()
        if SHARD_FILE.fullmatch(path.name) and unfinished:
            path.unlink()


def read_shard(path: Path):
    """One shard (a pyarrow Table); a damaged one is an InputError saying how to recompute it."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise InputError(f"shard {path} is damaged ({str(err).splitlines()[0]}); delete it and its "
                         f"{path.name[:16]}.done marker, then --resume to recompute that batch") from None


@dataclass
class ProfileResult:
    """Tables of one run: `summary` (per layer × component, over all records), `groups` (the same per value of
    the `--group-by` field, with a leading `group` column; None without one), `records` (per record × layer ×
    component, with the record fields), `tokens` (per token, or None), `meta`.

    For a run on disk, `tokens` and `records` are read from their parquet files on first access.
    """

    summary: pd.DataFrame
    meta: dict
    out_dir: Path | None = None
    groups: pd.DataFrame | None = None
    _tokens: pd.DataFrame | None = None
    _records: pd.DataFrame | None = None

    @property
    def records(self) -> pd.DataFrame | None:
        path = self.out_dir / RECORDS if self.out_dir is not None else None
        if self._records is None and path is not None and path.exists():
            self._records = pd.read_parquet(path)
        return self._records

    @property
    def tokens(self) -> pd.DataFrame | None:
        path = self.out_dir / TOKENS if self.out_dir is not None else None
        if self._tokens is None and path is not None and path.exists():
            self._tokens = pd.read_parquet(path)
        return self._tokens


def load_run(run_dir: str | Path) -> ProfileResult:
    """Read a finished run folder back into a `ProfileResult` (a run still marked running is refused)."""
    path = Path(run_dir)
    if not (path / SUMMARY).is_file():
        raise InputError(f"{path} holds no finished run (no summary.csv); run `internal-policy profile --out {path}`")
    meta = read_json(path / RUN_JSON) if (path / RUN_JSON).is_file() else {}
    if not isinstance(meta, dict):
        raise InputError(f"{path / RUN_JSON} is damaged (not a JSON object); restore it or profile again")
    if meta.get("status") == "running":
        raise InputError(f"{path} is a run that is still running or was interrupted (run.json says 'running'); "
                         f"wait for it, or finish it with the same `internal-policy profile ... --out {path} --resume`")
    try:
        summary = pd.read_csv(path / SUMMARY, dtype={"group": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path / SUMMARY} is not a readable table ({str(err).splitlines()[0]}); "
                         "profile again to rewrite it") from None
    missing = [c for c in SUMMARY_COLUMNS if c not in summary.columns]
    if missing or summary.empty:
        raise InputError(f"{path / SUMMARY} is not a profile summary ("
                         f"{f'no columns {missing}' if missing else 'no rows'}); profile again to rewrite it")
    overall, groups = split_groups(summary)
    return ProfileResult(overall, meta, path, groups=groups)


def split_groups(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A summary.csv table → (overall rows without the `group` column, per-group rows or None)."""
    if "group" not in table.columns:
        return table, None
    overall = table["group"].isna()
    return table[overall].drop(columns="group").reset_index(drop=True), table[~overall].reset_index(drop=True)
