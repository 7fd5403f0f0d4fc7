"""pie-run: the component host and the serving runtime (see ARCHITECTURE.md)."""

from .errors import ERROR_CODES, PieError
from .serving import InstanceState, Queue, ServingCore

__all__ = ["ERROR_CODES", "InstanceState", "PieError", "Queue", "ServingCore"]
