"""pie_client: talk to a `pie-serve` server (upload programs, launch instances, stream their events).

`PieClient` is the asyncio client; `SyncPieClient` wraps it for scripts.
The wire protocol is in `pie_client.protocol` and docs/protocol.md.
"""

from pie_client.client import Event, PieClient, PieClientError, Program, RemoteInstance
from pie_client.protocol import PROTOCOL_VERSION
from pie_client.sync import SyncInstance, SyncPieClient

__all__ = ["Event", "PROTOCOL_VERSION", "PieClient", "PieClientError", "Program", "RemoteInstance",
           "SyncInstance", "SyncPieClient"]
