"""Shard claims: at most one live writer computes a shard of an entry, on any filesystem or bucket.

    claims = Claims(location, ttl=60)
    with claims.heartbeat():
        c = claims.acquire("features/ab12", shard=3)   # None: a live writer holds it
        ... compute, check claims.held(c), write the chunk, check again, write the record ...
        claims.release(c)

A claim is a small JSON file `<entry>/claims/<shard>.<generation>.json` made with the location's
atomic create-if-absent (`link(2)` on a filesystem, a conditional PUT on S3); `flock` is not
used because NFS may ignore it. Its holder rewrites it every ttl/4 with a new expiry. A claim is
dead when its expiry has passed, or at once when its holder ran on this machine and that process
no longer exists (a killed dask worker's shard is retried without waiting). A dead claim is taken
over by creating the NEXT generation, which again only one writer can do. The highest generation
is the owner: a writer that finds a higher one (it stalled past its expiry) has lost the shard and
must not commit. Expiry compares the holder's clock with the reader's, so machines sharing a
store need clocks that agree to well within the ttl (NTP does).

Claims only prevent duplicate work and interleaved writes; correctness does not rest on them:
every computation is deterministic and its record, written after its data, is the commit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.location import Location

DEFAULT_TTL = 60.0


def claim_ttl() -> float:
    return float(os.environ.get("VERMOUTH_CLAIM_TTL", DEFAULT_TTL))


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_gone(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, owned by someone else
    return start is not None and _start_time(pid) not in (None, start)


@dataclass(frozen=True)
class Claim:
    entry: str  # the entry's prefix in the store, "kind/key"
    shard: int
    generation: int

    @property
    def key(self) -> str:
        return f"{self.entry}/claims/{self.shard:06d}.{self.generation}.json"


class Claims:
    """This process's claims on one store; thread-safe."""

    def __init__(self, loc: Location, ttl: float | None = None):
        self.loc = loc
        self.ttl = float(ttl if ttl is not None else claim_ttl())
        self.owner = uuid.uuid4().hex
        self.host, self.boot, self.pid = socket.gethostname(), _boot_id(), os.getpid()
        self.pid_start = _start_time(self.pid)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._held: set[Claim] = set()
        self._expires: dict[Claim, float] = {}  # the expiry we last wrote into each claim
        self._lost: set[Claim] = set()
        self._lock = threading.Lock()

    def _body(self) -> dict:
        return {"owner": self.owner, "host": self.host, "boot_id": self.boot, "pid": self.pid,
                "pid_start": self.pid_start, "expires": time.time() + self.ttl, "ttl": self.ttl}

    def _generations(self, entry: str, shard: int) -> list[int]:
        head = f"{shard:06d}."
        gens = []
        for name in self.loc.list(f"{entry}/claims"):
            if name.startswith(head) and name.endswith(".json"):
                try:
                    gens.append(int(name[len(head):-len(".json")]))
                except ValueError:
                    continue
        return sorted(gens)

    def alive(self, body: dict) -> bool:
        expires = body.get("expires") if isinstance(body, dict) else None
        if isinstance(expires, bool) or not isinstance(expires, (int, float)) or expires <= time.time():
            return False  # expired, or damaged: a claim that cannot be read protects nothing
        same_machine = body.get("host") == self.host and body.get("boot_id") == self.boot and self.boot
        if same_machine and body.get("owner") != self.owner and isinstance(body.get("pid"), int):
            return not _process_gone(body["pid"], body.get("pid_start"))
        return True

    def holder(self, entry: str, shard: int) -> dict | None:
        """The live claim on (entry, shard), or None."""
        gens = self._generations(entry, shard)
        if not gens:
            return None
        try:
            body = self.loc.read_json(Claim(entry, shard, gens[-1]).key)
        except FileNotFoundError:
            return None
        return body if self.alive(body) else None

    def acquire(self, entry: str, shard: int) -> Claim | None:
        """Claim (entry, shard), taking over a dead claim; None when a live writer holds it."""
        gens = self._generations(entry, shard)
        if gens:
            top = Claim(entry, shard, gens[-1])
            try:
                body = self.loc.read_json(top.key)
            except FileNotFoundError:  # released between the listing and the read: take the next one
                body = None
            except VermouthError:  # unreadable (damaged by hand): no live writer can be renewing it
                body = None
            if body is not None and self.alive(body):
                return None
            claim = Claim(entry, shard, gens[-1] + 1)
        else:
            claim = Claim(entry, shard, 0)
        body = self._body()
        body_expires = body["expires"]
        if not self.loc.create_json(claim.key, body):
            return None  # another writer made this generation first
        with self._lock:
            self._held.add(claim)
            self._expires[claim] = body_expires
        return claim

    def held(self, claim: Claim) -> bool:
        """Still ours: not lost to a takeover (a higher generation, or our generation made anew).

        Called before every chunk and record write, so it answers without I/O while the claim is
        far from its expiry: no writer may take a claim over before it expires (clocks agreeing to
        within ttl/2), so only a holder that stalled needs to look."""
        with self._lock:
            if claim in self._lost or claim not in self._held:
                return False
            if time.time() < self._expires.get(claim, 0.0) - self.ttl / 2:
                return True
        return self._owned(claim)

    def _owned(self, claim: Claim) -> bool:
        """The full check, on the store: the highest generation is ours, by owner id."""
        with self._lock:
            if claim in self._lost or claim not in self._held:
                return False
        gens = self._generations(claim.entry, claim.shard)
        owner = None
        if gens and gens[-1] == claim.generation:
            try:  # the same generation may have been released and created anew by another writer
                owner = self.loc.read_json(claim.key).get("owner")
            except (FileNotFoundError, VermouthError):
                owner = None
        if owner != self.owner:
            with self._lock:
                self._lost.add(claim)
            return False
        return True

    def renew(self) -> None:
        with self._lock:
            mine = list(self._held - self._lost)
        for claim in mine:
            if self._owned(claim):
                body = self._body()
                self.loc.write_json(claim.key, body)
                with self._lock:
                    self._expires[claim] = body["expires"]

    def release(self, claim: Claim) -> None:
        """Drop the claim and the dead generations below it (the shard is committed or abandoned)."""
        with self._lock:
            self._held.discard(claim)
            self._expires.pop(claim, None)
            lost = claim in self._lost
            self._lost.discard(claim)
        if lost:
            return  # its files now belong to the writer that took over
        for g in self._generations(claim.entry, claim.shard):
            if g <= claim.generation:
                self.loc.delete(Claim(claim.entry, claim.shard, g).key)

    def remove_dead(self, entry: str) -> int:
        """Delete the claim files of `entry` whose holder is dead (e.g. killed after its last commit,
        before releasing); a live claim is never touched. Returns how many went."""
        n = 0
        for name in self.loc.list(f"{entry}/claims"):
            key = f"{entry}/claims/{name}"
            try:
                body = self.loc.read_json(key)
            except FileNotFoundError:
                continue
            except Exception:  # noqa: BLE001 - a half-written claim of a killed writer: it is dead too
                body = {}
            if not self.alive(body):
                self.loc.delete(key)
                n += 1
        return n

    def release_all(self) -> None:
        with self._lock:
            mine = list(self._held)
        for claim in mine:
            self.release(claim)

    def start(self) -> None:
        """Renew every held claim every ttl/4 from a background thread, until `stop`."""
        if self._thread is not None:
            return
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(self.ttl / 4):
                try:
                    self.renew()
                except Exception:  # noqa: BLE001 - a failed renewal shows up as a lost claim later
                    pass

        self._thread = threading.Thread(target=beat, name="vermouth-claims", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @contextlib.contextmanager
    def heartbeat(self):
        """Renewals while the block runs; what is still held is released after it."""
        self.start()
        try:
            yield self
        except BaseException:
            self.stop()
            with contextlib.suppress(Exception):  # best effort: the error that stopped the work is the one to see
                self.release_all()
            raise
        self.stop()
        self.release_all()
