"""Find a file by name and key in local directories and symbol stores (symsrv layout), over HTTP(S) too.

Store layout: ``<store>/<name>/<KEY>/<name>``; with ``<store>/index2.txt``, two-tier
``<store>/<first two chars of name>/<name>/<KEY>/<name>``. At each place symsrv's order is kept: the file,
then its CAB-compressed twin (``name.pd_``), then ``file.ptr`` (a text file holding ``PATH:<path>``, a bare
path, or ``MSG:<text>`` meaning "not available"). Local reads are case-insensitive per path component
(Linux caches are case-sensitive, stores written on Windows are not); writes use the canonical form
(uppercase key, the name as given).

Every candidate is validated by the caller (PDB GUID and age, or image TimeDateStamp and SizeOfImage)
before it is used or cached: a mismatched file is reported and the search goes on. A file found in a
store, or downloaded, is copied into every local store left of it (downstream caches) atomically: written
to a temporary file in the target directory, then renamed, so WinDbg or WPA sharing the cache never see a
partial file. A 404 (or a missing local file) falls through to the next candidate; a server that cannot be
reached is skipped for the rest of the run. Misses are remembered for the run.

Names reaching this module have been reduced to safe plain file names (names.safe_file_name) and keys
checked to be hex; every path built here is also checked to stay inside its root.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pooltrace.symbols.names import compressed_name, inside, safe_file_name, valid_key
from pooltrace.symbols.symbolpath import Entry, Store

USER_AGENT = "Microsoft-Symbol-Server/10.0.0.0"
DEFAULT_TIMEOUT = 30.0
MAX_DOWNLOAD = 4 << 30
MAX_PTR = 64 << 10
CHUNK = 1 << 20
PROGRESS_MIN_BYTES = 4 << 20
MAX_REDIRECTS = 8

Validator = Callable[[Path], "tuple[str, object]"]  # ("ok", payload) | ("mismatch", detail) | ("bad", detail)


@dataclass
class Found:
    status: str  # "found" | "not found" | "mismatch"
    path: Path | None = None
    source: str | None = None  # where it was found: a path or a URL
    payload: object = None
    detail: str = ""
    mismatches: list[str] = field(default_factory=list)


class CabError(OSError):
    pass


def expand_cab(src: Path, dest: Path) -> None:
    """Decompress a single-file cabinet (a ``.pd_``) into `dest`: cabarchive (MSZIP, pure Python), else
    ``cabextract`` (LZX, Quantum), else Windows' ``expand``. The member's name inside the cabinet is never
    used as a path."""
    data = src.read_bytes()
    why = ""
    try:
        import cabarchive
    except ImportError:
        cabarchive = None
        why = "the cabarchive package is not installed"
    if cabarchive is not None:
        try:
            arc = cabarchive.CabArchive(data)
            members = list(arc.values())
            if len(members) != 1:
                raise CabError(f"{src.name}: expected one file in the cabinet, found {len(members)}")
            dest.write_bytes(members[0].buf or b"")
            return
        except cabarchive.NotSupportedError as exc:
            why = str(exc)
        except cabarchive.CorruptionError as exc:
            raise CabError(f"{src.name}: corrupt cabinet: {exc}") from None
    tool = shutil.which("cabextract")
    if tool:
        with open(dest, "wb") as out:
            r = subprocess.run([tool, "-q", "-p", str(src)], stdout=out, stderr=subprocess.PIPE, timeout=600)
        if r.returncode != 0 or dest.stat().st_size == 0:
            raise CabError(f"{src.name}: cabextract failed: {r.stderr.decode(errors='replace').strip()}")
        return
    tool = shutil.which("expand") if sys.platform == "win32" else None
    if tool:
        r = subprocess.run([tool, str(src), str(dest)], capture_output=True, timeout=600)
        if r.returncode != 0 or not dest.exists():
            raise CabError(f"{src.name}: expand failed: {r.stdout.decode(errors='replace').strip()}")
        return
    raise CabError(f"cannot decompress {src.name} ({why or 'unsupported cabinet'}): install cabextract "
                   "(Linux: apt-get install cabextract; macOS: brew install cabextract) or run on Windows, "
                   "whose expand.exe reads every cabinet")


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Locator:
    """Searches `local_dirs` (plain directories, each also a store, and ``<dir>/symbols`` as a store), then
    the symbol path entries, for one file at a time."""

    def __init__(self, entries: list[Entry], local_dirs: list[Path] = (), *, warn: Callable[[str], None],
                 progress: bool = True, timeout: float | None = None):
        self.entries = list(entries)
        self.local_dirs = [Path(d) for d in local_dirs]
        # directories that travel with a trace (its own folder, the dataset): their symlinks may not lead out
        # and their file.ptr files are not followed (a pointer to \\host\share would make Windows authenticate)
        self._untrusted = {str(d) for d in self.local_dirs} | {str(d / "symbols") for d in self.local_dirs}
        self.warn = warn
        self.progress = progress
        if timeout is None:
            try:
                timeout = float(os.environ.get("POOLTRACE_SYMBOL_TIMEOUT") or DEFAULT_TIMEOUT)
            except ValueError:
                timeout = DEFAULT_TIMEOUT
        self.timeout = timeout
        self.requests: list[str] = []  # every HTTP GET, in order (for diagnostics and tests)
        self._missing: set[str] = set()
        self._dead_hosts: set[str] = set()
        self._warned: set[str] = set()
        self._listing: dict[str, dict[str, str]] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._serial = 0
        self._opener = urllib.request.build_opener(_Redirects())

    # -- public ---------------------------------------------------------------------------------------
    def find(self, name: str, key: str, validate: Validator, *, kind: str = "pdb") -> Found:
        """Search every place in order for `name` with `key`; `kind` ("pdb" or the image's extension) picks
        the plain-directory sub folder (``dir/pdb/name``, ``dir/symbols/sys/name``)."""
        if safe_file_name(name) != name or not valid_key(key):
            return Found("not found", detail=f"unsafe name {name!r}")
        key = key.upper()
        result = Found("not found")
        places = 0
        for where in self._plan():
            places += 1
            hit = self._search(where, name, key, validate, kind, result)
            if hit is not None:
                return hit
        if result.mismatches:
            result.status = "mismatch"
            result.detail = "; ".join(result.mismatches)
        else:
            result.detail = f"not in {places} place(s) searched"
        return result

    # -- planning -------------------------------------------------------------------------------------
    def _plan(self):
        for d in self.local_dirs:
            yield Entry("dir", path=str(d))
            yield Entry("srv", stores=[Store(str(d / "symbols"))])
        yield from self.entries

    def _search(self, where: Entry, name: str, key: str, validate: Validator, kind: str,
                result: Found) -> Found | None:
        if where.kind == "dir":
            root = Path(where.path)
            for parts in ([name], [kind, name], ["symbols", kind, name]):
                p = self._ci(root, parts)
                if p is not None:
                    hit = self._try_local(p, str(p), name, key, validate, result, [])
                    if hit:
                        return hit
            return self._search_store_chain([Store(where.path)], name, key, validate, result)
        return self._search_store_chain(where.stores, name, key, validate, result)

    def _search_store_chain(self, stores: list[Store], name, key, validate, result) -> Found | None:
        for k, store in enumerate(stores):
            downstream = [s for s in stores[:k] if not s.is_url]
            if store.is_url:
                hit = self._search_http(store.location, name, key, validate, result, downstream)
            else:
                hit = self._search_local_store(Path(store.location), name, key, validate, result, downstream)
            if hit is not None:
                return hit
        return None

    # -- local stores ---------------------------------------------------------------------------------
    def _store_parts(self, root: Path, name: str, key: str, leaf: str) -> list[str]:
        parts = [name, key, leaf]
        if self._ci(root, ["index2.txt"]) is not None:
            parts.insert(0, name[:2])
        return parts

    def _search_local_store(self, root: Path, name, key, validate, result, downstream) -> Found | None:
        memo = f"{root}|{name}|{key}"
        if memo in self._missing or not root.is_dir():
            return None
        p = self._ci(root, self._store_parts(root, name, key, name))
        if p is not None:
            hit = self._try_local(p, str(p), name, key, validate, result, downstream)
            if hit:
                return hit
        p = self._ci(root, self._store_parts(root, name, key, compressed_name(name)))
        if p is not None:
            hit = self._try_compressed(p, str(p), name, key, validate, result, downstream)
            if hit:
                return hit
        p = None if str(root) in self._untrusted else self._ci(root, self._store_parts(root, name, key, "file.ptr"))
        if p is not None:
            try:
                text = p.read_bytes()[:MAX_PTR].decode("utf-8", "replace")
            except OSError:
                text = ""
            hit = self._follow_ptr(text, str(p), name, key, validate, result, downstream)
            if hit:
                return hit
        self._missing.add(memo)
        return None

    def _ci(self, root: Path, parts: list[str]) -> Path | None:
        """root/parts..., matching each component case-insensitively; None if absent or outside root."""
        cur = root
        for part in parts:
            exact = cur / part
            if exact.exists():
                cur = exact
                continue
            listing = self._listing.get(str(cur))
            if listing is None:
                try:
                    listing = {n.casefold(): n for n in os.listdir(cur)}
                except OSError:
                    listing = {}
                self._listing[str(cur)] = listing
            real = listing.get(part.casefold())
            if real is None:
                return None
            cur = cur / real
        if not inside(root, cur):
            return None
        if str(root) in self._untrusted and not inside(os.path.realpath(root), os.path.realpath(cur)):
            return None  # a symlink out of a directory that came with the trace
        return cur

    def _try_local(self, path: Path, source: str, name, key, validate, result, downstream) -> Found | None:
        if not path.is_file():
            return None
        status, payload = validate(path)
        if status != "ok":
            self._reject(result, source, status, payload)
            return None
        final = self._install(path, downstream, name, key) or path
        return Found("found", final, source, payload)

    def _try_compressed(self, path: Path, source: str, name, key, validate, result, downstream) -> Found | None:
        out = self._tmpname(name)
        try:
            expand_cab(path, out)
        except (CabError, OSError, subprocess.SubprocessError) as exc:
            self._warn_once(f"cab:{source}", f"symbols: {exc}")
            return None
        return self._validated_temp(out, source, name, key, validate, result, downstream)

    def _validated_temp(self, tmp: Path, source: str, name, key, validate, result, downstream) -> Found | None:
        status, payload = validate(tmp)
        if status != "ok":
            self._reject(result, source, status, payload)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        final = self._install(tmp, downstream, name, key)
        if final is None:  # nowhere to cache it: keep the temporary copy for this run
            final = tmp
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return Found("found", final, source, payload)

    def _follow_ptr(self, text: str, source: str, name, key, validate, result, downstream) -> Found | None:
        line = text.strip().splitlines()[0].strip() if text.strip() else ""
        if line.upper().startswith("MSG:"):
            self._warn_once(f"msg:{source}", f"symbols: {source}: {line[4:].strip()}")
            return None
        if line.upper().startswith("PATH:"):
            line = line[5:].strip()
        if not line:
            return None
        if Store(line).is_url:
            tmp = self._download(line)
            if tmp is None:
                return None
            if line.endswith("_"):
                return self._validated_cab(tmp, line, name, key, validate, result, downstream)
            return self._validated_temp(tmp, line, name, key, validate, result, downstream)
        target = Path(line)
        if not target.is_file():
            return None
        if line.endswith("_"):
            return self._try_compressed(target, f"{line} (via {source})", name, key, validate, result, downstream)
        return self._try_local(target, f"{line} (via {source})", name, key, validate, result, downstream)

    def _validated_cab(self, tmp: Path, source: str, name, key, validate, result, downstream) -> Found | None:
        out = tmp.with_name(tmp.name + ".x")
        try:
            expand_cab(tmp, out)
        except (CabError, OSError, subprocess.SubprocessError) as exc:
            self._warn_once(f"cab:{source}", f"symbols: {exc}")
            return None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return self._validated_temp(out, source, name, key, validate, result, downstream)

    # -- HTTP -----------------------------------------------------------------------------------------
    def _search_http(self, base: str, name, key, validate, result, downstream) -> Found | None:
        base = base.rstrip("/")
        quoted = [urllib.parse.quote(x) for x in (name, key)]
        url = f"{base}/{quoted[0]}/{quoted[1]}/"
        tmp = self._download(url + urllib.parse.quote(name))
        if tmp is not None:
            return self._validated_temp(tmp, url + name, name, key, validate, result, downstream)
        cname = compressed_name(name)
        tmp = self._download(url + urllib.parse.quote(cname))
        if tmp is not None:
            return self._validated_cab(tmp, url + cname, name, key, validate, result, downstream)
        tmp = self._download(url + "file.ptr", limit=MAX_PTR)
        if tmp is not None:
            text = tmp.read_bytes().decode("utf-8", "replace")
            with contextlib.suppress(OSError):
                tmp.unlink()
            return self._follow_ptr(text, url + "file.ptr", name, key, validate, result, downstream)
        return None

    def _download(self, url: str, limit: int = MAX_DOWNLOAD) -> Path | None:
        """GET `url` into a temporary file; None on 404 (remembered) or any failure (warned once)."""
        host = urllib.parse.urlsplit(url).netloc.lower()
        if url in self._missing or host in self._dead_hosts:
            return None
        self.requests.append(url)
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        dest = self._tmpname("download")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                total = resp.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                if total is not None and total > limit:
                    self._warn_once(f"big:{url}", f"symbols: {url}: {total:,} bytes is too large; skipped")
                    return None
                got = self._stream(resp, dest, total, limit, url)
            if total is not None and got != total:
                raise OSError(f"truncated download ({got:,} of {total:,} bytes)")
            return dest
        except urllib.error.HTTPError as exc:
            self._missing.add(url)
            if exc.code not in (404, 410):
                self._warn_once(f"http{exc.code}:{host}", f"symbols: {url}: HTTP {exc.code} {exc.reason}")
            return None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", None) or exc
            self._dead_hosts.add(host)
            self._warn_once(f"dead:{host}", f"symbols: {host} unreachable ({reason}); not asked again this run")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self._missing.add(url)
            self._warn_once(f"failed:{url}", f"symbols: download of {url} failed ({exc})")
        with contextlib.suppress(OSError):
            dest.unlink()
        return None

    def _stream(self, resp, dest: Path, total: int | None, limit: int, url: str) -> int:
        got = 0
        bar = None
        if self.progress and (total or 0) >= PROGRESS_MIN_BYTES and (sys.stderr.isatty()
                                                                      or os.environ.get("POOLTRACE_PROGRESS")):
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            bar = Progress(TextColumn(f"downloading {url.rsplit('/', 1)[-1]}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), console=Console(stderr=True), transient=True)
        with open(dest, "wb") as out, (bar or contextlib.nullcontext()):
            task = bar.add_task("dl", total=total) if bar else None
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                if got > limit:
                    raise OSError(f"more than {limit:,} bytes")
                out.write(chunk)
                if bar:
                    bar.update(task, completed=got)
        return got

    # -- caching --------------------------------------------------------------------------------------
    def _install(self, src: Path, downstream: list[Store], name: str, key: str) -> Path | None:
        """Copy `src` into each downstream store (atomically); the bottom-most copy's path."""
        first: Path | None = None
        for store in downstream:
            root = Path(store.location)
            dest = root.joinpath(*self._store_parts(root, name, key, name)) if root.exists() else \
                root.joinpath(name, key, name)
            if not inside(root, dest):
                continue
            try:
                if dest.exists() and dest.samefile(src):
                    first = first or dest
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=dest.parent)
                try:
                    with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                        shutil.copyfileobj(inp, out, CHUNK)
                    os.replace(tmp, dest)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                self._listing.clear()
                self._missing.discard(f"{root}|{name}|{key}")
                first = first or dest
            except OSError as exc:
                self._warn_once(f"write:{root}", f"symbols: cannot write into the cache {root}: {exc}")
        return first

    # -- helpers --------------------------------------------------------------------------------------
    def _tmpname(self, stem: str) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pooltrace-symbols-")
        self._serial += 1
        return Path(self._tmp.name) / f"{self._serial}-{stem}"

    def _reject(self, result: Found, source: str, status: str, detail) -> None:
        if status == "mismatch":
            result.mismatches.append(f"{source}: {detail}")
            self._warn_once(f"mismatch:{source}", f"symbols: {source} does not match the trace ({detail}); "
                                                  "not used")
        else:
            self._warn_once(f"bad:{source}", f"symbols: {source}: {detail}; not used")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)
