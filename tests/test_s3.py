"""What only an S3 repository has: its configuration and credentials, S3's
failures (wrong keys, a missing bucket, an unreachable endpoint, a cut
upload), conditional writes, the S3 form of a prune beside a running
backup, and Object Lock. The rest of the repository suite runs on S3
through the parametrised fixtures (tests/s3server.py)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_mod
from agent import prune as prune_mod
from agent import repository
from agent.errors import RepositoryError
from agent.model import S3Location
from agent.store.s3 import S3Settings, S3Store
from tests.agentkit import BLOCK, REPO, Cloud, make_cloud, offline_config, pattern, repo_view
from tests.s3server import S3RepoView, S3Server, credentials_file, server


def _run(cfg: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from agent.cli import main
    capsys.readouterr()
    try:
        main([*args, "--config", str(cfg)])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(r: tuple[int, str, str], code: int, *words: str) -> None:
    got, _, err = r
    assert got == code and err.count("\n") == 1 and "Traceback" not in err, r
    for w in words:
        assert w in err, (w, err)


def _settings(endpoint: str | None = None, **kw: Any) -> S3Settings:
    return S3Settings(endpoint_url=endpoint or server().endpoint, region="us-east-1",
                      access_key="testing", secret_key="testing",
                      addressing_style="path", **kw)


def _store(bucket: str, prefix: str = "repo", init: bool = False, **kw: Any) -> S3Store:
    location = S3Location(bucket, prefix)
    return (S3Store.init if init else S3Store.open)(location, _settings(**kw))


def _s3_config(tmp: Path, extra: str = "") -> Path:
    """An offline configuration whose repository is a fresh bucket."""
    return offline_config(tmp, backend="s3") if not extra else _with_s3_extra(tmp, extra)


def _with_s3_extra(tmp: Path, extra: str) -> Path:
    cfg = offline_config(tmp, backend="s3")
    cfg.write_text(cfg.read_text().rstrip() + "\n" + extra + "\n")
    return cfg


# -- configuration and credentials ----------------------------------------------------------


def test_the_credentials_file_must_be_0600_and_in_the_aws_format(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _s3_config(tmp_path)
    creds = tmp_path / "s3_credentials"
    creds.chmod(0o644)
    _one_line(_run(cfg, capsys, "init"), 3, str(creds), "chmod 600")
    creds.chmod(0o600)
    creds.write_text("[other]\naws_access_key_id = a\n")
    _one_line(_run(cfg, capsys, "init"), 3, str(creds), "aws_access_key_id", "[default]")
    creds.write_text("not an ini file\n")
    _one_line(_run(cfg, capsys, "init"), 3, str(creds), "AWS credentials format")
    creds.unlink()
    _one_line(_run(cfg, capsys, "init"), 3, str(creds), "does not exist")
    credentials_file(tmp_path)
    code, out, err = _run(cfg, capsys, "init", "--json")
    assert code == 0, err
    assert json.loads(out)["repository"] == repo_view(cfg).location


@pytest.mark.parametrize("lines, says", [
    ('repository = "s3://No_Such/x"', "storage.repository must be s3://BUCKET/PREFIX"),
    ('repository = "s3://bucket/../x"', "storage.repository must be s3://BUCKET/PREFIX"),
    ('repository = "/srv/repo"\n[storage.s3]\nregion = "x"', "[storage.s3] is set but"),
    ('repository = "s3://bucket/p"\n[storage.s3]\nendpoint = "x"', "unknown key storage.s3"),
    ('repository = "s3://bucket/p"\n[storage.s3]\naddressing_style = "dns"',
     "storage.s3.addressing_style must be path, virtual or auto"),
    ('repository = "s3://bucket/p"\n[storage.s3]\nendpoint_url = "ftp://x"',
     "storage.s3.endpoint_url must be an http(s) URL"),
    ('repository = "s3://bucket/p"\n[storage.s3]\nlock_days = -1', "storage.s3.lock_days"),
    ('repository = "s3://bucket/p"\n[storage.s3]\nlock_mode = "strict"',
     "storage.s3.lock_mode must be COMPLIANCE or GOVERNANCE"),
])
def test_bad_s3_settings_are_one_line_naming_the_key(tmp_path: Path, lines: str,
                                                     says: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[opennebula]\nendpoint = "http://127.0.0.1:9/RPC2"\n[proxy]\nvm_id = 0\n'
                   f'[storage]\n{lines}\n')
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(cfg)
    assert says in e.value.message and "\n" not in e.value.message


def test_s3_settings_parse_into_the_config(tmp_path: Path) -> None:
    cfg = _with_s3_extra(tmp_path, 'region = "eu-central-1"\nlock_days = 30\n'
                                   'lock_mode = "governance"')
    storage = config_mod.load(cfg).storage
    assert storage.repository == S3Location(repo_view(cfg).bucket, "repo")   # type: ignore
    assert storage.s3 is not None and storage.s3.endpoint_url == server().endpoint
    assert (storage.s3.region, storage.s3.lock_days, storage.s3.lock_mode) == (
        "eu-central-1", 30, "GOVERNANCE")
    assert storage.s3.read_credentials() == ("testing", "testing")


def test_boto3_reads_no_aws_files_or_environment(tmp_path: Path) -> None:
    """The keys come from storage.s3.credentials_file alone: a profile that
    does not exist, other keys and another endpoint in the environment and
    in ~/.aws change nothing (a plain boto3 session fails on the profile)."""
    cfg = _s3_config(tmp_path)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = WRONG\naws_secret_access_key = WRONG\n")
    (home / ".aws" / "config").write_text("[default]\nendpoint_url = http://127.0.0.1:9\n")
    env = {**os.environ, "HOME": str(home), "AWS_PROFILE": "no-such-profile",
           "AWS_ACCESS_KEY_ID": "WRONG", "AWS_SECRET_ACCESS_KEY": "WRONG",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    p = subprocess.run([sys.executable, "-m", "agent", "init", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert repo_view(cfg).exists()


# -- S3's failures: one line, exit 8, never the keys -----------------------------------------


@pytest.fixture(scope="module")
def auth_server() -> Iterator[str]:
    """A second S3 server that checks signatures (moto with
    INITIAL_NO_AUTH_ACTION_COUNT=0): any key it never issued is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_wrong_keys_missing_bucket_and_unreachable_endpoint_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], auth_server: str) -> None:
    cfg = _s3_config(tmp_path)
    view = repo_view(cfg)
    assert isinstance(view, S3RepoView)
    text = cfg.read_text()
    secret = "sEcReT-never-shown-0123456789"
    credentials_file(tmp_path, key="AKIAWRONGKEY", secret=secret)

    cfg.write_text(text.replace(server().endpoint, auth_server))
    r = _run(cfg, capsys, "init")
    _one_line(r, 8, view.location, "denied", "storage.s3.credentials_file")
    assert secret not in r[1] + r[2]

    credentials_file(tmp_path)
    cfg.write_text(text.replace(view.bucket, "no-such-bucket-here"))
    _one_line(_run(cfg, capsys, "init"), 8, "bucket no-such-bucket-here does not exist",
              "storage.repository")

    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg.write_text(text.replace(server().endpoint, closed))
    _one_line(_run(cfg, capsys, "init"), 8, f"cannot reach the S3 endpoint {closed}",
              "storage.s3.endpoint_url")

    cfg.write_text(text)
    assert _run(cfg, capsys, "init")[0] == 0
    view.s3.put_object(Bucket=view.bucket, Key="repo/config", Body=b"{not json")
    _one_line(_run(cfg, capsys, "list"), 8, "repository config in", "unreadable")
    view.s3.delete_object(Bucket=view.bucket, Key="repo/config")   # the wrong prefix, say
    _one_line(_run(cfg, capsys, "list"), 8, f"no oneback repository at {view.location}",
              "belongs to repository", "fix storage.repository")


