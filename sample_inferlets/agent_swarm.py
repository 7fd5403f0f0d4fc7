"""Swarm of agents: instances that share their work over broadcast/subscribe.

Run N copies (`pie-run agent_swarm.wasm --instances 3 -- --agents 3`). Each
agent subscribes to a topic, writes its own contribution with the model,
posts it on the topic and collects the others' posts; then it continues its
own context with everything the swarm said and writes a summary.

A broadcast reaches only current subscribers, and agents start at
different times. So an agent that hears a peer for the first time posts
its contribution once more: whoever subscribed late has announced itself
by posting, and gets the repeat. Every agent thus hears every other.

Returns JSON: {"id", "contribution", "peers": {id: contribution}, "summary"}.
"""

import asyncio
import json

import inferlet
from inferlet import Context, Sampler, Stop

inferlet.declare(
    name="agent-swarm",
    version="0.1.0",
    description="Agents (instances) that exchange their contributions over a broadcast topic.",
    arguments=[
        inferlet.Arg("agents", int, default=3, help="How many agents take part (= pie-run --instances)."),
        inferlet.Arg("topic", str, default="swarm", help="Broadcast topic the agents share."),
        inferlet.Arg("task", str, default="Plan a picnic.", help="What the swarm works on."),
        inferlet.Arg("max-tokens", int, default=16, help="Most tokens per contribution and summary."),
        inferlet.Arg("timeout", float, default=60.0, help="Seconds to wait for a peer's post."),
    ],
)


async def main(args) -> str:
    me = inferlet.instance_id()
    greedy = Sampler.greedy()
    with inferlet.subscribe(args.topic) as topic:  # before posting: nobody's post is missed
        ctx = Context(inferlet.get_model())
        ctx.fill(f"Task: {args.task}\nAgent {me[:8]}:")
        contribution = await ctx.generate_async(greedy, Stop(max_tokens=args.max_tokens))
        post = json.dumps({"from": me, "text": contribution})
        inferlet.broadcast(args.topic, post)

        peers = {}
        while len(peers) < args.agents - 1:
            message = json.loads(await asyncio.wait_for(topic.next_async(), args.timeout))
            if message["from"] != me and message["from"] not in peers:
                peers[message["from"]] = message["text"]
                inferlet.broadcast(args.topic, post)  # for a peer that subscribed after our post

    ctx.fill("".join(f"\nAgent {peer[:8]}:{text}" for peer, text in sorted(peers.items())) + "\nSummary:")
    summary = await ctx.generate_async(greedy, Stop(max_tokens=args.max_tokens))
    ctx.release()
    return json.dumps({"id": me, "contribution": contribution, "peers": peers, "summary": summary})
