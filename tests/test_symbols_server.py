"""Symbol servers over loopback HTTP: plain file, CAB-compressed ``.pd_``, ``file.ptr``, redirects, 404s falling
through to the next entry, cache reuse (no second request), unreachable and failing servers, timeouts, and
mismatched downloads. Each server binds 127.0.0.1 on an ephemeral port in a thread, answers a bounded number
of requests, and stops itself after a deadline even if a test forgets to."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cabarchive
import numpy as np
import pyarrow as pa
import pytest

from pooltrace.datasetschema import MODULES_SCHEMA
from pooltrace.symbols import Symbolizer
from pooltrace.symbols import store as store_mod
from tests.conftest import ROOT

FX = ROOT / "tests" / "fixtures" / "symbols"
LAYOUT = json.loads((FX / "layout.json").read_text())
LEAKY, NT = LAYOUT["images"]["leaky.sys"], LAYOUT["images"]["ntoskrnl.exe"]
MAX_REQUESTS = 100
DEADLINE_S = 60
K = 0xFFFFF80412000000


class Server:
    """routes: path -> (status, body bytes, headers) or a callable(handler) for special behaviour."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.log: list[tuple[str, int, str]] = []  # (path, status, user agent)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                if len(server.log) >= MAX_REQUESTS:
                    self.send_error(503)
                    return
                route = server.routes.get(self.path, (404, b"not found", {}))
                try:
                    if callable(route):
                        route = route(self)
                        if route is None:  # the route answered by itself
                            server.log.append((self.path, 0, self.headers.get("User-Agent", "")))
                            return
                    status, body, headers = route
                    server.log.append((self.path, status, self.headers.get("User-Agent", "")))
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.watchdog = threading.Timer(DEADLINE_S, self.stop)
        self.watchdog.daemon = True
        self.watchdog.start()

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.log]

    def stop(self) -> None:
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(routes: dict) -> Server:
        s = Server(routes)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def ok(data: bytes) -> tuple:
    return (200, data, {"Content-Type": "application/octet-stream"})


def cab(data: bytes, name: str) -> bytes:
    arc = cabarchive.CabArchive()
    arc[name] = cabarchive.CabFile(data)
    return arc.save(compress=True)


def store_path(img: dict, leaf: str | None = None) -> str:
    return f"/{img['pdb_name']}/{img['pdb_key']}/{leaf or img['pdb_name']}"


def mods() -> pa.Table:
    rows = []
    for img, name, base in ((NT, "ntoskrnl.exe", K), (LEAKY, "leaky.sys", K + 0x2000000)):
        rows.append({"base": base, "size": img["size_of_image"], "name": name, "path": name, "pid": 0,
                     "timedatestamp": img["timedatestamp"], "checksum": 0, "pdb_name": img["pdb_name"],
                     "pdb_guid": img["guid"], "pdb_age": img["age"], "load_ns": None, "unload_ns": None})
    return pa.Table.from_pylist(rows, schema=MODULES_SCHEMA)


def resolve(tmp_path, symbol_path: str, *, table_cache: str = "tables", warnings: list | None = None):
    s = Symbolizer(mods(), symbol_path=symbol_path, cache_dir=tmp_path / table_cache, progress=False,
                   warn=(warnings if warnings is not None else []).append)
    got = s.lookup(np.array([0, 1]), np.array([0x108D, 0x1022], np.uint64))
    return got, {x["module"]: x for x in s.status()}


RESOLVED = [("ExAllocatePoolWithTag", 0x4D), ("AllocateLeakyBuffer", 0x22)]


