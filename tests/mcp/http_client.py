"""/mcp over Streamable HTTP with the SDK's high-level Client in its default mode
(it probes server/discover and speaks the per-request 2026-07-28 protocol when
the server offers it): tools, campaigning, events, resources.

Env: CONCORD_MCP_URL, CONCORD_TOKEN / CONCORD_ID (a registered secondary),
CONCORD_ADMIN_TOKEN (must be refused: /mcp acts as one instance).
"""

from common import check, check_tool_list, env, err, http_client, log, main, ok


async def scenario():
    url, me_id = env("CONCORD_MCP_URL"), env("CONCORD_ID")
    async with http_client(url, env("CONCORD_TOKEN")) as c:
        log("negotiated protocol", c.session.protocol_version)
        await check_tool_list((await c.list_tools()).tools)
        me = ok(await c.call_tool("whoami", {}), "whoami")
        check(me["instance"] == me_id and not me["is_primary"], "a secondary at first", me)

        # Only the primary writes: refused, then campaign, then allowed with the
        # fence filled in.
        err(await c.call_tool("set_state", {"key": "model", "value": "k2"}), "fenced", "write before campaigning")
        grant = ok(await c.call_tool("campaign_primary", {}), "campaign_primary")
        check(grant["instance"] == me_id and grant["fence"] == grant["epoch"], "the grant", grant)
        me = ok(await c.call_tool("whoami", {}), "whoami after campaign")
        check(me["is_primary"] and me["fence"] == grant["fence"], "now primary with that fence", me)
        entry = ok(await c.call_tool("set_state", {"key": "model", "value": "k2"}), "set_state")
        check(entry["value"] == "k2", "written", entry)
        err(await c.call_tool("set_state", {"key": "model", "value": "x", "fence": grant["fence"] + 1}), "fenced", "a fence from the future")

        listed = ok(await c.call_tool("list_instances", {"role": "primary"}), "list_instances")
        check([i["id"] for i in listed["instances"]] == [me_id], "the only primary", listed)
        err(await c.call_tool("list_instances", {"role": "boss"}), "bad_request", "an unknown role")

        pub = ok(await c.call_tool("publish", {"topic": "anvil.notes", "data": "hello"}), "publish")
        page = ok(await c.call_tool("read_events", {"topics": "anvil.>", "from": pub["seq"] - 1}), "read_events")
        check([e["data"] for e in page["events"]] == ["hello"], "read back", page)

        res = await c.read_resource("concord://inbox")
        check('"messages"' in res.contents[0].text, "the inbox resource", res)

    # A token that is not an instance's session is refused before any tool runs.
    try:
        async with http_client(url, env("CONCORD_ADMIN_TOKEN")) as c:
            await c.call_tool("whoami", {})
        raise AssertionError("an admin token must not open /mcp")
    except AssertionError:
        raise
    except BaseException as e:  # noqa: BLE001 - the SDK raises its own error types
        log("admin token refused:", repr(e)[:200])


main(scenario)
