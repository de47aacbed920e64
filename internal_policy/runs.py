"""The run folder: one place for its file names, atomic writes, the lock, run.json, shards, and reading it back.

`profile`, `generate` and `branch-points` write their folders through `RunDir`; `stages` and the
training folder (`bupo.run`) use its atomic writers; figures, stage detection and BuPO's
`internal_layer="auto"` read runs back through `load_run` (pandas only). Layers are numbered as in
the paper: 1..L, 0 = the embedding output.

A run folder is written only by the process that holds its lock (`run.lock`, taken with
`filelock`), and only if it is new, empty, or already a run: `claim_run_dir` refuses a folder
holding files this tool did not write, so nothing of the user's is ever overwritten or deleted.
Every file is written to a temporary name and renamed (`atomic_write`), so a killed process never
leaves a half-written one. Work is split into shards, each finished by a `.done` marker written last;
a resumed run must use the settings (`keys`) it was started with. A damaged file of a run (run.json,
a shard, a `.done` marker) is an `InputError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout

from .dist import barrier
from .errors import InputError, RunBusyError

SUMMARY = "summary.csv"
TOKENS = "tokens.parquet"
RECORDS = "records.parquet"
RUN_JSON = "run.json"
LOCK = "run.lock"
SHARDS = "shards"
STAGES = "stages.json"
STEPS = "steps.parquet"
RESPONSES = "responses.jsonl"
GENERATION = "generation"
GENERATION_SETTINGS = Path(GENERATION) / "settings.json"
SUMMARY_COLUMNS = ("layer", "component", "n_tokens")
"""Columns every summary.csv has, whatever statistics it holds."""
HEAD_COLUMN = "head"
"""Column of a run with `attn_head` rows: the 0-based head within the layer (<NA> on the other rows)."""
SHARD_FILE = re.compile(r"[0-9a-f]{16}\.([a-z_]+\.parquet|done)(\.tmp)?")
"""Names of the files a run writes into `shards/` (a batch's hash, what it holds, `.tmp` while written)."""
SIGNATURES = ((RUN_JSON, "layer_numbering"), (RUN_JSON, "fci"), (GENERATION_SETTINGS, "prompt_ids_sha1"))
"""(settings file, key it always holds) of each kind of run: a profile, a branch-point run, a generation."""


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` then rename tmp → path, so `path` is either absent or complete (tmp removed on failure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path: Path, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2), encoding="utf-8"))


def write_jsonl(path: Path, records: Iterable[Mapping]) -> None:
    """Write one JSON object per line, atomically."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def check_resume(where: Path, saved: dict, settings: dict, keys: Iterable[str], resume: bool,
                 describe: Callable[[str, object, object], str] | None = None) -> None:
    """Refuse to overwrite a started run without `resume`, and to resume it with other `keys` settings
    (`describe(key, saved, now)` names each difference in the one-line error; default: the key)."""
    describe = describe or (lambda key, saved, now: key)
    if not resume:
        raise InputError(f"{where} already holds a run; pass --resume to continue it or choose another --out")
    changed = [describe(k, saved.get(k), settings.get(k)) for k in keys if saved.get(k) != settings.get(k)]
    if changed:
        raise InputError(f"cannot resume {where}: settings differ from the run there in {'; '.join(changed)}; "
                         "use the same ones or another --out")


def read_json(path: Path, fix: str = "restore it, or start again with another --out") -> object:
    """A JSON file this tool wrote; a damaged one is an InputError that names it and says `fix`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is damaged (not valid JSON: {err}); {fix}") from None


def _is_ours(path: Path) -> bool:
    """Whether a folder holds a run of this tool (one of its settings files carries our key, see SIGNATURES)."""
    for name, key in SIGNATURES:
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


class RunDir:
    """A run folder being written: claimed and locked, its settings checked and written, shards, final tables.

    What `profile`, `branch_points` and `generate` do with it::

        run = RunDir(out)
        done = run.start(meta, keys, resume)       # record ids finished by an earlier attempt
        run.write_shard(ids, sums=table)           # one per batch, `.done` marker last
        run.finish(meta)                           # run.json says 'complete'; the lock is released

    Under torch.distributed every rank calls `start` (rank 0 takes the lock and writes the settings).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.shards = self.path / SHARDS
        self.lock: FileLock | None = None

    def start(self, meta: Mapping, keys: Iterable[str], resume: bool, *, rank: int = 0,
              describe: Callable[[str, object, object], str] | None = None,
              settings_file: str | Path = RUN_JSON) -> set[str]:
        """Claim the folder; refuse a started run without `resume` or with other `keys` settings; write `meta`.

        `meta` goes to `settings_file`: run.json (with `"status": "running"`, and the shard files of
        unfinished batches are removed), or `GENERATION_SETTINGS` for a generation (as given).
        Returns the record ids of the finished batches.
        """
        self.lock = claim_run_dir(self.path, lock=rank == 0)
        saved = self.path / settings_file
        if saved.exists():
            data = read_json(saved)
            if not isinstance(data, dict):
                raise InputError(f"{saved} is damaged (not a JSON object); restore it, or start again with "
                                 "another --out")
            check_resume(saved.parent, data, dict(meta), keys, resume, describe)
        barrier()  # every rank has checked before rank 0 writes
        if rank == 0:
            saved.parent.mkdir(parents=True, exist_ok=True)
            run = Path(settings_file) == Path(RUN_JSON)
            write_json(saved, {**meta, "status": "running"} if run else dict(meta))
            if run and self.shards.is_dir():
                self.remove_unfinished()
        barrier()
        return self.finished_ids()

    def release(self) -> None:
        """Release the lock (also a hold left by an interrupted attempt in this process)."""
        if self.lock is not None:
            self.lock.release(force=True)

    def finish(self, meta: Mapping) -> dict:
        """Write run.json with `"status": "complete"` and release the lock; return what was written."""
        meta = {**meta, "status": "complete"}
        write_json(self.path / RUN_JSON, meta)
        self.release()
        return meta

    def write(self, name: str, write: Callable[[Path], object]) -> Path:
        """Write the folder's file `name` atomically with `write(tmp)`; return its path."""
        atomic_write(self.path / name, write)
        return self.path / name

    def write_shard(self, record_ids: Sequence[str], **tables: pd.DataFrame | None) -> None:
        """Write one batch: `NAME.KIND.parquet` for each table given, then the `.done` marker (its ids) last."""
        self.shards.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1("\n".join(sorted(record_ids)).encode()).hexdigest()[:16]
        for kind, table in tables.items():
            if table is not None:
                atomic_write(self.shards / f"{name}.{kind}.parquet", lambda p, t=table: t.to_parquet(p, index=False))
        write_json(self.shards / f"{name}.done", list(record_ids))

    def shard_names(self) -> list[str]:
        """Names (batch hashes) of the finished batches, sorted."""
        return sorted(p.name.split(".")[0] for p in self.shards.glob("*.done"))

    def shard_files(self, kind: str) -> list[Path]:
        """The `kind` parquet file of every finished batch, in `shard_names` order."""
        return [self.shards / f"{name}.{kind}.parquet" for name in self.shard_names()]

    def read_shards(self, kind: str) -> pd.DataFrame:
        """The `kind` tables of every finished batch, concatenated."""
        return pd.concat([read_shard(p).to_pandas() for p in self.shard_files(kind)], ignore_index=True)

    def finished_ids(self) -> set[str]:
        """Record ids of the finished batches: the union of the `.done` markers (lists of ids)."""
        done: set[str] = set()
        for marker in self.shards.glob("*.done"):
            fix = "delete it, then --resume to recompute that batch"
            ids = read_json(marker, fix)
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise InputError(f"{marker} is damaged (not a list of record ids); {fix}")
            done.update(ids)
        return done

    def remove_unfinished(self) -> None:
        """Delete the shard files of batches that never got their `.done` marker (only names this tool writes)."""
        for path in self.shards.iterdir():
            unfinished = path.name.endswith(".tmp") or not (self.shards / f"{path.name[:16]}.done").exists()
            if SHARD_FILE.fullmatch(path.name) and unfinished:
                path.unlink()

    @property
    def generation(self) -> Path:
        """Where `generate` keeps its settings and finished batches (`batch-NNNNNN.jsonl`)."""
        return self.path / GENERATION

    def write_batch(self, index: int, records: Iterable[Mapping]) -> None:
        """Write one finished generation batch atomically."""
        write_jsonl(self.generation / f"batch-{index:06d}.jsonl", records)

    def finished_batches(self) -> dict[int, list[dict]]:
        """The generation batches already written: {batch index: records}; a damaged one is an InputError."""
        done = {}
        for path in sorted(self.generation.glob("batch-[0-9]*.jsonl")):
            try:
                done[int(path.stem.removeprefix("batch-"))] = [json.loads(line) for line in
                                                               path.read_text(encoding="utf-8").splitlines()]
            except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError and a bad index are ValueErrors
                raise InputError(f"{path} is damaged ({err}); delete it and --resume to sample that batch "
                                 "again") from None
        return done


def read_shard(path: Path):
    """One shard (a pyarrow Table); a damaged one is an InputError saying how to recompute it."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise InputError(f"shard {path} is damaged ({str(err).splitlines()[0]}); delete it and its "
                         f"{path.name[:16]}.done marker, then --resume to recompute that batch") from None


def head_ints(table: pd.DataFrame) -> pd.DataFrame:
    """The head column as nullable integers (a CSV round trip or a concatenation may have made it float)."""
    return table.astype({HEAD_COLUMN: "Int64"}) if HEAD_COLUMN in table.columns else table


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
        """The per-record table (None without one), read from disk on first access."""
        path = self.out_dir / RECORDS if self.out_dir is not None else None
        if self._records is None and path is not None and path.exists():
            self._records = pd.read_parquet(path)
        return self._records

    @property
    def tokens_path(self) -> Path | None:
        """Where a run on disk keeps its per-token table (the file may be absent: `--no-tokens`)."""
        return self.out_dir / TOKENS if self.out_dir is not None else None

    @property
    def tokens(self) -> pd.DataFrame | None:
        """The per-token table (None without one), read from disk on first access."""
        path = self.tokens_path
        if self._tokens is None and path is not None and path.exists():
            self._tokens = pd.read_parquet(path)
        return self._tokens


def read_meta(path: Path, command: str) -> dict:
    """run.json of a finished run (empty if absent); one still marked running is refused (`command` resumes it)."""
    meta = read_json(path / RUN_JSON) if (path / RUN_JSON).is_file() else {}
    if not isinstance(meta, dict):
        raise InputError(f"{path / RUN_JSON} is damaged (not a JSON object); restore it or run {command} again")
    if meta.get("status") == "running":
        raise InputError(f"{path} is a run that is still running or was interrupted (run.json says 'running'); "
                         f"wait for it, or finish it with the same `internal-policy {command} ... --out {path} "
                         "--resume`")
    return meta


def load_run(run_dir: str | Path) -> ProfileResult:
    """Read a finished run folder back into a `ProfileResult` (a run still marked running is refused)."""
    path = Path(run_dir)
    if not (path / SUMMARY).is_file():
        raise InputError(f"{path} holds no finished run (no summary.csv); run `internal-policy profile --out {path}`")
    meta = read_meta(path, "profile")
    try:
        summary = pd.read_csv(path / SUMMARY, dtype={"group": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path / SUMMARY} is not a readable table ({str(err).splitlines()[0]}); "
                         "profile again to rewrite it") from None
    missing = [c for c in SUMMARY_COLUMNS if c not in summary.columns]
    if missing or summary.empty:
        raise InputError(f"{path / SUMMARY} is not a profile summary ("
                         f"{f'no columns {missing}' if missing else 'no rows'}); profile again to rewrite it")
    overall, groups = split_groups(head_ints(summary))
    return ProfileResult(overall, meta, path, groups=groups)


def split_groups(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A summary.csv table → (overall rows without the `group` column, per-group rows or None)."""
    if "group" not in table.columns:
        return table, None
    overall = table["group"].isna()
    return table[overall].drop(columns="group").reset_index(drop=True), table[~overall].reset_index(drop=True)
