"""The smallest useful guest: one host call, then return (launch benchmarks, cache tests)."""

from wit_world import exports
from wit_world.imports import runtime


class Run(exports.Run):
    def run(self) -> str:
        return runtime.instance_id()
