"""Run the fake Messages API in its own process: `python -m tests.fakeanthropic --port 8765`.

Prints its base URL on the first line, then serves until interrupted. Steer it over HTTP:
POST /_control/faults {"kind": "rate_limit", "times": -1, "probability": 0.1},
DELETE /_control/faults, POST /_control/latency {"latency": [0.2, 2]},
POST /_control/reset, GET /_control/stats.
"""

from __future__ import annotations

import argparse
import signal
import threading

from tests.fakeanthropic.server import FakeAnthropic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, nargs="+", default=[0.0])
    parser.add_argument("--no-record", action="store_true", help="do not keep request bodies")
    args = parser.parse_args()
    latency = (args.latency[0], args.latency[1]) if len(args.latency) > 1 else args.latency[0]
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with FakeAnthropic(latency, host=args.host, port=args.port, record=not args.no_record) as fake:
        print(fake.base_url, flush=True)
        done.wait()


if __name__ == "__main__":
    main()
