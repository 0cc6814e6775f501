"""`python -m tests.onesim serve --root DIR ...`: run the simulator until
SIGTERM or SIGINT, after printing one JSON line with its endpoints."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from tests.onesim.oned import ONEGATE_ENDPOINT
from tests.onesim.simulator import Simulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.onesim",
                                     description="A simulated OpenNebula oned.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve XML-RPC and ZeroMQ events")
    serve.add_argument("--root", required=True, help="state, datastores and guests live here")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="XML-RPC port (0: any free)")
    serve.add_argument("--events-port", type=int, default=0, help="ZeroMQ PUB port")
    serve.add_argument("--version", default="7.4.0", help="what one.system.version reports")
    serve.add_argument("--delay", type=float, default=0.05,
                       help="seconds each driver phase takes")
    serve.add_argument("--sched-delay", type=float, default=None,
                       help="seconds a VM stays PENDING (default: --delay)")
    serve.add_argument("--lcm-delay", type=float, default=None,
                       help="seconds between vm.action's answer and the VM starting to move"
                            " (default: --delay)")
    serve.add_argument("--onegate-endpoint", default=ONEGATE_ENDPOINT,
                       help="oned.conf's ONEGATE_ENDPOINT ('' : unset, TOKEN=YES is refused)")
    serve.add_argument("--loop", action="store_true",
                       help="attach guest disks as real loop devices (root only)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum: int, frame: object) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            raise SystemExit(1)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sim = Simulator.start(args.root, host=args.host, port=args.port,
                          events_port=args.events_port, version=args.version,
                          delay=args.delay, sched_delay=args.sched_delay, loop=args.loop,
                          lcm_delay=args.lcm_delay, onegate_endpoint=args.onegate_endpoint)
    try:
        sys.stdout.write(json.dumps(sim.info()) + "\n")
        sys.stdout.flush()
        while not stop.wait(0.2):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
