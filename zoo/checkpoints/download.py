"""Downloads of public checkpoints into a local cache, verified against the publisher's
sha256 where one is stated.

* `cache_dir()`: `$ZOO_CACHE`, else `$XDG_CACHE_HOME/attention-zoo`, else
  `~/.cache/attention-zoo`. Files sit there flat, under their URL's file name (or the
  `filename` given).
* `download(url, sha256=..., ...)`: the cached file when it is there (its hash checked
  when pinned), else a streamed download (urllib; http, https or file URLs) into a
  temporary file beside its final place, hashed while it is written, checked, then
  renamed into place. A wrong hash, a dropped connection, a short body or Ctrl-C leave
  nothing in the cache. Unpinned files (no hash from the publisher) are refused before
  any network access unless `allow_unpinned=True` (command line `--allow-unpinned`).
  When the network is unreachable the error names the URL and the exact path where a
  copy fetched by other means can be put, which the next call then uses.

Pins: `sha256` (64 hex digits) or `sha256_prefix`, the leading hex digits of the sha256
that torch hub file names carry (`deit_tiny_patch16_224-a1311bcf.pth`: the digest starts
with a1311bcf; torch hub's `check_hash`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import posixpath
import re
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

from zoo.checkpoints.files import CheckpointError, atomic_file
from zoo.checkpoints.files import sha256 as file_sha256

APP_NAME = "attention-zoo"
CHUNK = 1 << 20
TIMEOUT_S = 60.0  # per socket operation (connect, each read), not the whole download
ALLOW_UNPINNED_HINT = ("pass allow_unpinned=True (python -m zoo.checkpoints fetch NAME "
                       "--allow-unpinned; train.py/eval.py: --config.init_allow_unpinned=True)")
_HEX = re.compile(r"[0-9a-f]+")


def cache_dir() -> pathlib.Path:
  """The checkpoint cache: `$ZOO_CACHE` if set, else `$XDG_CACHE_HOME/attention-zoo`,
  else `~/.cache/attention-zoo` (not created here)."""
  if os.environ.get("ZOO_CACHE"):
    return pathlib.Path(os.environ["ZOO_CACHE"]).expanduser()
  if os.environ.get("XDG_CACHE_HOME"):
    return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / APP_NAME
  return pathlib.Path.home() / ".cache" / APP_NAME


def url_filename(url: str) -> str:
  """The last path component of `url` ('https://host/a/b.npz?x=1' -> 'b.npz')."""
  return posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))


def cache_path(url: str, filename: str | None = None,
               cache: str | os.PathLike | None = None) -> pathlib.Path:
  """Where `download` keeps (and looks for) `url`: `cache` (default `cache_dir()`) /
  `filename` (default the URL's file name)."""
  name = filename or url_filename(url)
  if not name or name in (".", "..") or "/" in name or os.sep in name:
    raise CheckpointError(f"cannot name a cache file for {url}: give filename= (a plain "
                          f"file name), got {name!r}")
  return pathlib.Path(cache if cache is not None else cache_dir()) / name


def _pin(sha256: str | None, sha256_prefix: str | None) -> tuple[str | None, str | None]:
  """The pins, lower case and checked (64 hex digits; a prefix of 6 to 64)."""
  if sha256 is not None:
    sha256 = sha256.lower()
    if len(sha256) != 64 or not _HEX.fullmatch(sha256):
      raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
  if sha256_prefix is not None:
    sha256_prefix = sha256_prefix.lower()
    if not 6 <= len(sha256_prefix) <= 64 or not _HEX.fullmatch(sha256_prefix):
      raise ValueError(f"sha256_prefix must be 6 to 64 hex digits, got {sha256_prefix!r}")
  return sha256, sha256_prefix


def _matches(digest: str, sha256: str | None, sha256_prefix: str | None) -> bool:
  return ((sha256 is None or digest == sha256)
          and (sha256_prefix is None or digest.startswith(sha256_prefix)))


def _expected(sha256: str | None, sha256_prefix: str | None) -> str:
  return sha256 if sha256 is not None else f"{sha256_prefix}... (prefix)"


def _reason(error: BaseException) -> str:
  """A short reason for a failed request ('HTTP 404 Not Found', 'Connection refused')."""
  if isinstance(error, urllib.error.HTTPError):
    return f"HTTP {error.code} {error.reason}"
  if isinstance(error, urllib.error.URLError):
    inner = error.reason
    return getattr(inner, "strerror", None) or str(inner)
  if isinstance(error, http.client.IncompleteRead):
    return "the connection closed before the end of the file"
  return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _read(response, url: str, by_hand: str) -> bytes:
  """The next chunk of the response; a network failure as a CheckpointError."""
  try:
    return response.read(CHUNK)
  except (http.client.HTTPException, OSError) as e:  # dropped, reset, timed out
    raise CheckpointError(f"download of {url} failed ({_reason(e)}); run again, or "
                          f"{by_hand}") from None


def download(url: str, *, sha256: str | None, sha256_prefix: str | None = None,
             filename: str | None = None, allow_unpinned: bool = False,
             progress: bool = True, cache: str | os.PathLike | None = None,
             timeout: float = TIMEOUT_S) -> pathlib.Path:
  """The path of `url`'s file in the cache, downloaded first if it is not there.

  Args:
    url: http(s) or file URL.
    sha256: the publisher's sha256 (64 hex digits), or None.
    sha256_prefix: the leading hex digits of the sha256 (torch hub file names), or None.
    filename: the cache file's name (default: the URL's file name).
    allow_unpinned: download even with neither pin (nothing can verify the bytes).
    progress: show a tqdm progress bar (bytes) on stderr.
    cache: the cache folder (default `cache_dir()`).
    timeout: seconds for connecting and for each read.

  A file already in the cache is returned without network access (after its hash is
  checked when pinned; a wrong one is an error naming the file, to be deleted). Raises
  CheckpointError (one line) for an unpinned download without `allow_unpinned`, an
  unreachable URL or failed transfer (naming the URL and the path to put the file at by
  hand), or a hash mismatch (naming both hashes); nothing is then left in the cache.
  """
  sha256, sha256_prefix = _pin(sha256, sha256_prefix)
  path = cache_path(url, filename, cache)
  pinned = sha256 is not None or sha256_prefix is not None
  if path.is_file():
    if pinned:
      digest = file_sha256(path)
      if not _matches(digest, sha256, sha256_prefix):
        raise CheckpointError(
            f"cached checkpoint {path} has sha256 {digest}, expected "
            f"{_expected(sha256, sha256_prefix)}: it is corrupt or another file; delete it "
            f"and run again to download {url}")
    return path
  if not pinned and not allow_unpinned:
    raise CheckpointError(
        f"{url}: the publisher states no sha256 for this file, so its download cannot be "
        f"verified; {ALLOW_UNPINNED_HINT} to download it anyway, or put a copy at {path}")
  by_hand = f"download it by other means and put it at {path} (the next run uses it)"
  try:
    response = urllib.request.urlopen(
        urllib.request.Request(url, headers={"User-Agent": APP_NAME}), timeout=timeout)
  except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
    raise CheckpointError(f"cannot download {url} ({_reason(e)}); {by_hand}") from None
  try:
    with response, atomic_file(path) as f:
      total = response.headers.get("Content-Length")
      total = int(total) if total and total.isdigit() else None
      digest, received = hashlib.sha256(), 0
      with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=path.name, disable=not progress, leave=False) as bar:
        while block := _read(response, url, by_hand):
          f.write(block)
          digest.update(block)
          received += len(block)
          bar.update(len(block))
      if total is not None and received != total:
        raise CheckpointError(f"download of {url} stopped after {received} of {total} "
                              f"bytes; run again, or {by_hand}")
      got = digest.hexdigest()
      if pinned and not _matches(got, sha256, sha256_prefix):
        raise CheckpointError(
            f"download of {url} has sha256 {got}, expected "
            f"{_expected(sha256, sha256_prefix)}: corrupt in transit or changed by the "
            f"publisher; nothing was kept")
  except OSError as e:  # the cache's (network errors are CheckpointErrors by now)
    raise CheckpointError(f"cannot write the checkpoint cache {path.parent} "
                          f"({_reason(e)}); free space or set ZOO_CACHE to another "
                          f"folder") from None
  return path


__all__ = ["cache_dir", "cache_path", "download", "url_filename", "ALLOW_UNPINNED_HINT"]
