"""pie-run: the component host and the serving runtime (see docs/architecture.md)."""

from .errors import ERROR_CODES, PieError
from .queues import Queue
from .serving import InstanceState, ServingCore

__all__ = ["ERROR_CODES", "InstanceState", "PieError", "Queue", "ServingCore"]
