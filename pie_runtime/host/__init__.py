"""The Wasm component host: binds every function of wit/inferlet.wit to Python.

One module per job (import what you need from the module that holds it):

- `contract`: the WIT package and version this host implements.
- `capabilities`: what outside access an instance gets (`--allow` met with the manifest).
- `registry`: `Host` (one per server: models, programs, live instances, the
  broker, the key-value store, the linker), `ServedModel`, `Program`.
- `context`: `InstanceContext`, the per-instance state host functions see,
  found through a thread-local.
- `resource_table`: handles <-> host objects, and what dropping one does.
- `conversions`: WIT values <-> the serving core's and the engine's.
- one module per WIT interface, each exporting its `RESOURCES` and
  `FUNCTIONS`: `futures` (`types`), `runtime`, `messaging`, `kvstore`,
  `inference`, `model`, `grammar`.
- `linker`: the linker binding them, the failure rules of a host call, each instance's WASI.
- `wit_codecs`: component values <-> Python, compiled once per type.
- `wasmtime_compat`: the only module that reaches into wasmtime-py's private
  layer (ctypes declarations, the host-call trampoline, the epoch deadline).
"""
