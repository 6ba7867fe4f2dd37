"""The workdir of a training run: its single-writer lock, its metrics log, and the errors
that are the user's to fix.

* `UserError`: a bad config value, a workdir in use or not writable, a full disk, a
  checkpoint that cannot be read with no intact one left, a non-finite loss. Its message
  is one line; the command-line scripts print it and exit with code 1.
* `WorkdirLock`: an exclusive `fcntl.flock` on `WORKDIR/.lock` for the whole run. The
  kernel releases it on any exit (a killed run leaves no stale lock); the holder writes
  its pid into the file, so a second run names it. Readers (`eval.py`) take no lock.
* `MetricWriter`: `metrics.jsonl` and TensorBoard; a resumed run first drops the rows
  past its restored step (`truncate_jsonl`, atomic; TensorBoard's purge step), so each
  step appears once, and a failed run's rows past its last checkpoint go.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import glob
import socket
import threading

import tensorboardX

# Errors of the filesystem that the user fixes (space, permissions), not the program.
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.EFBIG)


class UserError(ValueError):
  """A problem the user fixes (config, workdir, disk, checkpoints), told in one line.

  A ValueError, so code that already catches the config errors catches it too.
  """

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))  # always one line


def user_os_error(error: OSError, what: str) -> UserError | None:
  """`error` as a one-line UserError about `what` when it is the filesystem's (full,
  read-only, not permitted), else None."""
  if error.errno not in USER_ERRNOS:
    return None
  where = f" ({error.filename})" if error.filename else ""
  return UserError(f"{what}: {error.strerror or os.strerror(error.errno)}{where}")


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: readers see the old
  file or the new one, never a part."""
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"  # unique per thread too
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


class WorkdirLock:
  """An exclusive lock on `workdir` for one training run (see the module docstring).

  `acquire()` raises a one-line UserError when another process holds it (naming its
  pid) or the workdir cannot be written. `release(undo=True)` also puts the lock file
  (and a workdir this lock created) back as they were, for a run refused before it
  started.
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, ".lock")
    self._fd: int | None = None
    self._previous: bytes | None = None  # the lock file's bytes before us (None: no file)
    self._created_workdir = False

  def acquire(self) -> None:
    self._created_workdir = not os.path.isdir(self.workdir)
    try:
      os.makedirs(self.workdir, exist_ok=True)
      existed = os.path.exists(self.path)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise (user_os_error(e, f"cannot write to the workdir {self.workdir}") or e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "pid unknown"
      os.close(fd)
      raise UserError(f"the workdir {self.workdir} is in use by another training run "
                      f"({holder}); wait for it to end or use another --workdir") from None
    self._fd = fd
    self._previous = os.pread(fd, 1 << 16, 0) if existed else None
    me = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()
    os.pwrite(fd, me, 0)  # never empty in between: a reader always finds a pid
    os.ftruncate(fd, len(me))

  def release(self, *, undo: bool = False) -> None:
    if self._fd is None:
      return
    try:
      if undo:
        self._undo()
    finally:
      os.close(self._fd)  # releases the lock
      self._fd = None

  def _undo(self) -> None:
    with contextlib.suppress(OSError):
      if self._previous is None:
        os.remove(self.path)
        if self._created_workdir:
          os.rmdir(self.workdir)  # only if empty
      else:
        os.pwrite(self._fd, self._previous, 0)
        os.ftruncate(self._fd, len(self._previous))


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the rows of the JSONL file `path` with `step` <= `last_step` (and drops a
  torn last line), rewriting it atomically when anything goes."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and row.get("step", 0) <= last_step:
      kept.append(line)
  if kept != lines:
    atomic_write(path, "".join(line + "\n" for line in kept))


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard (process 0 only), after
  dropping what an earlier run logged past `start_step` (the step this run resumes
  from; 0 for a fresh start)."""

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    truncate_jsonl(path, start_step)
    self._jsonl = open(path, "a")
    logdir = os.path.join(workdir, "tensorboard")
    earlier = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    self._tb = tensorboardX.SummaryWriter(logdir,
                                          purge_step=start_step + 1 if earlier else None)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, global_step=step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
