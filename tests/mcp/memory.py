"""remember / recall / forget and the concord://memory/{id} resource through
`concord mcp` bridges, against the hub's /v1/memories. Run only when the hub has
those routes.

Env: CONCORD_BIN, CONCORD_HUB, CONCORD_AGENT_TOKEN (agent token of CONCORD_ENTITY).
"""

from common import bridge, check, env, err, main, ok


async def scenario():
    entity = env("CONCORD_ENTITY")
    async with bridge(entity, "keeper", "--role", "primary") as lead, bridge(entity, "reader") as tab:
        a = ok(await lead.call_tool("whoami", {}), "whoami")
        check(a["is_primary"], "the keeper is primary", a)
        # The primary's default space is the entity's canonical memory, fenced for it.
        m = ok(await lead.call_tool("remember", {"text": "the kimi provider drops requests at 03:00", "kind": "learning", "tags": ["provider"]}), "remember")["memory"]
        check(m["space"] == f"entity:{entity}" and m["provenance"]["instance"] == a["instance"], "canonical, attributed", m)
        # A secondary cannot write canonical memory; its scratch is its own.
        err(await tab.call_tool("remember", {"text": "not mine to say", "space": "entity"}), "fenced", "a secondary writing canonical memory")
        scratch = ok(await tab.call_tool("remember", {"text": "tab scratch note about kimi"}), "remember scratch")["memory"]
        check(scratch["space"].startswith("instance:"), "a secondary's default space is its own", scratch)
        shared = ok(await tab.call_tool("remember", {"text": "kimi outage pattern", "space": "shared:providers"}), "remember shared")["memory"]

        hits = ok(await tab.call_tool("recall", {"query": "kimi provider drops", "spaces": ["entity"]}), "recall")
        check(m["id"] in [h["memory"]["id"] for h in hits["results"]], "the other instance recalls it", hits)
        hits = ok(await lead.call_tool("recall", {"query": "kimi", "limit": 10}), "recall everywhere")
        ids = [h["memory"]["id"] for h in hits["results"]]
        check(shared["id"] in ids and scratch["id"] not in ids, "shared is visible, another's scratch is not", ids)

        res = await tab.read_resource(f"concord://memory/{m['id']}")
        check("03:00" in res.contents[0].text, "the memory resource", res)

        ok(await lead.call_tool("forget", {"id": m["id"]}), "forget")
        hits = ok(await tab.call_tool("recall", {"query": "kimi provider drops", "spaces": ["entity"]}), "recall after forget")
        check(m["id"] not in [h["memory"]["id"] for h in hits["results"]], "forgotten", hits)
        err(await tab.call_tool("forget", {"id": "mem_01ARZ3NDEKTSV4RRFFQ69G5FAV"}), "not_found", "forgetting what does not exist")


main(scenario)