def test_init_refuses_a_prefix_that_holds_something_else(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _s3_config(tmp_path)
    view = repo_view(cfg)
    assert isinstance(view, S3RepoView)
    view.s3.put_object(Bucket=view.bucket, Key="repo/precious.txt", Body=b"keep me")
    _one_line(_run(cfg, capsys, "init"), 8, "is not empty and not a oneback repository")
    assert view.s3.get_object(Bucket=view.bucket, Key="repo/precious.txt")["Body"].read() \
        == b"keep me"


class CuttingProxy:
    """A TCP proxy to the S3 server that forwards at most `limit` bytes of
    each request, then drops the connection: an upload cut half-way. With
    `lose_answers` N, it forwards the first N PUTs whole and drops the
    connection instead of passing their answer on: the PUT took effect,
    and the client does not know."""

    def __init__(self, upstream: str, limit: int, lose_answers: int = 0) -> None:
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.limit = limit
        self.lose_answers = lose_answers
        self.lost = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut = 0
        self._losing: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._up, args=(client, up), daemon=True).start()
            threading.Thread(target=self._down, args=(up, client), daemon=True).start()

    def _up(self, client: socket.socket, up: socket.socket) -> None:
        sent = 0
        try:
            while data := client.recv(65536):
                if data.startswith(b"PUT ") and self.lost < self.lose_answers:
                    self.lost += 1
                    self._losing.add(client)
                if sent + len(data) > self.limit:
                    up.sendall(data[:self.limit - sent])
                    self.cut += 1
                    break
                up.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (client, up):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _down(self, up: socket.socket, client: socket.socket) -> None:
        try:
            while data := up.recv(65536):
                if client in self._losing and not data.startswith(b"HTTP/1.1 100"):
                    # the PUT was done (not just its "100 Continue"): its answer is lost
                    self._losing.discard(client)
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    up.close()
                    return
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_a_cut_upload_leaves_no_partial_object(s3server: S3Server) -> None:
    """A chunk and a manifest whose uploads are cut after 256 KiB (each
    retry too): the put fails with one line, and neither name exists, not
    even partly; through a whole connection the same puts succeed."""
    bucket = s3server.bucket()
    _store(bucket, init=True)
    proxy = CuttingProxy(s3server.endpoint, 256 * 1024)
    try:
        cut = S3Store.open(S3Location(bucket, "repo"), _settings(proxy.endpoint))
        data = os.urandom(2 * BLOCK)   # incompressible: the upload is 2 MiB
        cid = hashlib.sha256(data).digest()
        with pytest.raises(RepositoryError) as e:
            cut.put(cid, data)
        assert "\n" not in e.value.message and "repo" in e.value.message
        with pytest.raises(RepositoryError):
            cut.put_manifest("1/m", data)
        assert proxy.cut >= 2
    finally:
        proxy.close()
    view = S3RepoView(bucket, "repo")
    assert view.chunks() == {} and view.manifests() == {}
    whole = _store(bucket)
    assert not whole.has(cid)
    assert whole.put(cid, data) > 0 and whole.get(cid) == data
    whole.put_manifest("1/m", data)
    assert whole.get_manifest("1/m") == data


