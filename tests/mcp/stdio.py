"""`concord mcp` over stdio, launched the way an MCP host launches a server: two
bridges of one entity, one primary. Registration, fencing, messages from one
bridge to the other, the work queue, and stale-fence errors.

Env: CONCORD_BIN, CONCORD_HUB, CONCORD_AGENT_TOKEN (an agent token of CONCORD_ENTITY).
"""

from common import bridge, check, check_tool_list, env, err, main, ok


async def scenario():
    entity = env("CONCORD_ENTITY")
    async with bridge(entity, "lead", "--role", "primary", "--capabilities", "plan") as lead, bridge(entity, "tab-2", "--capabilities", "build,test") as tab:
        await check_tool_list((await lead.list_tools()).tools)
        a = ok(await lead.call_tool("whoami", {}), "whoami lead")
        b = ok(await tab.call_tool("whoami", {}), "whoami tab")
        check(a["is_primary"] and a["label"] == "lead" and a["transport"] == "stdio", "the lead is primary", a)
        check(not b["is_primary"] and b["label"] == "tab-2" and b["capabilities"] == ["build", "test"], "the tab is a labelled secondary", b)
        check(a["entity"] == entity == b["entity"], "same entity", (a, b))

        # The primary's fence is filled in; the secondary is fenced out.
        ok(await lead.call_tool("set_state", {"key": "plan/current", "value": {"step": 1}}), "set_state by the primary")
        err(await tab.call_tool("set_state", {"key": "plan/current", "value": {"step": 9}}), "fenced", "set_state by a secondary")
        stale = err(await lead.call_tool("set_state", {"key": "plan/current", "value": 0, "fence": a["fence"] - 1}), "fenced", "a stale fence")
        check(stale["details"]["epoch"] == a["fence"], "the current epoch is in the error", stale)
        state = ok(await tab.call_tool("get_state", {}), "get_state")
        check([e["value"] for e in state["entries"]] == [{"step": 1}], "only the primary's write landed", state)
        held = err(await tab.call_tool("campaign_primary", {}), "primary_held", "campaigning while the lead holds it")
        check(a["instance"] in held["message"], "names the holder", held)

        # A message from one bridge, read in the other; to a capability too.
        sent = ok(await lead.call_tool("send_message", {"to": f"instance:{b['instance']}", "subject": "build it", "body": {"ref": "main"}}), "send to the tab")
        by_cap = ok(await lead.call_tool("send_message", {"to": "cap:test", "subject": "and test it"}), "send to cap:test")
        check(by_cap["delivered_to"] == [b["instance"]], "cap:test reaches the tab only", by_cap)
        inbox = ok(await tab.call_tool("read_inbox", {"wait_ms": 5000}), "read_inbox")
        subjects = [(m["id"], m["subject"], m["from"]["instance"]) for m in inbox["messages"]]
        check((sent["id"], "build it", a["instance"]) in subjects, "the direct message", subjects)
        check((by_cap["id"], "and test it", a["instance"]) in subjects, "the capability message", subjects)
        empty = ok(await lead.call_tool("read_inbox", {}), "the lead's inbox")
        check(empty["messages"] == [], "the lead got nothing", empty)

        # Work: the lead submits, the tab claims and completes; a second completion
        # with the same claim is stale.
        t = ok(await lead.call_tool("submit_task", {"queue": "builds", "payload": {"ref": "main"}, "requires": ["build"]}), "submit_task")["task"]
        none = ok(await lead.call_tool("claim_task", {"queues": ["builds"]}), "claim by the lead")
        check(none["tasks"] == [], "the lead lacks the build capability", none)
        got = ok(await tab.call_tool("claim_task", {"queues": ["builds"], "wait_ms": 5000, "lease_ms": 30000}), "claim by the tab")["tasks"]
        check([x["id"] for x in got] == [t["id"]], "the tab claimed it", got)
        done = ok(await tab.call_tool("complete_task", {"id": t["id"], "claim": got[0]["claim"], "result": {"artifact": "a.tgz"}}), "complete")
        check(done["state"] == "completed", "completed", done)
        err(await tab.call_tool("complete_task", {"id": t["id"], "claim": got[0]["claim"]}), "stale_claim", "completing twice")

        # A failed task goes back for a retry.
        t2 = ok(await lead.call_tool("submit_task", {"queue": "builds", "payload": 2, "max_attempts": 1}), "submit another")["task"]
        got2 = ok(await tab.call_tool("claim_task", {"queues": ["builds"], "wait_ms": 5000}), "claim another")["tasks"]
        check([x["id"] for x in got2] == [t2["id"]], "claimed the second", got2)
        failed = ok(await tab.call_tool("fail_task", {"id": t2["id"], "claim": got2[0]["claim"], "error": "disk full"}), "fail_task")
        check(failed["state"] == "dead" and failed["error"] == "disk full", "out of attempts: dead", failed)

        # complete_task with claim_next: the next task comes back with the completion.
        t3 = ok(await lead.call_tool("submit_task", {"queue": "builds", "payload": 3}), "submit a third")["task"]
        t4 = ok(await lead.call_tool("submit_task", {"queue": "builds", "payload": 4}), "submit a fourth")["task"]
        got3 = ok(await tab.call_tool("claim_task", {"queues": ["builds"]}), "claim the third")["tasks"]
        check([x["id"] for x in got3] == [t3["id"]], "claimed the third", got3)
        both = ok(await tab.call_tool("complete_task", {"id": t3["id"], "claim": got3[0]["claim"], "result": 3, "claim_next": {"queues": ["builds"]}}), "complete and claim next")
        check(both["state"] == "completed" and [x["id"] for x in both["next"]] == [t4["id"]], "completed the third and claimed the fourth", both)
        bad = err(await tab.call_tool("complete_task", {"id": t4["id"], "claim": both["next"][0]["claim"], "claim_next": {"queues": ["builds"], "max": 0}}), "bad_request", "claim_next with max 0")
        check(bad["details"]["field"] == "claim_next.max", "the hub names claim_next.max", bad)
        ok(await tab.call_tool("complete_task", {"id": t4["id"], "claim": both["next"][0]["claim"]}), "complete the fourth")

        prim = ok(await tab.call_tool("get_primary", {}), "get_primary")
        check(prim["primary"]["id"] == a["instance"], "the lead is the primary", prim)


main(scenario)
