"""`make demo`: oneback's main job on a simulated cloud, start to finish.

Starts onesim (the simulated oned) in a temporary directory, creates a VM
with real data on its disks and a proxy VM, writes a configuration, runs a
full backup, changes some blocks as the guest would, runs an incremental
backup, then restores the latest and the first backup to new VMs and proves
both byte for byte. Every step is the real `oneback` command.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.onesim.simulator import Simulator
from tests.onesim.testing import (
    client,
    create_image,
    create_proxy_vm,
    create_vm,
    guest_dev_dir,
    guest_disk_path,
)

MiB = 1024 * 1024
BLOCK = 1 * MiB


def say(text: str) -> None:
    print(text, flush=True)


def oneback(config: Path, *args: str) -> Any:
    p = subprocess.run([sys.executable, "-m", "agent", *args, "--json", "--config", str(config)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"oneback {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout)


def disk_image(size: int, seed: int) -> bytes:
    """Realistic content: text-like data, random data, zero regions, repeats."""
    rnd = random.Random(seed)
    words = [b"kernel", b"nginx", b"GET /index.html", b"200", b"user=alice", b"backup"]
    out = bytearray()
    while len(out) < size:
        kind = rnd.randrange(4)
        if kind == 0:
            out += b" ".join(rnd.choice(words) for _ in range(BLOCK // 8))[:BLOCK]
        elif kind == 1:
            out += rnd.randbytes(BLOCK)
        elif kind == 2:
            out += bytes(BLOCK)
        else:
            out += out[-BLOCK:] if len(out) >= BLOCK else bytes(BLOCK)
    return bytes(out[:size])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def human(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def report(doc: dict[str, Any]) -> None:
    say(f"  backup {doc['backup_id']} ({doc['kind']}):")
    for d in doc["disks"]:
        if d["volatile"] or d["excluded"]:
            say(f"    disk {d['disk_id']}: {human(d['size'])}, "
                f"{'volatile' if d['volatile'] else 'excluded'}: definition kept")
        else:
            say(f"    disk {d['disk_id']}: {human(d['size'])} read, {human(d['bytes_changed'])}"
                f" changed, {human(d['bytes_stored'])} stored")
    for w in doc["warnings"]:
        say(f"    warning: {w}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="oneback-demo-"))
    sim = Simulator.start(work / "cloud", delay=0.01)
    try:
        one = client(sim)
        say(f"simulated OpenNebula {sim.version} at {sim.endpoint} (root {work / 'cloud'})")
        proxy = create_proxy_vm(one, sim, "oneback-proxy")
        os_img = create_image(one, sim, "web-os", disk_image(16 * MiB, 1), dev_prefix="vd")
        data_img = create_image(one, sim, "web-data", disk_image(8 * MiB, 2), persistent=True,
                                dev_prefix="vd")
        vm = create_vm(one, sim, "web", [os_img, data_img, {"TYPE": "fs", "SIZE": 4}])
        say(f"VM {vm} 'web': a 16 MiB OS disk, an 8 MiB persistent data disk, a volatile disk;"
            f" proxy VM {proxy}")

        auth = work / "one_auth"
        auth.write_text(sim.credentials + "\n")
        auth.chmod(0o600)
        config = work / "oneback.toml"
        config.write_text(f"""[opennebula]
endpoint = "{sim.endpoint}"
credentials_file = "{auth}"
events = "{sim.events}"
poll_interval = 0.02
[proxy]
vm_id = {proxy}
dev_root = "{guest_dev_dir(sim, proxy)}"
[storage]
repository = "{work / 'repo'}"
catalog = "{work / 'catalog.sqlite'}"
block_size = {BLOCK}
""")
        say(f"configuration: {config}")
        made = oneback(config, "init")
        say(f"oneback init: repository {made['repository']} (id {made['repository_id']})\n")

        say("1. full backup")
        first = oneback(config, "backup", str(vm))
        report(first)
        at_first = {i: digest(guest_disk_path(sim, vm, i)) for i in (0, 1)}

        say("\n2. the guest changes 3 blocks of its OS disk and 1 of its data disk")
        rnd = random.Random(7)
        for disk, blocks in ((0, [2, 9, 13]), (1, [5])):
            with open(guest_disk_path(sim, vm, disk), "r+b") as f:
                for b in blocks:
                    f.seek(b * BLOCK)
                    f.write(rnd.randbytes(BLOCK))
        at_second = {i: digest(guest_disk_path(sim, vm, i)) for i in (0, 1)}

        say("\n3. incremental backup: only the changed blocks are stored")
        second = oneback(config, "backup", str(vm))
        report(second)

        repo_bytes = sum(p.stat().st_size for p in (work / "repo").rglob("*") if p.is_file())
        say(f"\nrepository: {human(repo_bytes)} for 2 logically full backups of 28 MiB of"
            f" disks")

        for label, backup, expect in (("latest", second, at_second),
                                      ("first", first, at_first)):
            say(f"\n4. restore the {label} backup ({backup['backup_id']}) to a new VM")
            restored = oneback(config, "restore", str(backup["backup_id"]))
            new = restored["vm_id"]
            info = one.vm.info(new)
            state = "RUNNING" if (info.STATE, info.LCM_STATE) == (3, 3) else "not running"
            say(f"  VM {new} '{info.NAME}' is {state}; template deleted:"
                f" {restored['template_deleted']}")
            for i in (0, 1):
                got = digest(guest_disk_path(sim, new, i))
                ok = "identical" if got == expect[i] else "DIFFERENT"
                say(f"    disk {i}: sha256 {got} vs backed-up {expect[i]}: {ok}")
                if got != expect[i]:
                    raise SystemExit("restore mismatch")
        leftovers = [i.NAME for i in one.imagepool.info(-2, -1, -1).IMAGE
                     if i.NAME.startswith("oneback-tmp")]
        say(f"\ntemporary oneback objects left in the cloud: {len(leftovers)}")
        say("demo finished: backups and restores verified byte for byte")
    finally:
        sim.stop()
        if not os.environ.get("ONEBACK_DEMO_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
