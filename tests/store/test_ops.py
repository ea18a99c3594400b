"""Operations: files a team can read (the umask, not mkstemp's 0600, decides their mode) and logs
that stay small and readable when piped to a file (progress bars only on a terminal, --quiet,
--verbose)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import grid
from vermouth_cache.core.atomic import atomic_create, atomic_write, atomic_write_json
from vermouth_cache.store.export import export_h5
from vermouth_cache.extract.run import extract
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.store.entries import Store
from vermouth_cache.sweep.report import write_report
from vermouth_cache.data.synthetic import make_classification
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.tasks.fewshot import FewshotData, train_fewshot
from vermouth_cache.train.tasks import task_settings


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every file below `root`, by relative path."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def umask():
    saved = os.umask(0o022)
    os.umask(saved)

    def set_to(value: int) -> None:
        os.umask(value)

    yield set_to
    os.umask(saved)


# ---- 11: files for a team -------------------------------------------------------------------------

@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_written_honours_the_umask(umask, tiny, tmp_path, mask, expected):
    umask(mask)
    split = make_classification(tmp_path / "cls", n_classes=2, per_class=(3, 1, 1), size=64)
    store = tmp_path / "store"
    base = ExtractRequest(dataset=str(split), store=str(store), sd_model=str(tiny["sd"]), captioner=str(tiny["blip"]),
                          resolution=64, t=(10,), stages="mid,up", device="cpu", shard_size=4, progress=False)
    for part in ("train", "val", "test"):
        rep = extract(base.with_(split=part))
    (tmp_path / "export").mkdir()  # export refuses a missing directory
    export_h5(Store(store), tmp_path / "export" / "feats.h5", entry_key=rep.entries["features t=10"])
    s = task_settings("fewshot", t=10, resolution=64, stages="mid,up", attn_maps="none", expert="none", epochs=2,
                      batch_size=4)
    train_fewshot(FewshotData(str(split), shots=3), s, RunOptions(store=str(store), out=str(tmp_path / "run"),
                                                         clip_model=str(tiny["clip"]), device="cpu", progress=False))
    write_report(grid(), tmp_path / "report", title="grid")
    for folder, must in (("store", {"vermouth-store.json"}), ("export", {"feats.h5"}),
                         ("run", {"config.json", "metrics.json", "head.safetensors", "curve.png"}),
                         ("report", {"results.csv"})):
        found = modes(tmp_path / folder)
        assert must <= {Path(k).name for k in found}, (folder, sorted(found))
        # the store's JSON, Zarr metadata and chunks, shard records; the run; the export; the report
        wrong = {k: oct(v) for k, v in found.items() if v != expected}
        assert not wrong, (folder, oct(expected), wrong)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_atomic_helpers_keep_the_old_file_on_failure_and_create_only_once(umask, tmp_path):
    umask(0o027)
    target = tmp_path / "a" / "x.json"
    atomic_write_json(target, {"v": 1})
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_text() == '{\n "v": 1\n}'

    def failing(path):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, write=failing)
    assert target.read_text() == '{\n "v": 1\n}' and sorted(p.name for p in target.parent.iterdir()) == ["x.json"]
    assert atomic_create(tmp_path / "a" / "c", b"1") and not atomic_create(tmp_path / "a" / "c", b"2")
    assert (tmp_path / "a" / "c").read_bytes() == b"1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["c", "x.json"]


# ---- 12: logs ---------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
STAGE_LINE = r"^{}: {}/{} {}, \d+\.\d s"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("COLUMNS", None)
    return env


def test_demo_piped_to_a_file_logs_one_line_per_stage_and_team_readable_files(tmp_path):
    """The README's main job with stdout and stderr to a file (not a terminal), umask 002: a few
    lines, no carriage return, one per stage; every file it writes is 0664. Then --quiet: nothing
    but the result."""
    import re
    import subprocess

    out = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "vermouth_cache.cli", "demo", "--out", str(out)], stdout=f,
                              stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path, umask=0o002, timeout=1200)
    text = log.read_bytes()
    assert proc.returncode == 0, text.decode()[-3000:]
    assert b"\r" not in text and len(text) < 6000, (len(text), text[:3000])
    lines = text.decode().splitlines()
    for split, n in (("train", 24), ("val", 6), ("test", 6)):
        stage = [ln for ln in lines if ln.startswith(f"extract Demo/{split}:")]
        done = [ln for ln in stage if re.match(STAGE_LINE.format(f"extract Demo/{split}", n, n, "img"), ln)]
        assert len(done) == 1 and stage[-1] == done[0], lines  # before it, at most one line a minute
    done = [ln for ln in lines if re.match(r"^train fewshot Demo: 50 epoch\(s\), 150/150 steps, loss \d\.\d+, "
                                           r"best val top1 \d\.\d+ at step \d+, \d+\.\d s$", ln)]
    assert len(done) == 1, lines
    assert any(ln.startswith("few-shot U-head trained from the cache") for ln in lines)
    assert not [ln for ln in lines if "debug:" in ln or "Traceback" in ln]
    # the README's main job writes files the team can read: the umask decides, nothing is 0600
    wrong = {k: oct(v) for k, v in modes(out).items() if v != 0o664}
    assert not wrong, wrong

    quiet = subprocess.run([sys.executable, "-m", "vermouth_cache.cli", "demo", "--out", str(out), "--quiet"],
                           capture_output=True, env=_env(), cwd=tmp_path, timeout=1200)
    assert quiet.returncode == 0 and quiet.stderr == b"", quiet.stderr.decode()[-3000:]
    assert quiet.stdout.decode().splitlines()[0].startswith("kind ") and b"few-shot U-head trained" in quiet.stdout


def test_quiet_and_verbose_on_the_command_line(monkeypatch, capsys, tiny, folder, tmp_path):
    from conftest import cli

    args = ["extract", folder, "--store", tmp_path / "store", "--sd-model", tiny["sd"], "--captioner", tiny["blip"],
            "--resolution", "128", "--device", "cpu", "--shard-size", "2", "--stages", "mid"]
    code, out, err = cli(monkeypatch, capsys, *args, "--t", "100")
    assert code == 0 and "computed:" in out
    assert err.splitlines() == [next(ln for ln in err.splitlines() if ln.startswith("extract imgs: 5/5 img, "))], err
    code, out, err = cli(monkeypatch, capsys, *args, "--t", "200", "--quiet")  # computes, says nothing
    assert code == 0 and "features t=200" in out and err == ""
    code, out, err = cli(monkeypatch, capsys, "--quiet", *args, "--t", "300")  # the group's option too
    assert code == 0 and "features t=300" in out and err == ""
    code, out, err = cli(monkeypatch, capsys, *args, "--t", "400", "-v")
    assert code == 0 and any(ln.startswith("debug: store ") and "3 to compute" in ln for ln in err.splitlines()), err
    assert "extract imgs: 5/5 img" in err
    code, _, err = cli(monkeypatch, capsys, *args, "--quiet", "--verbose")
    assert code == 2 and "give --quiet or --verbose, not both" in err
    for command in (["ls"], ["export"], ["verify"], ["repair"], ["gc"], ["demo"], ["sweep"], ["models", "tiny"],
                    ["train", "fewshot"], ["train", "seg"], ["extract"]):
        code, out, _ = cli(monkeypatch, capsys, *command, "--help")
        assert code == 0 and "--quiet" in out and "--verbose" in out, command


def _drain(fd: int) -> str:
    """Everything written to a pty so far: one os.read returns only what one chunk delivered."""
    import select

    out = b""
    while select.select([fd], [], [], 0.5)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # Linux: EIO once the slave side has no more data and is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    return out.decode()


def test_bars_only_on_a_terminal(tmp_path, monkeypatch):
    """A pseudo-terminal gets a live bar ('\\r' redraws); a file gets one line at the end."""
    import io
    import logging
    import pty

    from vermouth_cache.core.progress import Progress, configure_logging

    import fcntl
    import re
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    term = io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stderr", term)
    configure_logging(logging.INFO)
    with Progress("extract imgs", total=4, unit="img") as bar:
        for _ in range(4):
            bar.update()
    seen = _drain(master)
    assert re.search("\r(?!\n)", seen) and "| 0/4 [" in seen and "img/s" in seen, seen  # tqdm's live bar, redrawn
    assert "extract imgs: 4/4 img, " in seen  # and the stage's line when it ends

    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with Progress("extract imgs", total=4, unit="img", every=0.0) as bar:
        for _ in range(4):
            bar.update()
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and lines[-1].startswith("extract imgs: 4/4 img, ")
    assert len(lines) == 4  # every=0: one line per step while running (1/4 ... 3/4), then the end

    plain.seek(0), plain.truncate()
    configure_logging(logging.WARNING)  # --quiet
    with pytest.raises(RuntimeError):
        with Progress("extract imgs", total=4, unit="img") as bar:
            raise RuntimeError("boom")
    with Progress("verify", total=1, unit="entry") as bar:
        bar.update()
    assert plain.getvalue() == ""


def test_training_reports_its_steps_so_a_sweep_bar_moves_within_a_point():
    """fit_many reports every step to the work sink the sweep's dask task installs."""
    import torch

    from vermouth_cache.core.progress import report_work, work_sink
    from vermouth_cache.train.loop import Member, fit_many

    class Loader:
        progress = None

        def __len__(self):
            return 3

        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            for i in range(3):
                yield {"x": torch.full((2, 4), float(i)), "y": torch.zeros(2, 1)}

    model = torch.nn.Linear(4, 1)
    loss = lambda b: torch.nn.functional.mse_loss(model(b["x"]), b["y"])  # noqa: E731
    s = task_settings("fewshot", epochs=4, lr=1e-3)
    seen = []
    with work_sink(seen.append):
        fit_many([Member(model, list(model.parameters()), loss, s)], Loader(), s)
    assert seen == [k / 12 for k in range(1, 13)]
    report_work(1, 2)  # no sink installed: nothing happens
    assert len(seen) == 12


