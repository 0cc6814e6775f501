"""CONTEXT=[TOKEN="YES"] needs oned.conf's ONEGATE_ENDPOINT.

VirtualMachine::generate_token_context (src/vm/VirtualMachineContext.cc)
fails the VM's insert without it: vm.allocate answers INTERNAL (0x2000,
VirtualMachineAllocateAPI::pool_allocate), template.instantiate ALLOCATE
(TemplateAPI). PoolSQL::allocate took the id before the insert and puts
last_oid back to max(id - 1, 0): a refused first VM consumes id 0.
"""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.onesim import Simulator
from tests.onesim.testing import client, create_datablock, create_vm, guest_context_file

TOKEN_VM = 'NAME="t"\nCPU="0.1"\nMEMORY="32"\nCONTEXT=[TOKEN="YES"]'
PLAIN_VM = 'NAME="p"\nCPU="0.1"\nMEMORY="32"'
MESSAGE = "TOKEN set, but onegate endpoint was not defined in oned.conf."


def raw(sim: Simulator, method: str, *params: Any) -> list[Any]:
    """oned's answer array, as sent."""
    proxy = xmlrpc.client.ServerProxy(sim.endpoint)
    result: list[Any] = getattr(proxy, method)(sim.credentials, *params)
    return result


@pytest.fixture
def no_gate(tmp_path: Path) -> Iterator[Simulator]:
    s = Simulator.start(tmp_path / "sim", delay=0.01, onegate_endpoint=None)
    yield s
    s.stop()


def test_token_without_endpoint_is_refused_internal_and_consumes_the_first_id(
        no_gate: Simulator) -> None:
    answer = raw(no_gate, "one.vm.allocate", TOKEN_VM, False)
    assert answer[:3] == [False, f"[one.vm.allocate] {MESSAGE}", 0x2000]
    # the refused VM was going to be 0: PoolSQL::allocate keeps last_oid at 0
    assert raw(no_gate, "one.vm.allocate", PLAIN_VM, False)[:2] == [True, 1]
    # later refusals give their id back
    assert raw(no_gate, "one.vm.allocate", TOKEN_VM, False)[0] is False
    assert raw(no_gate, "one.vm.allocate", PLAIN_VM, False)[:2] == [True, 2]
    pool = raw(no_gate, "one.vmpool.info", -2, -1, -1, -2)[1]
    assert "<ID>0</ID>" not in pool and "<ID>1</ID>" in pool


def test_instantiate_is_refused_as_allocate_and_releases_the_images(
        no_gate: Simulator) -> None:
    one = client(no_gate)
    iid = create_datablock(one, "d", 1, persistent=True)
    tid = one.template.allocate(TOKEN_VM + f'\nDISK=[IMAGE_ID="{iid}"]')
    answer = raw(no_gate, "one.template.instantiate", tid, "x", False, "", False)
    assert answer[:3] == [False, "[one.template.instantiate] Error allocating a new virtual"
                          f" machine template. {MESSAGE}", 0x4000]
    img = one.image.info(iid)
    assert (img.STATE, img.RUNNING_VMS) == (1, 0)   # READY again, not USED_PERS
    assert raw(no_gate, "one.vm.allocate", PLAIN_VM, False)[:2] == [True, 1]


def test_default_endpoint_is_set_and_reaches_the_guest(onesim: Simulator, one: Any) -> None:
    config = raw(onesim, "one.system.config")[1]
    assert "<ONEGATE_ENDPOINT><![CDATA[http://127.0.0.1:5030]]></ONEGATE_ENDPOINT>" in config
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    assert one.vm.info(vid).TEMPLATE["CONTEXT"]["ONEGATE_ENDPOINT"] == "http://127.0.0.1:5030"
    assert "http://127.0.0.1:5030" in guest_context_file(onesim, vid).read_text()


def test_no_endpoint_in_system_config_when_unset(no_gate: Simulator) -> None:
    assert "ONEGATE_ENDPOINT" not in raw(no_gate, "one.system.config")[1]
