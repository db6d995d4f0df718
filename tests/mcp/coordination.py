"""/mcp tools of dispatch, circuit breakers and leases, through the SDK's ClientSession
helper: a dispatch answered by a peer the Rust side runs, a breaker tripped by
observations and probed once, leases that conflict and are released.

Env: CONCORD_MCP_URL, CONCORD_TOKEN / CONCORD_ID (a labelled secondary of `crew`),
CONCORD_OTHER_TOKEN (another labelled instance of `crew`).
"""

from common import check, env, err, http_client, main, ok


async def scenario():
    url = env("CONCORD_MCP_URL")
    async with http_client(url, env("CONCORD_TOKEN")) as me, http_client(url, env("CONCORD_OTHER_TOKEN")) as other:
        # Dispatch: the peer (a `concord work dispatch.review` process) answers.
        d = ok(await me.call_tool("dispatch", {
            "command": "review", "payload": {"pr": 7}, "quorum": "any",
            "select": {"capabilities": ["review"]},
            "reducer": {"kind": "majority", "path": "/verdict"}, "timeout_ms": 20000,
        }), "dispatch")
        check(d["state"] == "completed" and d["result"]["value"] == "approve", "the reduced answer", d)
        err(await me.call_tool("dispatch", {"command": "review", "quorum": "multi", "min": 3, "max": 2}), "bad_request", "min > max")

        # Breakers: errors from two instances trip it; one probe at a time.
        for c in (me, other):
            for _ in range(3):
                ok(await c.call_tool("report_observation", {"subject": "provider:kimi/k2p5", "outcome": "error", "latency_ms": 900}), "observe")
        b = ok(await me.call_tool("breaker_status", {"subject": "provider:kimi/k2p5"}), "breaker_status")
        check(b["state"] == "open", "tripped", b)
        listed = ok(await me.call_tool("breaker_status", {"state": "open"}), "breaker list")
        check("provider:kimi/k2p5" in str(listed), "listed as open", listed)
        err(await me.call_tool("report_observation", {"subject": "provider:x", "outcome": "maybe"}), "bad_request", "an unknown outcome")

        # Leases: exclusive globs conflict, shared ones do not; release frees them.
        mine = ok(await me.call_tool("acquire_lease", {"resource": "repo:/src/**", "ttl_ms": 60000, "reason": "refactor"}), "acquire")
        lease = mine.get("lease", mine)
        err(await other.call_tool("acquire_lease", {"resource": "repo:/src/a.rs", "ttl_ms": 60000}), "lease_conflict", "an overlapping exclusive lease")
        ok(await me.call_tool("renew_lease", {"id": lease["id"], "ttl_ms": 120000}), "renew")
        held = ok(await other.call_tool("list_leases", {}), "list_leases")
        check(lease["id"] in str(held), "listed", held)
        ok(await me.call_tool("release_lease", {"id": lease["id"]}), "release")
        ok(await other.call_tool("acquire_lease", {"resource": "repo:/src/a.rs", "ttl_ms": 60000}), "acquire after release")


main(scenario)
