"""Checkpoint downloads against a local HTTP server: hashes checked, the cache reused
without a request, and nothing left behind by a wrong hash, a dropped connection, Ctrl-C
or a refused unpinned file."""

import hashlib
import http.server
import socket
import threading

import pytest

from zoo.checkpoints import download as download_lib
from zoo.checkpoints.files import CheckpointError

GOOD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: more than one read chunk
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
  """/good.bin: GOOD; /short.bin: a Content-Length 1000 bytes past what it sends, then
  the connection closes; anything else 404. Every request path is recorded."""

  def do_GET(self):  # noqa: N802 (the http.server name)
    self.server.requests.append(self.path)
    if self.path == "/good.bin":
      self.send_response(200)
      self.send_header("Content-Length", str(len(GOOD)))
      self.end_headers()
      self.wfile.write(GOOD)
    elif self.path == "/short.bin":
      self.send_response(200)
      self.send_header("Content-Length", str(len(GOOD) + 1000))
      self.end_headers()
      self.wfile.write(GOOD)
      self.wfile.flush()
      self.close_connection = True
    else:
      self.send_error(404)

  def log_message(self, *args):  # quiet
    pass


@pytest.fixture
def server():
  """A threaded HTTP server on 127.0.0.1 (a free port); `.url(path)`, `.requests`."""
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.requests = []
  httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}/{path}"
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                            daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()
  thread.join(5)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty cache folder, also set as $ZOO_CACHE."""
  folder = tmp_path / "cache"
  monkeypatch.setenv("ZOO_CACHE", str(folder))
  return folder


def _files(folder):
  return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "z"))
  assert download_lib.cache_dir() == tmp_path / "z"
  monkeypatch.delenv("ZOO_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert download_lib.cache_dir() == tmp_path / "xdg" / "attention-zoo"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert download_lib.cache_dir() == tmp_path / "home" / ".cache" / "attention-zoo"


def test_good_download_then_cache_without_request(server, cache):
  path = download_lib.download(server.url("good.bin"), sha256=GOOD_SHA, progress=False)
  assert path == cache / "good.bin" and path.read_bytes() == GOOD
  assert server.requests == ["/good.bin"]
  again = download_lib.download(server.url("good.bin"), sha256=GOOD_SHA.upper(),
                                progress=False)
  assert again == path and server.requests == ["/good.bin"]  # no second request
  assert _files(cache) == ["good.bin"]


def test_prefix_pin_filename_and_progress_bar(server, cache, capsys):
  path = download_lib.download(server.url("good.bin"), sha256=None,
                               sha256_prefix=GOOD_SHA[:8], filename="renamed-x.bin")
  assert path == cache / "renamed-x.bin" and path.read_bytes() == GOOD
  assert "renamed-x.bin" in capsys.readouterr().err  # tqdm's bar on stderr


def test_wrong_hash_rejected_and_nothing_kept(server, cache):
  wrong = "0" * 64
  with pytest.raises(CheckpointError) as info:
    download_lib.download(server.url("good.bin"), sha256=wrong, progress=False)
  message = str(info.value)
  assert GOOD_SHA in message and wrong in message and "\n" not in message
  with pytest.raises(CheckpointError, match="prefix"):
    download_lib.download(server.url("good.bin"), sha256=None, sha256_prefix="deadbeef",
                          progress=False)
  assert _files(cache) == []


def test_cached_file_with_wrong_hash_names_it(server, cache):
  cache.mkdir()
  (cache / "good.bin").write_bytes(b"not the file")
  with pytest.raises(CheckpointError, match="delete it") as info:
    download_lib.download(server.url("good.bin"), sha256=GOOD_SHA, progress=False)
  assert str(cache / "good.bin") in str(info.value)
  assert server.requests == []


def test_interrupted_download_leaves_nothing(server, cache):
  with pytest.raises(CheckpointError) as info:
    download_lib.download(server.url("short.bin"), sha256=GOOD_SHA, progress=False)
  assert server.url("short.bin") in str(info.value)
  assert str(cache / "short.bin") in str(info.value)  # where to put a copy by hand
  assert _files(cache) == []


def test_keyboard_interrupt_leaves_nothing(server, cache, monkeypatch):
  class Interrupting(download_lib.tqdm):
    def update(self, n=1):
      raise KeyboardInterrupt

  monkeypatch.setattr(download_lib, "tqdm", Interrupting)
  with pytest.raises(KeyboardInterrupt):
    download_lib.download(server.url("good.bin"), sha256=GOOD_SHA, progress=False)
  assert _files(cache) == []


def test_unpinned_refused_before_any_request_then_allowed(server, cache):
  with pytest.raises(CheckpointError) as info:
    download_lib.download(server.url("good.bin"), sha256=None, progress=False)
  message = str(info.value)
  assert "no sha256" in message and "allow_unpinned=True" in message
  assert "--allow-unpinned" in message and "\n" not in message
  assert server.requests == [] and _files(cache) == []
  path = download_lib.download(server.url("good.bin"), sha256=None, allow_unpinned=True,
                               progress=False)
  assert path.read_bytes() == GOOD and server.requests == ["/good.bin"]
  # Once cached (or put there by hand) it is used without the flag and without a request.
  assert download_lib.download(server.url("good.bin"), sha256=None, progress=False) == path
  assert server.requests == ["/good.bin"]


def test_http_error_names_url_and_cache_path(server, cache):
  with pytest.raises(CheckpointError, match="404") as info:
    download_lib.download(server.url("missing.bin"), sha256=GOOD_SHA, progress=False)
  assert server.url("missing.bin") in str(info.value)
  assert str(cache / "missing.bin") in str(info.value)
  assert _files(cache) == []


def test_connection_refused_names_url_and_cache_path(cache):
  with socket.socket() as s:  # a port that nothing listens on once closed
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}/model.npz"
  with pytest.raises(CheckpointError) as info:
    download_lib.download(url, sha256=GOOD_SHA, progress=False, timeout=5)
  message = str(info.value)
  assert url in message and str(cache / "model.npz") in message and "\n" not in message
  assert _files(cache) == []
  # Put there by hand, the next call finds it.
  cache.mkdir(exist_ok=True)
  (cache / "model.npz").write_bytes(GOOD)
  assert download_lib.download(url, sha256=GOOD_SHA, progress=False) == cache / "model.npz"


def test_file_url(tmp_path, cache):
  source = tmp_path / "source" / "weights.npz"
  source.parent.mkdir()
  source.write_bytes(GOOD)
  path = download_lib.download(source.as_uri(), sha256=GOOD_SHA, progress=False)
  assert path == cache / "weights.npz" and path.read_bytes() == GOOD
  with pytest.raises(CheckpointError, match="put it at"):
    download_lib.download((tmp_path / "absent.npz").as_uri(), sha256=GOOD_SHA,
                          progress=False)


def test_bad_pins_and_names():
  with pytest.raises(ValueError, match="64 hex"):
    download_lib.download("https://example.invalid/a.npz", sha256="abc")
  with pytest.raises(ValueError, match="hex"):
    download_lib.download("https://example.invalid/a.npz", sha256=None,
                          sha256_prefix="xyz12345")
  with pytest.raises(CheckpointError, match="filename"):
    download_lib.cache_path("https://example.invalid/dir/")
  assert download_lib.url_filename("https://h/a/b%20c.pth?x=1") == "b c.pth"