def test_plain_and_compressed_then_cache_reuse(tmp_path, serve):
    srv = serve({store_path(LEAKY): ok((FX / "leaky.pdb").read_bytes()),
                 store_path(NT, "ntkrnlmp.pd_"): ok(cab((FX / "ntkrnlmp.pdb").read_bytes(), "ntkrnlmp.pdb"))})
    down = tmp_path / "down"
    got, st = resolve(tmp_path, f"srv*{down}*{srv.url}")
    assert got == RESOLVED
    assert st["leaky.sys"]["source"] == srv.url + store_path(LEAKY)
    assert st["ntoskrnl.exe"]["source"] == srv.url + store_path(NT, "ntkrnlmp.pd_")
    assert srv.paths() == [store_path(NT), store_path(NT, "ntkrnlmp.pd_"), store_path(LEAKY)]
    assert all(ua.startswith("Microsoft-Symbol-Server/") for _, _, ua in srv.log)
    # written atomically into the downstream store, uncompressed, in the layout WinDbg/WPA read
    for img, name in ((LEAKY, "leaky.pdb"), (NT, "ntkrnlmp.pdb")):
        assert (down / name / img["pdb_key"] / name).read_bytes() == (FX / name).read_bytes()
    assert not [p for p in down.rglob("*") if p.name.endswith(".tmp")]
    # second run, fresh table cache: the downstream store answers, no request
    n = len(srv.log)
    got, st = resolve(tmp_path, f"srv*{down}*{srv.url}", table_cache="tables2")
    assert got == RESOLVED and len(srv.log) == n
    assert st["leaky.sys"]["source"] == str(down / "leaky.pdb" / LEAKY["pdb_key"] / "leaky.pdb")
    # third run, same table cache: not even the downstream store is read
    got, st = resolve(tmp_path, f"srv*{down}*{srv.url}")
    assert got == RESOLVED and len(srv.log) == n and "cached table" in st["leaky.sys"]["detail"]


def test_file_ptr_redirect_and_404_fall_through(tmp_path, serve):
    elsewhere = tmp_path / "share"
    elsewhere.mkdir()
    shutil.copy(FX / "ntkrnlmp.pdb", elsewhere / "ntkrnlmp-public.pdb")
    empty = serve({})  # first entry: 404 for everything
    full = serve({
        store_path(NT, "file.ptr"): ok(f"PATH:{elsewhere / 'ntkrnlmp-public.pdb'}".encode()),
        "/download/symbols" + store_path(LEAKY): (302, b"", {"Location": "/blob/leaky-abc"}),
    })
    full.routes["/blob/leaky-abc"] = ok((FX / "leaky.pdb").read_bytes())
    cache = tmp_path / "cache"
    got, st = resolve(tmp_path, f"cache*{cache};srv*{empty.url};srv*{full.url}/download/symbols;srv*{full.url}")
    assert got == RESOLVED
    # every candidate asked of the empty server first, in symsrv's order
    assert empty.paths() == [store_path(NT), store_path(NT, "ntkrnlmp.pd_"), store_path(NT, "file.ptr"),
                             store_path(LEAKY), store_path(LEAKY, "leaky.pd_"), store_path(LEAKY, "file.ptr")]
    assert "/blob/leaky-abc" in full.paths()
    assert st["ntoskrnl.exe"]["source"] == f"{elsewhere / 'ntkrnlmp-public.pdb'} (via {full.url}" \
                                           f"{store_path(NT, 'file.ptr')})"
    assert (cache / "ntkrnlmp.pdb" / NT["pdb_key"] / "ntkrnlmp.pdb").exists()
    assert (cache / "leaky.pdb" / LEAKY["pdb_key"] / "leaky.pdb").exists()


def test_not_found_anywhere(tmp_path, serve):
    srv = serve({})
    got, st = resolve(tmp_path, f"srv*{tmp_path / 'down'}*{srv.url}")
    assert got == [None, None]
    assert st["leaky.sys"]["status"] == "not found" and len(srv.log) == 6
    assert not (tmp_path / "down").exists() or not any((tmp_path / "down").rglob("*.pdb"))


def test_unreachable_and_failing_servers_are_skipped(tmp_path, serve):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there: connection refused
    failing = serve({store_path(NT): (500, b"oops", {}), store_path(LEAKY): (500, b"oops", {})})
    good = serve({store_path(NT): ok((FX / "ntkrnlmp.pdb").read_bytes()),
                  store_path(LEAKY): ok((FX / "leaky.pdb").read_bytes())})
    warnings: list[str] = []
    got, _ = resolve(tmp_path, f"srv*{tmp_path / 'c'}*{dead};srv*{tmp_path / 'c'}*{failing.url};"
                               f"srv*{tmp_path / 'c'}*{good.url}", warnings=warnings)
    assert got == RESOLVED
    assert sum("unreachable" in w for w in warnings) == 1  # once per host, not asked again
    assert any("HTTP 500" in w for w in warnings)


