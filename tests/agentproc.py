"""Test kit: the agent as a real child process (`oneback agent`), its JSON
log collected, its configuration written, and the `agent` fixture that starts
it (registered in conftest) and stops it after the test."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.agentkit import Cloud


class AgentProcess:
    """`oneback agent` running as a child process; its log lines collected."""

    def __init__(self, c: Cloud) -> None:
        self.c = c
        self.lines: list[dict[str, Any]] = []
        self.proc = c.spawn("agent")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.lines.append(json.loads(line))
            except json.JSONDecodeError:
                self.lines.append({"event": "unparsed", "text": line})

    def events(self, name: str) -> list[dict[str, Any]]:
        return [x for x in self.lines if x.get("event") == name]

    def wait_event(self, name: str, timeout: float = 20,
                   where: Callable[[dict[str, Any]], bool] = lambda _: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [x for x in self.events(name) if where(x)]
            if found:
                return found[0]
            assert self.proc.poll() is None, self.lines[-20:]
            time.sleep(0.02)
        raise AssertionError(f"no {name} event in {timeout}s; log tail: {self.lines[-15:]}")

    @property
    def control_url(self) -> str:
        return str(self.wait_event("control.listening")["address"])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def agent_config(c: Cloud, events: str | None = None, reconcile: float = 1.0,
                 extra: str = "") -> None:
    secret = c.tmp / "hook_secret"
    secret.write_text("s3cret-s3cret-s3cret-s3cret\n")
    secret.chmod(0o600)
    text = c.config.read_text()
    if events is not None:
        text = text.replace(f'events = "{c.sim.events}"', f'events = "{events}"')
    c.config.write_text(text + f"""
[agent]
listen = "127.0.0.1:0"
secret_file = "{secret}"
reconcile_interval = {reconcile}
retry_base = 0.2
shutdown_grace = 10
{extra}
""")


@pytest.fixture
def agent(cloud: Cloud) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(**kw: Any) -> AgentProcess:
        if not started:
            agent_config(cloud, **kw)
        a = AgentProcess(cloud)
        started.append(a)
        a.wait_event("agent.started")
        return a

    yield start
    for a in started:
        a.stop()


def backups(c: Cloud, vm: int) -> list[dict[str, Any]]:
    r = c.call("list", str(vm), "--json")
    assert r.code == 0, r.err
    return list(r.json())


def wait_backups(c: Cloud, vm: int, n: int, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = backups(c, vm)
        if len(found) >= n:
            return found
        time.sleep(0.2)
    raise AssertionError(f"VM {vm} has {len(backups(c, vm))} backups, wanted {n}")


def user_template(c: Cloud, vm: int) -> dict[str, str]:
    return dict(c.one.vm.info(vm).USER_TEMPLATE)
