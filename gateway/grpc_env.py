"""gRPC core settings of the gateway process. gRPC reads them when it starts: `apply()` before importing grpc.

gRPC's EventEngine client (the default since grpcio 1.6x) hands every received message across two more
threads before asyncio sees it: on the 2-core CI machine about 5 context switches and 100 µs of CPU per
streamed token, against about 2 and 65 µs on the classic client path (benchmarks/grpc_floor.py measures
it). The gateway receives one message per generated token, so it takes the classic path. A value the
operator sets in the environment wins.
"""

from __future__ import annotations

import os

GRPC_EXPERIMENTS = "-event_engine_client"


def apply() -> None:
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
