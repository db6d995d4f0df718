"""Helpers shared by the MCP end-to-end scripts.

The scripts drive Concord with the official Python MCP SDK (a client nobody on
this project wrote), so they check the wire protocol as real MCP hosts speak it.
They are started by crates/concord/tests/it/mcp.rs, which starts the hub, registers
what the scenario needs and passes it in environment variables. A script exits 0
when every check held; a failed check raises, prints what it saw and exits 1.
"""

import json
import os
import sys
import tempfile
from contextlib import asynccontextmanager

from mcp import ClientSession
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

TOOLS = [
    "whoami",
    "list_instances",
    "get_primary",
    "campaign_primary",
    "get_state",
    "set_state",
    "publish",
    "read_events",
    "send_message",
    "read_inbox",
    "ack_message",
    "submit_task",
    "claim_task",
    "heartbeat_task",
    "complete_task",
    "fail_task",
    "remember",
    "recall",
    "forget",
    "dispatch",
    "report_observation",
    "breaker_status",
    "request_probe",
    "acquire_lease",
    "renew_lease",
    "release_lease",
    "list_leases",
]


def env(name):
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"{name} is not set (run me from crates/concord/tests/it/mcp.rs)")
    return value


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def check(cond, what, seen=None):
    if not cond:
        raise AssertionError(f"{what}; saw: {seen!r}")


def text(result):
    return "".join(getattr(c, "text", "") for c in result.content)


def ok(result, what):
    """The structured answer of a tool call that must have succeeded."""
    check(not result.is_error, f"{what} failed", text(result))
    data = result.structured_content
    if data is None:
        data = json.loads(text(result))
    return data


def err(result, code, what):
    """A tool error (isError) with the hub's code, not a protocol error."""
    check(result.is_error, f"{what} should have failed with {code}", text(result))
    check(text(result).startswith(code + ":"), f"{what}: text should start with {code}:", text(result))
    body = result.structured_content or {}
    check(body.get("error", {}).get("code") == code, f"{what}: structured error code", body)
    return body["error"]


async def check_tool_list(tools):
    names = [t.name for t in tools]
    for name in TOOLS:
        check(name in names, f"tool {name} listed", names)
    for t in tools:
        check(t.description and len(t.description) > 20, f"{t.name} has a description", t.description)
        check(t.input_schema.get("type") == "object", f"{t.name} takes an object", t.input_schema)
    set_state = next(t for t in tools if t.name == "set_state")
    props = set_state.input_schema.get("properties", {})
    for field in ("key", "value", "fence"):
        check(field in props, f"set_state has argument {field}", props)
    check(set(set_state.input_schema.get("required", [])) == {"key", "value"}, "set_state requires key and value", set_state.input_schema)


def http_transport(url, token):
    return streamable_http_client(url, http_client=create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}))


@asynccontextmanager
async def http_session(url, token):
    """A low-level ClientSession over Streamable HTTP (the initialize handshake)."""
    async with http_transport(url, token) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


def http_client(url, token):
    """The high-level Client (its default 'auto' mode negotiates per request)."""
    return Client(http_transport(url, token))


def bridge(entity, label, *extra):
    """A `concord mcp` bridge launched over stdio, as an MCP host launches it."""
    # A spool directory of its own, so no test replays another's (or a past run's) writes.
    spool = tempfile.mkdtemp(prefix="concord-spool-")
    args = ["mcp", "--entity", entity, "--label", label, "--hub", env("CONCORD_HUB"), "--token", env("CONCORD_AGENT_TOKEN"), "--spool-dir", spool, *extra]
    params = StdioServerParameters(command=env("CONCORD_BIN"), args=args, env={"CONCORD_LOG": "warn"})
    return Client(params)


def leaves(e):
    """The errors inside nested task-group exception groups."""
    if isinstance(e, BaseExceptionGroup):
        return [x for inner in e.exceptions for x in leaves(inner)]
    return [e]


def main(coro):
    import traceback

    import anyio

    try:
        anyio.run(coro)
    except BaseException as e:  # noqa: BLE001 - report anything and fail
        for leaf in leaves(e):
            traceback.print_exception(leaf, limit=-3)
            log(f"FAILED: {leaf!r}")
        sys.exit(1)
    print("OK", flush=True)
