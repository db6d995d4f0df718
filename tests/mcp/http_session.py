"""/mcp over Streamable HTTP with the SDK's low-level ClientSession (initialize
handshake): tools, fencing, messages between two instances, the work queue,
resources and bad input.

Env: CONCORD_MCP_URL, CONCORD_ENTITY, CONCORD_PRIMARY_TOKEN / CONCORD_PRIMARY_ID
(a registered primary), CONCORD_OTHER_TOKEN / CONCORD_OTHER_ID (a secondary).
"""

from common import check, check_tool_list, env, err, http_session, log, main, ok, text
from mcp.shared.exceptions import MCPError


async def scenario():
    url, entity = env("CONCORD_MCP_URL"), env("CONCORD_ENTITY")
    primary_id, other_id = env("CONCORD_PRIMARY_ID"), env("CONCORD_OTHER_ID")
    async with http_session(url, env("CONCORD_PRIMARY_TOKEN")) as p, http_session(url, env("CONCORD_OTHER_TOKEN")) as o:
        await check_tool_list((await p.list_tools()).tools)

        me = ok(await p.call_tool("whoami", {}), "whoami")
        check(me["instance"] == primary_id and me["entity"] == entity, "whoami names the token's instance", me)
        check(me["is_primary"] and me["fence"] == me["epoch"], "the primary knows its fence", me)
        check(me["transport"] == "streamable-http", "whoami says the transport", me)
        fence = me["fence"]
        them = ok(await o.call_tool("whoami", {}), "whoami (other)")
        check(them["instance"] == other_id and not them["is_primary"] and them["fence"] is None, "the secondary", them)

        # Fencing: the primary's fence is filled in; a stale one is a tool error.
        entry = ok(await p.call_tool("set_state", {"key": "deploy/status", "value": {"color": "green"}}), "set_state")
        check(entry["revision"] >= 1 and entry["updated_by"] == primary_id, "state written by the primary", entry)
        stale = err(await p.call_tool("set_state", {"key": "deploy/status", "value": 1, "fence": fence - 1}), "fenced", "stale fence")
        check(stale["details"]["epoch"] == fence, "the fenced error carries the current epoch", stale)
        err(await o.call_tool("set_state", {"key": "deploy/status", "value": 2}), "fenced", "a secondary's write")
        got = ok(await o.call_tool("get_state", {"key": "deploy/status"}), "get_state")
        check(got["value"] == {"color": "green"}, "the refused writes changed nothing", got)
        primary = ok(await o.call_tool("get_primary", {}), "get_primary")
        check(primary["primary"]["id"] == primary_id and not primary["you_are_primary"], "get_primary", primary)

        # Bad arguments name the argument; the hub's own 400s name the field too.
        bad = err(await p.call_tool("set_state", {"key": "k", "value": 1, "fence": "three"}), "bad_request", "fence as a string")
        check("`fence`" in bad["message"] and bad["details"]["field"] == "fence", "the argument is named", bad)
        bad = err(await p.call_tool("publish", {"topic": "a..b"}), "bad_request", "a bad topic")
        check(bad["details"]["field"] == "topic", "the hub names the field", bad)
        err(await p.call_tool("publish", {"topic": "x", "dta": 1}), "bad_request", "an unknown argument")
        err(await p.call_tool("publish", {"topic": "sys.fake", "data": 1}), "forbidden", "publishing on the hub's own topics")
        try:
            await p.call_tool("no_such_tool", {})
            raise AssertionError("an unknown tool should be a protocol error")
        except MCPError as e:
            log("unknown tool:", e)

        # Messages: one instance writes, the other reads and acks.
        sent = ok(await p.call_tool("send_message", {"to": f"instance:{other_id}", "subject": "hello", "body": {"n": 1}, "ack_required": True}), "send_message")
        check(sent["delivered_to"] == [other_id], "delivered to the other instance", sent)
        inbox = ok(await o.call_tool("read_inbox", {"wait_ms": 5000, "unacked_only": True}), "read_inbox")
        msgs = [m for m in inbox["messages"] if m["id"] == sent["id"]]
        check(len(msgs) == 1 and msgs[0]["body"] == {"n": 1} and msgs[0]["from"]["instance"] == primary_id, "the message arrived", inbox)
        ok(await o.call_tool("ack_message", {"id": sent["id"]}), "ack_message")
        after = ok(await o.call_tool("read_inbox", {"unacked_only": True}), "read_inbox after ack")
        check(all(m["id"] != sent["id"] for m in after["messages"]), "acked messages leave the unacked view", after)
        err(await p.call_tool("ack_message", {"id": sent["id"]}), "not_found", "acking someone else's message")

        # Work queue: submit, claim, heartbeat, complete; completing twice is a stale claim.
        task = ok(await p.call_tool("submit_task", {"queue": "mcp-jobs", "payload": {"build": 7}, "priority": 5}), "submit_task")["task"]
        claimed = ok(await o.call_tool("claim_task", {"queues": ["mcp-jobs"], "wait_ms": 5000}), "claim_task")["tasks"]
        check(len(claimed) == 1 and claimed[0]["id"] == task["id"] and claimed[0]["payload"] == {"build": 7}, "claimed the task", claimed)
        claim = claimed[0]["claim"]
        ok(await o.call_tool("heartbeat_task", {"id": task["id"], "claim": claim, "progress": {"pct": 50}}), "heartbeat_task")
        done = ok(await o.call_tool("complete_task", {"id": task["id"], "claim": claim, "result": {"ok": True}}), "complete_task")
        check(done["state"] == "completed" and done["result"] == {"ok": True}, "completed", done)
        err(await o.call_tool("complete_task", {"id": task["id"], "claim": claim, "result": 2}), "stale_claim", "completing twice")
        bad = err(await o.call_tool("fail_task", {"id": task["id"], "claim": "bogus"}), "bad_request", "failing with a malformed claim")
        check(bad["details"]["field"] == "claim", "the hub names the claim", bad)

        # Events.
        pub = ok(await p.call_tool("publish", {"topic": "crew.mcp", "data": {"hi": 1}}), "publish")
        page = ok(await o.call_tool("read_events", {"topics": "crew.*", "from": pub["seq"] - 1, "wait_ms": 2000}), "read_events")
        check([e["data"] for e in page["events"]] == [{"hi": 1}], "the event", page)
        check(page["events"][0]["source"]["instance"] == primary_id, "attributed to the publisher", page)

        # Resources.
        listed = [r.uri for r in (await p.list_resources()).resources]
        check("concord://instances" in listed and "concord://inbox" in listed, "fixed resources", listed)
        templates = [t.uri_template for t in (await p.list_resource_templates()).resource_templates]
        check("concord://entity/{name}/state" in templates and "concord://memory/{id}" in templates, "templates", templates)
        res = await p.read_resource(f"concord://entity/{entity}/state")
        check('"deploy/status"' in res.contents[0].text, "the state resource", res)
        res = await o.read_resource("concord://instances")
        check(primary_id in res.contents[0].text and other_id in res.contents[0].text, "the instances resource", res)
        try:
            await p.read_resource("concord://nowhere")
            raise AssertionError("an unknown resource should be an error")
        except MCPError as e:
            log("unknown resource:", e)
        log("http session scenario done:", text(await p.call_tool("get_primary", {})))


main(scenario)