def test_timeout(tmp_path, serve, monkeypatch):
    monkeypatch.setenv("POOLTRACE_SYMBOL_TIMEOUT", "0.3")

    def slow(handler):
        time.sleep(1.5)
        return ok((FX / "leaky.pdb").read_bytes())

    srv = serve({store_path(NT): slow})
    warnings: list[str] = []
    t0 = time.monotonic()
    got, st = resolve(tmp_path, f"srv*{tmp_path / 'c'}*{srv.url}", warnings=warnings)
    assert got == [None, None] and time.monotonic() - t0 < 5
    assert any("unreachable" in w and "timed out" in w for w in warnings)
    assert len(srv.log) <= 1  # the host is not asked again after it timed out


def test_mismatched_download_is_not_cached(tmp_path, serve):
    srv = serve({store_path(LEAKY): ok((FX / "ntkrnlmp.pdb").read_bytes())})  # wrong PDB at the right key
    warnings: list[str] = []
    got, st = resolve(tmp_path, f"srv*{tmp_path / 'down'}*{srv.url}", warnings=warnings)
    assert got == [None, None] and st["leaky.sys"]["status"] == "mismatch"
    assert not (tmp_path / "down" / "leaky.pdb").exists()
    assert any("does not match" in w for w in warnings)


def test_truncated_download_is_rejected(tmp_path, serve):
    data = (FX / "leaky.pdb").read_bytes()

    def short(handler):  # promises the whole file, sends half
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2])
        handler.close_connection = True
        return None

    srv = serve({store_path(LEAKY): short})
    warnings: list[str] = []
    got, st = resolve(tmp_path, f"srv*{tmp_path / 'down'}*{srv.url}", warnings=warnings)
    assert got[1] is None and not (tmp_path / "down" / "leaky.pdb").exists()
    assert any("failed (truncated download" in w for w in warnings)


def test_progress_bar_for_large_downloads(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(store_mod, "PROGRESS_MIN_BYTES", 1)
    monkeypatch.setenv("POOLTRACE_PROGRESS", "1")
    srv = serve({store_path(LEAKY): ok((FX / "leaky.pdb").read_bytes())})
    s = Symbolizer(mods(), symbol_path=f"srv*{tmp_path / 'd'}*{srv.url}", cache_dir=tmp_path / "t", progress=True)
    assert s.lookup(np.array([1]), np.array([0x1022], np.uint64)) == [("AllocateLeakyBuffer", 0x22)]


def test_offline_without_symbol_path(tmp_path, monkeypatch):
    monkeypatch.delenv("_NT_SYMBOL_PATH", raising=False)
    monkeypatch.delenv("_NT_ALT_SYMBOL_PATH", raising=False)

    def no_network(*a, **k):
        raise AssertionError("network access without a symbol path")

    monkeypatch.setattr(store_mod.Locator, "_download", no_network)
    s = Symbolizer(mods(), cache_dir=tmp_path / "t")
    assert s.lookup(np.array([0, 1]), np.array([0x108D, 0x1022], np.uint64)) == [None, None]
    assert not s.online and {x["status"] for x in s.status()} == {"not found"}
    assert "offline" in s.status()[0]["detail"]


def test_server_stops_itself(tmp_path):
    srv = Server({})
    srv.watchdog.cancel()
    srv.watchdog = threading.Timer(0.2, srv.stop)
    srv.watchdog.start()
    srv.thread.join(timeout=5)
    assert not srv.thread.is_alive()
    srv.httpd.server_close()


def test_symbol_store_paths_stay_inside(tmp_path, serve):
    # a hostile server cannot make a download land outside the downstream store: names are validated and
    # paths are built from the trace's (validated) name and key, never from the server's response
    srv = serve({store_path(LEAKY): (302, b"", {"Location": "file:///etc/passwd"})})
    got, _ = resolve(tmp_path, f"srv*{tmp_path / 'down'}*{srv.url}")
    assert got == [None, None]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == []
