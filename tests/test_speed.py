"""Speed without loss: commands that work from the catalog alone start without
the cloud's modules, and the XML-RPC transport to oned (standard library)
keeps oned's errors, faults, timeouts and dropped connections apart."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cloud import Cloud as OneCloud
from agent.errors import CloudError, CloudTimeout, NotFound
from tests.agentkit import REPO, Cloud, pattern
from tests.onesim.simulator import Simulator

# Modules a command that does not talk to the cloud must not load.
CLOUD_MODULES = ("pyone", "zmq", "requests", "xmlrpc.client", "agent.cloud", "agent.daemon",
                 "agent.subscriber", "agent.attach")

# Runs `oneback ARGS` in a fresh interpreter through the real entry point, then
# writes which of CLOUD_MODULES got imported and the exit code to a JSON file.
PROBE = """
import json, sys
out, args = sys.argv[1], sys.argv[2:]
from agent.cli import main
try:
    main(args)
except SystemExit as e:
    code = e.code
json.dump({"code": code, "loaded": [m for m in MODULES if m in sys.modules]}, open(out, "w"))
""".replace("MODULES", repr(CLOUD_MODULES))


def probe(tmp: Path, *args: str) -> dict[str, object]:
    out = tmp / "probe.json"
    p = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert out.exists(), p.stderr
    doc: dict[str, object] = json.loads(out.read_text())
    doc["stderr"] = p.stderr
    return doc


def test_commands_that_do_not_talk_to_the_cloud_do_not_import_it(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("web", [cloud.image("web-os", pattern(2 * 1024 * 1024, 1))])
    done = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert done.code == 0, done.err
    backup_id = str(done.json()["backup_id"])
    cfg = ("--config", str(cloud.config))
    offline = [("--version",), ("--help",), ("list", *cfg), ("list", "--json", *cfg),
               ("show", backup_id, *cfg), ("exit-codes",),
               ("export", backup_id, "0", "-o", str(cloud.tmp / "out.raw"), *cfg)]
    for args in offline:
        doc = probe(cloud.tmp, *args)
        assert doc["code"] in (0, None), (args, doc["stderr"])
        assert doc["loaded"] == [], f"oneback {' '.join(args)} imported {doc['loaded']}"
    assert (cloud.tmp / "out.raw").stat().st_size == 2 * 1024 * 1024
    # the probe sees the imports of a command that does talk to the cloud
    online = probe(cloud.tmp, "snapshot", "list", str(vm), *cfg)
    assert online["code"] in (0, None), online["stderr"]
    assert "agent.cloud" in online["loaded"] and "xmlrpc.client" in online["loaded"]


def test_oned_error_arrays_and_faults_map_to_our_errors(onesim: Simulator) -> None:
    one = OneCloud(onesim.endpoint, onesim.credentials, timeout=5)
    assert one.version()[0] >= 5
    with pytest.raises(NotFound, match=r"Error getting virtual machine \[4242\]"):
        one.vm(4242)
    with pytest.raises(CloudError) as api:
        one.call("vmpool.info", -9, -1, -1, -1)
    assert api.value.code == 0x1000 and "Incorrect filter_flag" in api.value.message
    assert not api.value.transient
    with pytest.raises(CloudError) as fault:  # an XML-RPC fault: wrong parameter type
        one.call("vm.info", "zero")
    assert "one.vm.info was rejected by OpenNebula: <Fault -501" in fault.value.message
    bad = OneCloud(onesim.endpoint, "oneadmin:wrong", timeout=5)
    with pytest.raises(CloudError) as auth:
        bad.version()
    assert auth.value.code == 0x100 and "Check the user:password" in auth.value.message


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[bytes], threading.Event]]:
    """An HTTP endpoint that reads each request and then either stays silent
    (until released) or, once `drop` is set, closes the connection unanswered."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    seen: list[bytes] = []
    drop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            data = b""
            conn.settimeout(5)
            try:
                while b"</methodCall>" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            seen.append(data)
            if drop.is_set():
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/RPC2", seen, drop
    finally:
        srv.close()
        for c in conns:
            c.close()


def test_a_silent_oned_times_out_and_a_dropped_call_is_not_resent(
        silent_server: tuple[str, list[bytes], threading.Event]) -> None:
    endpoint, seen, drop = silent_server
    one = OneCloud(endpoint, "oneadmin:x", timeout=0.3)
    start = time.monotonic()
    with pytest.raises(CloudTimeout, match="did not answer one.system.version in time"):
        one.version()
    assert time.monotonic() - start < 3
    # oned closes the connection without an answer: the call may have been
    # carried out, so it is reported, never sent a second time
    drop.set()
    seen.clear()
    with pytest.raises(CloudError) as dropped:
        one.call("image.allocate", 'NAME="x"', 1, False)
    assert dropped.value.transient and "cannot reach OpenNebula" in dropped.value.message
    time.sleep(0.2)
    assert len(seen) == 1, f"the call was sent {len(seen)} times"


def test_an_unreachable_or_foreign_endpoint_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(CloudError) as refused:
        OneCloud(f"http://127.0.0.1:{port}/RPC2", "oneadmin:x", timeout=2).version()
    assert refused.value.transient
    assert refused.value.message.startswith(f"cannot reach OpenNebula at http://127.0.0.1:{port}")

    class Html(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"<html><body>a web server</body"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    web = http.server.HTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        with pytest.raises(CloudError, match="is not XML-RPC .*check opennebula.endpoint"):
            OneCloud(f"http://127.0.0.1:{web.server_port}/", "oneadmin:x", timeout=2).version()
    finally:
        web.shutdown()
        web.server_close()


@pytest.mark.parametrize("line", ["read_depth = 0", "read_depth = 257", 'read_depth = "deep"',
                                  'direct_io = "yes"'])
def test_a_bad_read_setting_is_one_line_naming_the_key(cloud: Cloud, line: str) -> None:
    text = cloud.config.read_text().replace("[storage]\n", f"[storage]\n{line}\n")
    cloud.config.write_text(text)
    r = cloud.call("list")
    key = "storage." + line.split()[0]
    assert r.code == 3 and key in r.err and len(r.err.splitlines()) == 1, r.err
