"""Key-value store: state that outlives an instance, shared by one user's instances.

Each run applies its operations in order: --set, then --get, then --delete,
then --list; it also counts the runs that used the store. Values are
strings; structure them with JSON.

    pie-run kv_store.wasm -- --set "city=Paris;lang=fr"
    pie-run kv_store.wasm -- --get "city,lang"      # a later run on the same server

Returns JSON: {"got": {key: value or null}, "deleted": {key: bool}, "keys": [...], "runs": n}.
"""

import json

import inferlet

inferlet.declare(
    name="kv-store",
    version="0.1.0",
    description="Sets, gets, deletes and lists keys of the shared key-value store.",
    arguments=[
        inferlet.Arg("set", str, default="", help="KEY=VALUE pairs to store, ';'-separated."),
        inferlet.Arg("get", str, default="", help="Keys to read, ','-separated."),
        inferlet.Arg("delete", str, default="", help="Keys to delete, ','-separated."),
        inferlet.Arg("list", str, default="", help="List the keys starting with this prefix ('*' = all)."),
    ],
)

RUNS = "kv-demo/runs"


def main(args) -> str:
    store = inferlet.store
    # Read-modify-write: concurrent runs may overwrite each other's count.
    runs = int(store.get(RUNS) or 0) + 1
    store.set(RUNS, str(runs))

    for pair in filter(None, args.set.split(";")):
        key, _, value = pair.partition("=")
        store.set(key, value)
    got = {key: store.get(key) for key in filter(None, args.get.split(","))}
    deleted = {key: store.delete(key) for key in filter(None, args.delete.split(","))}
    keys = store.keys("" if args.list == "*" else args.list) if args.list else []
    return json.dumps({"got": got, "deleted": deleted, "keys": keys, "runs": runs})
