"""A component built without pie-build, as another language's toolchain would build one:
no SDK and no manifest; it reads its arguments raw and may launch a copy of itself."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import runtime


class Run(exports.Run):
    def run(self) -> str:
        args = runtime.arguments()
        out = {"arguments": args}
        if "--spawn=true" in args:
            try:
                out["child"] = json.loads(runtime.launch("", ["--greeting", "from-child"]).get())
            except Err as e:
                out["child_error"] = e.value.code.name.lower().replace("_", "-")
        return json.dumps(out)