def test_a_put_whose_answer_was_lost_is_retried_and_succeeds(s3server: S3Server) -> None:
    """A manifest PUT reaches S3 but its answer is lost (the connection
    drops): botocore retries it, the retry finds the name taken (If-None-Match)
    and the store, seeing its own bytes there, reports success instead of
    "already exists"; a chunk likewise. Another writer's bytes are still
    refused."""
    bucket = s3server.bucket()
    _store(bucket, init=True)
    proxy = CuttingProxy(s3server.endpoint, 1 << 40, lose_answers=2)
    try:
        store = S3Store.open(S3Location(bucket, "repo"), _settings(proxy.endpoint))
        assert store.put_manifest("3/20261201T000000Z-a", b"manifest bytes") == 14
        data = os.urandom(100_000)
        store.put(hashlib.sha256(data).digest(), data)
        assert proxy.lost == 2
        assert store.get_manifest("3/20261201T000000Z-a") == b"manifest bytes"
        assert store.get(hashlib.sha256(data).digest()) == data
        with pytest.raises(RepositoryError, match="already exists"):
            store.put_manifest("3/20261201T000000Z-a", b"other bytes")
    finally:
        proxy.close()


def test_conditional_writes_let_one_writer_win(s3server: S3Server) -> None:
    """Two processes' stores write the same manifest name and the same chunk
    at once: one manifest wins whole and the other writer is refused; the
    chunk is stored once. The If-None-Match PUT is what decides: without it
    the second manifest would silently replace the first."""
    bucket = s3server.bucket()
    a = _store(bucket, init=True)
    b = _store(bucket)
    start = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def write(store: S3Store, body: bytes) -> None:
        start.wait()
        try:
            store.put_manifest("5/20261201T000000Z-x", body)
            outcome[body.decode()] = "written"
        except RepositoryError as e:
            outcome[body.decode()] = e.message

    threads = [threading.Thread(target=write, args=(s, body))
               for s, body in ((a, b"from-a"), (b, b"from-b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = [k for k, v in outcome.items() if v == "written"]
    assert len(winner) == 1, outcome
    loser = "from-b" if winner == ["from-a"] else "from-a"
    assert "already exists" in outcome[loser]
    assert a.get_manifest("5/20261201T000000Z-x") == winner[0].encode()
    with pytest.raises(RepositoryError, match="already exists"):
        b.put_manifest("5/20261201T000000Z-x", b"later")
    # the same bytes again (a PUT retried after its answer was lost) is no error
    a.put_manifest("5/20261201T000000Z-x", winner[0].encode())

    data = pattern(BLOCK, 3)
    cid = hashlib.sha256(data).digest()
    written = [a.put(cid, data), b.put(cid, data)]
    assert sorted(written)[0] == 0 and sorted(written)[1] > 0
    assert list(a.ids()) == [cid]


def test_keys_are_immutable_named_blobs(s3server: S3Server) -> None:
    store = _store(s3server.bucket(), init=True)
    assert store.key_names() == []
    store.put_key("master", b"wrapped-1")
    store.put_key("backup_2", b"wrapped-2")
    assert store.key_names() == ["backup_2", "master"]
    assert store.get_key("master") == b"wrapped-1"
    with pytest.raises(RepositoryError, match="already exists"):
        store.put_key("master", b"other")
    store.delete_key("master")
    store.delete_key("master")
    assert store.key_names() == ["backup_2"]
    with pytest.raises(ValueError):
        store.put_key("../x", b"")


# -- prune beside a running backup, on S3 -----------------------------------------------------


def test_s3_prune_keeps_what_a_running_backup_wrote_or_touched(s3server: S3Server) -> None:
    """A backup elsewhere (its marker in running/) wrote one chunk and reused
    (touched, a copy onto itself) an old unreferenced one; a prune keeps both
    while the marker is live and frees them once it is gone. A naive prune
    (every chunk no manifest references) deletes both."""
    bucket = s3server.bucket()
    store = _store(bucket, init=True, hold=0.5)
    old = os.urandom(5000)
    old_id = hashlib.sha256(old).digest()
    store.put(old_id, old)                      # a forgotten backup's, long ago
    time.sleep(prune_mod.MARGIN + 1.1)
    marker = store.running_start("backup-vm99")
    pending = os.urandom(5000)
    pending_id = hashlib.sha256(pending).digest()
    store.put(pending_id, pending)              # written during the backup
    assert store.put(old_id, old) == 0          # a dedup hit: touched
    report = prune_mod.prune(store)
    assert report.running == [marker.name]
    assert report.deleted == 0 and report.kept_recent == 2
    assert store.has(old_id) and store.has(pending_id)
    marker.end()
    time.sleep(prune_mod.MARGIN + 1.1)
    report = prune_mod.prune(store)
    assert report.deleted == 2 and not store.has(old_id) and not store.has(pending_id)
    assert S3RepoView(bucket, "repo").chunks() == {}


def test_a_touch_never_trusts_a_chunk_a_prune_is_deleting(s3server: S3Server) -> None:
    """The other half of the race: a prune has announced a chunk's deletion
    (trash/HEX). A touch (a backup's dedup hit) made meanwhile does not
    return True while the announcement stands: it returns False once the
    prune deleted the chunk (the backup writes it again), and True once the
    prune kept it (the announcement went, the chunk is there)."""
    bucket = s3server.bucket()
    store = _store(bucket, init=True, hold=1.0)
    view = S3RepoView(bucket, "repo")
    for keep in (False, True):
        data = os.urandom(3000)
        cid = hashlib.sha256(data).digest()
        store.put(cid, data)
        view.s3.put_object(Bucket=bucket, Key=f"repo/trash/{cid.hex()}", Body=b"")
        got: list[bool] = []
        toucher = threading.Thread(target=lambda c=cid, g=got: g.append(store.touch(c)))
        toucher.start()
        time.sleep(0.8)
        assert got == []                       # waits while the deletion is announced
        if not keep:
            view.delete_chunk(cid.hex())       # the prune deleted it
        time.sleep(0.3)
        view.s3.delete_object(Bucket=bucket, Key=f"repo/trash/{cid.hex()}")
        toucher.join(10)
        assert got == [keep]
        assert store.put(cid, data) == (0 if keep else len(view.read_chunk(cid.hex())))


def test_prune_beside_backups_on_s3_through_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A backup uploaded a new chunk and is held (a slow detach) past a
    prune's margin: the prune keeps that chunk, referenced by no manifest
    yet and older than the prune's start, because the backup's marker is
    live (a prune without markers deletes it, and the backup then fails).
    The backup commits and restores byte for byte; after a forget, the next
    prune frees exactly the chunk only the forgotten backup referenced."""
    with make_cloud(tmp_path, backend="s3") as c:
        vm = c.vm("v", [c.image("v0", pattern(4 * BLOCK, 61))])
        first = c.run("backup", str(vm), "--json", capsys=capsys)
        assert first.code == 0, first.err
        with open(c.disk_path(vm, 0), "r+b") as f:
            f.write(pattern(BLOCK, 62))
        c.sim.faults.slow_driver("unplug", 8.0, count=1)
        proc = c.spawn("backup", str(vm), "--json")
        _wait(lambda: len(c.repo.chunks()) == 5)
        c.repo.age_chunks(60)                   # older than the prune's cut-off would be
        r = c.run("prune", "--json", capsys=capsys)
        assert r.code == 0, r.err
        assert r.json()["deleted"] == 0 and r.json()["kept_recent"] == 1, r.out
        assert r.json()["running"]
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        second = json.loads(out)
        assert c.run("forget", str(first.json()["backup_id"]), capsys=capsys).code == 0
        c.repo.age_chunks(60)
        r = c.run("prune", "--json", capsys=capsys)
        assert r.code == 0 and r.json()["deleted"] == 1, r.out + r.err
        assert len(c.repo.chunks()) == 4
        path = c.tmp / "out.raw"
        assert c.run("export", str(second["backup_id"]), "0", "-o", str(path),
                     capsys=capsys).code == 0
        assert path.read_bytes() == c.disk_path(vm, 0).read_bytes()


def _wait(cond: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.05)


# -- Object Lock ---------------------------------------------------------------------------------


def _retention(view: S3RepoView, key: str) -> datetime:
    until: datetime = view.s3.head_object(Bucket=view.bucket, Key=f"repo/{key}")[
        "ObjectLockRetainUntilDate"]
    return until


def test_init_with_lock_days_needs_a_bucket_with_object_lock(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _with_s3_extra(tmp_path, "lock_days = 7")
    _one_line(_run(cfg, capsys, "init"), 8, "has no Object Lock", "lock_days")
    assert not repo_view(cfg).exists()


def test_a_reused_chunk_gets_its_retention_extended(s3server: S3Server) -> None:
    """Written with 1 day of Object Lock; a backup that keeps 3 days
    (`oneback copy --lock-days 3` passes the override) reusing it extends
    its retention; one that needs less leaves it as it is."""
    bucket = s3server.bucket(lock=True)
    one = _store(bucket, init=True, lock_days=1)
    view = S3RepoView(bucket, "repo")
    data = pattern(BLOCK, 5)
    cid = hashlib.sha256(data).digest()
    key = f"chunks/{cid.hex()[:2]}/{cid.hex()}"
    assert one.put(cid, data) > 0
    first = _retention(view, key)
    assert 0.9 < (first - datetime.now(UTC)).total_seconds() / 86400 <= 1.0
    cfg = config_mod.StorageConfig(
        repository=S3Location(bucket, "repo"), catalog=Path("/nonexistent"), block_size=BLOCK,
        workers=2, s3=config_mod.S3Config(credentials_file=_creds(), endpoint_url=s3server
                                          .endpoint, addressing_style="path", lock_days=1))
    three = repository.open_store(cfg, lock_days=3)
    assert three.put(cid, data) == 0
    extended = _retention(view, key)
    assert (extended - datetime.now(UTC)).total_seconds() / 86400 >= 3.0
    assert one.put(cid, data) == 0 and _retention(view, key) == extended
    manifest = one.put_manifest("1/m", b"x")
    assert manifest == 1 and 0.9 < (_retention(view, "manifests/1/m") - datetime.now(UTC)
                                     ).total_seconds() / 86400 <= 1.0


def _creds() -> Path:
    import tempfile
    return credentials_file(Path(tempfile.mkdtemp()))


@pytest.fixture
def locked_cloud(tmp_path: Path) -> Iterator[Cloud]:
    with make_cloud(tmp_path, backend="s3-lock") as c:
        yield c


def test_forget_and_prune_report_what_object_lock_keeps_and_delete_the_rest(
        locked_cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """Two backups made without a lock, then the operator sets lock_days: two
    more. Forgetting all four forgets the first two (their manifests go) and
    reports the others locked until a date, kept in the catalog; prune frees
    the unlocked chunks nothing references and reports the locked ones."""
    c = locked_cloud
    vm = c.vm("v", [c.image("v0", pattern(2 * BLOCK, 71))])
    ids = []
    unlocked = c.config.read_text()
    for i in range(4):
        if i == 2:
            c.config.write_text(unlocked.rstrip() + "\nlock_days = 2\n")
        with open(c.disk_path(vm, 0), "r+b") as f:
            f.write(pattern(BLOCK, 72 + i))
        r = c.run("backup", str(vm), "--json", capsys=capsys)
        assert r.code == 0, r.err
        ids.append(r.json()["backup_id"])
    r = c.run("forget", *map(str, ids), "--json", capsys=capsys)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["forgotten"] == ids[:2]
    assert [x["backup_id"] for x in doc["locked"]] == ids[2:]
    assert all(x["until"] > time.time() + 86400 for x in doc["locked"])
    assert [b["backup_id"] for b in c.run("list", "--json", capsys=capsys).json()] == ids[2:]
    assert len(c.repo.manifests()) == 2
    r = c.run("forget", str(ids[3]), capsys=capsys)
    assert r.code == 0 and "locked until" in r.out and "forget them again after" in r.out

    # prune: the unlocked backups' own chunks go; a locked orphan (a failed
    # backup's chunk) is reported and stays
    store = c.repo.open()
    orphan = os.urandom(4000)
    store.put(hashlib.sha256(orphan).digest(), orphan)
    before = set(c.repo.chunks())
    c.repo.age_chunks(60)
    r = c.run("prune", "--json", capsys=capsys)
    assert r.code == 0, r.err
    report = r.json()
    assert report["locked"] == 1 and report["locked_until"] > time.time() + 86400
    assert report["deleted"] >= 2
    assert len(c.repo.chunks()) == len(before) - report["deleted"]
    assert hashlib.sha256(orphan).hexdigest() in c.repo.chunks()
    out = c.run("prune", capsys=capsys)
    assert out.code == 0 and "1 chunk(s) are locked until" in out.out, out.out
    assert c.run("verify", "--read-data", capsys=capsys).code == 0
