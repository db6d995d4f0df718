"""The hub goes away under a running `concord mcp` and comes back.

Talks to crates/concord/tests/it/mcp.rs line by line: prints `REGISTERED <id>`,
waits for `hub-down` on stdin, checks that reads answer "hub unreachable" and
that spoolable writes (publish, remember) answer "spooled", prints `UNREACHABLE-OK`, waits for `hub-up`, then polls whoami (bounded) until the bridge
has registered a new instance, checks that the spooled writes arrived once, and
prints `REREGISTERED <id>`.

Env: CONCORD_BIN, CONCORD_HUB, CONCORD_AGENT_TOKEN (an agent token of `crew`).
"""

import sys
import time

import anyio
from common import bridge, check, err, log, main, ok, text


async def line():
    return (await anyio.to_thread.run_sync(sys.stdin.readline)).strip()


async def scenario():
    async with bridge("crew", "survivor", "--ttl-ms", "1000") as c:
        me = ok(await c.call_tool("whoami", {}), "whoami")
        old = me["instance"]
        print("REGISTERED", old, flush=True)

        check(await line() == "hub-down", "told the hub is down")
        down = await c.call_tool("whoami", {})
        e = err(down, "unavailable", "whoami while the hub is away")
        check("unreachable" in e["message"] and "keeps retrying" in text(down), "says the hub is unreachable", text(down))
        err(await c.call_tool("get_state", {"key": "k"}), "unavailable", "a read while the hub is away")
        # Degraded mode: a spoolable write is kept and reported as spooled, not as an error.
        spooled = ok(await c.call_tool("publish", {"topic": "crew.x", "data": {"n": 1}}), "publish while the hub is away")
        check(spooled["spooled"] is True and "spooled, will be delivered" in spooled["message"], "publish says spooled", spooled)
        spooled = ok(await c.call_tool("remember", {"text": "learned offline", "space": "shared:crew"}), "remember while the hub is away")
        check(spooled["spooled"] is True, "remember says spooled", spooled)
        print("UNREACHABLE-OK", flush=True)

        check(await line() == "hub-up", "told the hub is back")
        deadline = time.monotonic() + 30
        while True:
            r = await c.call_tool("whoami", {})
            if not r.is_error and r.structured_content["instance"] != old:
                now = r.structured_content
                break
            check(time.monotonic() < deadline, "the bridge registers again within 30 s", text(r))
            await anyio.sleep(0.1)
        check(old in now["previous_instances"] and now["hub_reachable"], "whoami names the old instance", now)
        ok(await c.call_tool("publish", {"topic": "crew.back", "data": 1}), "tools work again")
        # The spooled writes arrived (replayed by the new session), each once, before crew.back.
        page = ok(await c.call_tool("read_events", {"topics": "crew.>", "from": 0}), "read_events")
        topics = [e["topic"] for e in page["events"]]
        check(topics == ["crew.x", "crew.back"], "the spooled event arrived once, in order", topics)
        found = ok(await c.call_tool("recall", {"query": "learned offline", "spaces": ["shared:crew"]}), "recall")
        check(len(found["results"]) == 1, "the spooled memory arrived once", found)
        log("re-registered", old, "->", now["instance"])
        print("REREGISTERED", now["instance"], flush=True)


main(scenario)