def test_sweep_progress_events_travel_from_a_dask_task_to_the_client():
    import threading
    import time

    from distributed import Client, LocalCluster

    from vermouth_cache.core.progress import report_work, work_sink
    from vermouth_cache.sweep.run import PROGRESS_TOPIC, _progress_events

    def task(index):
        with work_sink(_progress_events(index)):
            for k in range(1, 5):
                report_work(k, 4)
                time.sleep(0.3)
        return index

    got, arrived = [], threading.Event()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def handler(event):
            got.append(event[1])
            if event[1]["done"] >= 1.0:
                arrived.set()
        client.subscribe_topic(PROGRESS_TOPIC, handler)
        assert client.submit(task, 3).result() == 3
        assert arrived.wait(10)
    assert [m["job"] for m in got] == [3] * len(got) and len(got) >= 3
    fractions = [m["done"] for m in got]
    assert fractions == sorted(fractions) and fractions[0] < 1.0 and fractions[-1] == 1.0


# ---- 10 (S3): remote errors are one line naming the store and what failed ------------------------

import test_remote  # noqa: E402
from test_remote import CREDENTIALS, _free_port, _objects  # noqa: E402

s3_server = test_remote.s3_server  # the moto server fixture, used here too

SHORT = json.dumps({"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}})


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", ["unreachable", "no credentials", "unknown option", "malformed options"])
def test_s3_setup_errors_are_one_line(monkeypatch, capsys, case):
    from conftest import cli

    port = _free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("VERMOUTH_STORAGE_OPTIONS", SHORT)
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    if case == "no credentials":
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if case == "unknown option":
        monkeypatch.setenv("VERMOUTH_STORAGE_OPTIONS", json.dumps({"endpoint": "http://127.0.0.1:1"}))
    if case == "malformed options":
        monkeypatch.setenv("VERMOUTH_STORAGE_OPTIONS", "{endpoint_url: http://127.0.0.1:1}")
    code, _, err = cli(monkeypatch, capsys, "ls", "s3://vc-bucket/cache")
    line = _one_error_line(err)
    assert code == 1 and "s3://vc-bucket/cache" in line, line
    expected = {
        "unreachable": f"cannot reach s3://vc-bucket/cache (endpoint http://127.0.0.1:{port} refused the connection, "
                       "reading vermouth-store.json)",
        "no credentials": "no credentials for s3://vc-bucket/cache (reading vermouth-store.json): set AWS_ACCESS_KEY_ID",
        "unknown option": "unknown storage option 'endpoint' in VERMOUTH_STORAGE_OPTIONS",
        "malformed options": "VERMOUTH_STORAGE_OPTIONS is not JSON",
    }[case]
    assert expected in line, line


class CuttableProxy:
    """A TCP proxy on loopback in front of the S3 server that drops dead (closes its port and every
    connection) when the S3 client sends its `cut_after`-th chunk, and can come back on the same port."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.port = _free_port()
        self.puts = 0
        self.cut_after: int | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = None

    def start(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self.conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests and data.startswith(b"PUT ") and b"/c/" in data.split(b"\r\n", 1)[0]:  # a chunk
                    with self.lock:
                        self.puts += 1
                        over = self.cut_after is not None and self.puts >= self.cut_after
                    if over:
                        self.cut()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


def test_s3_server_gone_mid_run_is_one_line_and_the_store_resumes(s3_server, tiny, folder, tmp_path):
    """An extraction into s3:// whose server vanishes after a few writes: one line naming the store,
    exit 1; with the server back, the same command finishes the store with the bytes of a
    local, uninterrupted run."""
    import subprocess

    import s3fs

    proxy = CuttableProxy(int(s3_server.rsplit(":", 1)[1]))
    proxy.start()
    name = f"vc-{time.time_ns()}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(name)
    url = f"s3://{name}/cache"
    args = ["extract", str(folder), "--sd-model", str(tiny["sd"]), "--captioner", str(tiny["blip"]), "--resolution",
            "128", "--device", "cpu", "--shard-size", "2", "--t", "100", "--stages", "mid"]
    extract(ExtractRequest(dataset=str(folder), store=str(tmp_path / "local"), sd_model=str(tiny["sd"]),
                           captioner=str(tiny["blip"]), resolution=128, device="cpu", shard_size=2, t=(100,),
                           stages="mid", progress=False))
    env = {**_env(), **CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
           "VERMOUTH_STORAGE_OPTIONS": SHORT}
    proxy.cut_after = 4  # after the store marker, dataset record, manifests, array metadata and 3 chunks
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "vermouth_cache.cli", *args, "--store", url], capture_output=True,
                         env=env, timeout=300, text=True)
    assert run.returncode == 1, (run.returncode, run.stderr[-3000:])
    line = _one_error_line(run.stderr)
    assert line.startswith(f"error: cannot reach {url} (endpoint http://127.0.0.1:{proxy.port} ")
    assert "run the same command again" in line
    assert time.perf_counter() - t0 < 120
    written = _objects(fs, url)
    assert written and len(written) < len(_objects_local(tmp_path / "local"))  # it stopped part-way

    proxy.cut_after = None
    proxy.start()  # the server is back
    again = subprocess.run([sys.executable, "-m", "vermouth_cache.cli", *args, "--store", url], capture_output=True,
                           env=env, timeout=300, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _objects(fs, url) == _objects_local(tmp_path / "local")
    proxy.cut()


def _objects_local(root: Path) -> dict[str, bytes]:
    from conftest import store_bytes

    return store_bytes(root)
