"""The simulated oned as one object: start, stop, restart, and test knobs.

Owns: wiring the parts (store, event bus, faults, core, engine, lifecycle,
hotplug, imaging, scheduler, hook execution manager, dispatcher, HTTP
server) in the right order, bootstrapping a fresh ROOT or resuming a
persisted one, the endpoint/events/credentials a client needs, and the
in-process helpers tests use to wait or to push objects into states no API
call reaches (an image in ERROR, a full datastore).
Must not: implement oned behaviour itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.onesim import (  # noqa: F401 - importing registers the XML-RPC methods
    api_cluster,
    api_image,
    api_misc,
    api_template,
    api_vm,
    dataplane,
    hooks,
)
from tests.onesim.dispatch import Dispatcher
from tests.onesim.engine import Engine, Scheduler
from tests.onesim.events import Bus
from tests.onesim.faults import Faults
from tests.onesim.hooks import HookExecutionManager
from tests.onesim.hotplug import Hotplug
from tests.onesim.imaging import Imaging
from tests.onesim.lifecycle import Lifecycle
from tests.onesim.model import Store
from tests.onesim.oned import ONEGATE_ENDPOINT, Config, Oned
from tests.onesim.server import RpcServer


class Simulator:
    """A running simulated oned. Build it with `Simulator.start(root, ...)`."""

    def __init__(self, config: Config, port: int, events_port: int,
                 faults: Faults | None = None) -> None:
        self.config = config
        self.root = config.root
        self.faults = faults or Faults()
        self._want_port, self._want_events = port, events_port
        self._running = False

    # -- life ----------------------------------------------------------------
    @classmethod
    def start(cls, root: str | Path, *, host: str = "127.0.0.1", port: int = 0,
              events_port: int = 0, version: str = "7.4.0", delay: float = 0.05,
              sched_delay: float | None = None, loop: bool = False,
              datastore_mb: int = 102400, lcm_delay: float | None = None,
              onegate_endpoint: str | None = ONEGATE_ENDPOINT) -> Simulator:
        """Boot a fresh OpenNebula in `root`, or resume the one persisted there.
        `delay` is how long each driver phase takes; `sched_delay` how long a
        VM stays PENDING before the scheduler deploys it (default `delay`);
        `lcm_delay` how long after its answer a queued VM action starts
        (default `delay`); `onegate_endpoint` is oned.conf's ONEGATE_ENDPOINT
        (None: not set, so CONTEXT=[TOKEN="YES"] is refused)."""
        if loop and not dataplane.loop_supported():
            raise RuntimeError("--loop needs root and losetup")
        config = Config(Path(root).resolve(), version, delay, sched_delay, loop, datastore_mb,
                        host, lcm_delay=lcm_delay, onegate_endpoint=onegate_endpoint or None)
        sim = cls(config, port, events_port)
        sim._boot()
        return sim

    def _boot(self) -> None:
        cfg = self.config
        cfg.root.mkdir(parents=True, exist_ok=True)
        self.store = Store(cfg.root)
        resumed = self.store.load()
        self.bus = Bus(cfg.host, self._want_events)
        self.bus.fault_filter = self.faults.filter_event
        self.core = Oned(cfg, self.store, self.bus, self.faults)
        if not resumed:
            self.core.bootstrap()
        self.engine = Engine(self.core)
        self.core.engine = self.engine
        self.lifecycle = Lifecycle(self.core)
        self.hotplug = Hotplug(self.core, self.lifecycle)
        self.imaging = Imaging(self.core)
        self.hem = HookExecutionManager(self.core)
        self.dispatcher = Dispatcher(self.core, sim=self)
        self.server = RpcServer(cfg.host, self._want_port, self.dispatcher.handle)
        self._want_port, self._want_events = self.server.port, self.bus.port
        with self.store.lock:
            if cfg.loop and resumed:
                self._replug()
            self.store.save()
        self.server.start()
        self.engine.start()
        self.scheduler = Scheduler(self.core, self.lifecycle.schedule_deploy)
        self.scheduler.start()
        self._running = True

    def stop(self, keep_devices: bool = False) -> None:
        """Stop serving; the state stays under ROOT. Loop devices are released
        unless `keep_devices`."""
        if not self._running:
            return
        self._running = False
        self.scheduler.stop()
        self.server.stop()
        self.engine.stop()
        self.hem.wait_idle(1)
        self.hem.close()
        self.bus.flush()
        self.bus.close()
        with self.store.lock:
            self.store.save()
            if self.config.loop and not keep_devices:
                for vid in list(self.store.vms):
                    dataplane.unplug_all(self.root, vid)

    def restart(self) -> None:
        """Stop and start again on the same ROOT, endpoint and events port."""
        self.stop(keep_devices=False)
        self._boot()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _replug(self) -> None:
        for vm in self.store.vms.values():
            if vm.state in (3, 5, 8) and vm.history:
                for disk in vm.disks():
                    if "ATTACH" not in disk:
                        self.core.plug_disk(vm, disk)

    # -- what a client needs ------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.config.host}:{self.server.port}/RPC2"

    @property
    def events(self) -> str:
        return self.bus.endpoint

    @property
    def credentials(self) -> str:
        return f"oneadmin:{self.store.meta['password']}"

    @property
    def version(self) -> str:
        return self.config.version

    def info(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "events": self.events,
                "credentials": self.credentials, "root": str(self.root)}

    # -- test helpers ---------------------------------------------------------------
    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no driver operation is pending, every event is published
        and every hook has run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.engine.idle() and not self._pending_vms():
                self.bus.flush(max(deadline - time.monotonic(), 0.1))
                if self.hem.wait_idle(max(deadline - time.monotonic(), 0.1)):
                    return True
            time.sleep(0.005)
        return False

    def _pending_vms(self) -> bool:
        with self.store.lock:
            return any(vm.state == 1 for vm in self.store.vms.values())

    def image_to_error(self, image_id: int, message: str = "onesim: forced ERROR") -> None:
        """Send an image to ERROR now (with an ERROR message), as a failed
        datastore operation would."""
        with self.store.lock:
            self.imaging.force_error(image_id, message)
            self.store.save()

    def set_datastore_capacity(self, ds_id: int, total_mb: int) -> None:
        """TOTAL_MB of a datastore (FREE_MB = TOTAL_MB - USED_MB)."""
        with self.store.lock:
            self.store.datastores[ds_id].total_mb = total_mb
            self.store.save()

    def copied_bytes(self) -> dict[str, int]:
        """The bytes the transfer manager's drivers would have copied so
        far, per operation (`snapshot`, `cpds`, `clone`, `ln`, `mvds`), as
        each TM_MAD does (`disks.transfer_bytes`). A test probe: oned
        reports nothing of the kind."""
        return self.core.copies.totals()

    def published(self) -> list[tuple[str, str]]:
        """Every (key, decoded body) published so far (drop/garble faults
        do not show here)."""
        self.bus.flush()
        return self.bus.published()
