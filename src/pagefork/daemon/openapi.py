"""The control API described as an OpenAPI 3.1 document.

The daemon serves it at ``GET /openapi.json``; ``docs/openapi.json`` is the same document,
written by ``python -m pagefork.daemon.openapi > docs/openapi.json``. The tests check that
every route the daemon answers is described here (and nothing else), and that every example
request body is accepted by the daemon.

The API is served on a Unix socket: ``curl --unix-socket /run/pagefork.sock
http://localhost/templates``; the ``servers`` entry says so.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pagefork import __version__

#: The one place ids go in a path: one percent-encoded segment.
_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The template's or fork's id, percent-encoded as one path segment.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}


def _body(schema: dict[str, Any], examples: dict[str, Any], required: bool = True) -> Any:
    return {
        "required": required,
        "content": {
            "application/json": {
                "schema": schema,
                "examples": {k: {"value": v} for k, v in examples.items()},
            }
        },
    }


_STATE_WORDS = (
    "`live`: its VMM runs (or the caller's VMM is being served); `exited`: its VMM has exited "
    "or its page-server session ended, and the fork is held until it is released. A released "
    "fork is gone (DELETE /forks/{id}); so is a deleted template."
)

#: A template's, or one fork's, prefetch policy (both fields optional: none names the
#: daemon's default, before-resume).
_POLICY_FIELDS: dict[str, Any] = {
    "prefetch_policy": {
        "type": "string",
        "enum": ["before-resume", "stream"],
        "description": "How its forks' hot set goes in: all of it before the VMM resumes "
        "(`before-resume`, the default), or its first `prefetch_head` pages (first-touch "
        "order) before, the VMM resumed at once, and the rest streamed while the guest runs "
        "(`stream`).",
    },
    "prefetch_head": {
        "type": "integer",
        "minimum": 0,
        "maximum": 1 << 26,
        "description": "With `stream` (and required by it): hot pages installed before resume. "
        "A head as large as the hot set is a before-resume.",
    },
}

#: A fork's prefetch report (null until its hot set is asked for).
_PREFETCH_REPORT: dict[str, Any] = {
    "type": ["object", "null"],
    "description": "What its prefetch did. Warm-up and demand forks: `role`, `hot_pages` 0, "
    "`installed` 0. Prefetched forks, also: `policy`, `head`, `already_present`, `runs`, "
    "`ioctls`, `bytes`, `seconds`, `head_seconds` (what the resume waited for), "
    "`bridged_bytes`, `fetched_bytes`, `fetch_seconds`, and `before_resume` / "
    "`after_resume` (hot pages installed before the VMM resumed, and while its guest ran), "
    "`raced` (pages the guest faulted in before the stream reached them), `streaming` (true "
    "until the rest of a streamed hot set is in: the counts are then final), `stream_error` "
    "(why a stream ended early, if it did).",
    "properties": {
        "policy": {"type": "string", "enum": ["before-resume", "stream"]},
        "head": {"type": ["integer", "null"]},
        "installed": {"type": "integer"},
        "before_resume": {"type": "integer"},
        "after_resume": {"type": "integer"},
        "raced": {"type": "integer"},
        "streaming": {"type": "boolean"},
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What was wrong, one line."}},
    },
    "Template": {
        "type": "object",
        "description": "A template's record, with its forks counted by state. " + _STATE_WORDS,
        "required": ["id", "name", "kind", "mem_file", "mem_size", "page_size", "created"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string", "description": "A display name (no control characters)."},
            "kind": {"type": "string", "enum": ["firecracker", "kvm"]},
            "mem_file": {"type": "string", "description": "A path, or an s3:// URL."},
            "snapshot_path": {"type": "string"},
            "mem_size": {"type": "integer", "description": "Bytes of guest memory."},
            "page_size": {"type": "integer"},
            "hot_pages_path": {"type": "string"},
            "has_hot_pages": {"type": "boolean"},
            "created": {"type": "number", "description": "Unix seconds."},
            "last_used": {"type": ["number", "null"]},
            "owns_files": {"type": "boolean"},
            "parent": {"type": ["string", "null"]},
            "layers": {"type": "array", "items": {"type": "string"}},
            "share_memory": {
                "type": "boolean",
                "description": "Its forks' VMMs are mergeable by KSM (opt-in; docs/density.md).",
            },
            "note": {
                "type": "string",
                "description": "On creation with share_memory while KSM is off: one line saying "
                "so, with the command that turns it on (pagefork never does).",
            },
            "live_forks": {"type": "integer", "description": "Its forks in state `live`."},
            "exited_forks": {"type": "integer", "description": "Its forks in state `exited`."},
            "hot_pages": {
                "type": "integer",
                "description": "Pages in its hot set (GET /templates/{id} only).",
            },
            **{
                k: {
                    **v,
                    "type": [v["type"], "null"],
                    "description": v["description"] + " Null: the daemon's default.",
                }
                for k, v in _POLICY_FIELDS.items()
            },
        },
    },
    "TemplateList": {
        "type": "object",
        "required": ["templates", "errors"],
        "properties": {
            "templates": {"type": "array", "items": _ref("Template")},
            "errors": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Records that cannot be read, one line each.",
            },
        },
    },
    "NewTemplate": {
        "oneOf": [
            {
                "title": "A Firecracker snapshot",
                "type": "object",
                "required": ["id", "kind", "mem_file", "snapshot_path"],
                "properties": {
                    "id": {"type": "string"},
                    "kind": {"const": "firecracker"},
                    "mem_file": {"type": "string"},
                    "snapshot_path": {"type": "string"},
                    "page_size": {"type": "integer", "minimum": 4096, "default": 4096},
                    "copy": {"type": "boolean", "default": False},
                    "name": {"type": "string"},
                    "share_memory": {"type": "boolean", "default": False},
                    **_POLICY_FIELDS,
                },
            },
            {
                "title": "A built-in microVM template",
                "type": "object",
                "required": ["id", "kind"],
                "properties": {
                    "id": {"type": "string"},
                    "kind": {"const": "kvm"},
                    "mem_size_mib": {"type": "integer", "minimum": 4, "maximum": 3072},
                    "vcpus": {"type": "integer", "minimum": 1, "maximum": 64},
                    "variants": {"type": "integer", "minimum": 1, "maximum": 1024},
                    "working_set": {"type": "number", "minimum": 0, "maximum": 1},
                    "fork_share": {"type": "number", "minimum": 0, "maximum": 1},
                    "seed": {"type": "integer", "minimum": 0},
                    "name": {"type": "string"},
                    "share_memory": {"type": "boolean", "default": False},
                    **_POLICY_FIELDS,
                },
            },
            {
                "title": "A template pushed to object storage",
                "type": "object",
                "required": ["id", "source"],
                "properties": {
                    "id": {"type": "string"},
                    "source": {"type": "string", "description": "s3://BUCKET/PREFIX"},
                    "name": {"type": "string"},
                    "share_memory": {"type": "boolean", "default": False},
                    **_POLICY_FIELDS,
                },
            },
        ]
    },
    "Fork": {
        "type": "object",
        "required": ["fork", "template", "socket", "role", "state", "phase"],
        "properties": {
            "fork": {"type": "string"},
            "template": {"type": "string"},
            "socket": {"type": "string", "description": "The uffd socket its VMM connects to."},
            "role": {"type": "string", "enum": ["warmup", "prefetch", "demand"]},
            "state": {"type": "string", "enum": ["live", "exited"], "description": _STATE_WORDS},
            "phase": {
                "type": "string",
                "enum": ["starting", "live", "exited", "releasing"],
                "description": "Where the daemon's handling of its VMM stands.",
            },
            "driver": {"type": ["string", "null"]},
            "pid": {"type": ["integer", "null"]},
            "exit_status": {"type": ["integer", "null"]},
            "created": {"type": "number"},
            "prefetch": _PREFETCH_REPORT,
            "stats": _ref("ForkStats"),
            "memory": {
                "oneOf": [_ref("ForkMemory"), {"type": "null"}],
                "description": "Its VMM's memory now (GET /forks/{id}); null once it is gone.",
            },
        },
    },
    "ForkMemory": {
        "type": "object",
        "description": "A VMM's memory from /proc/PID/smaps_rollup, smaps and ksm_stat, in bytes; "
        "guest_*: guest RAM only (the userfaultfd-registered memory).",
        "properties": {
            "pid": {"type": "integer"},
            **{
                f"{k}_bytes": {"type": "integer"}
                for k in (
                    "rss",
                    "pss",
                    "private",
                    "shared",
                    "anonymous",
                    "swap",
                    "ksm",
                    "guest_size",
                    "guest_rss",
                    "guest_pss",
                    "guest_private",
                    "guest_ksm",
                )
            },
            "ksm_merging_pages": {"type": ["integer", "null"]},
            "ksm_zero_pages": {"type": ["integer", "null"]},
            "ksm_profit_bytes": {"type": ["integer", "null"]},
            "merge_any": {"type": ["boolean", "null"]},
        },
    },
    "ForkStats": {
        "type": "object",
        "description": "The page server's counters for one fork.",
        "properties": {
            "fork": {"type": "string"},
            "state": {"type": "string", "description": "The session: waiting, serving, ..."},
            "faults": {"type": "integer"},
            "pages_copied": {"type": "integer"},
            "zero_pages": {"type": "integer"},
            "prefetched_pages": {"type": "integer"},
            "misses": {"type": "integer"},
            "errors": {"type": "integer"},
            "latency_us": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    },
    "NewFork": {
        "type": "object",
        "required": ["template"],
        "properties": {
            "template": {"type": "string"},
            "fork": {"type": "string", "description": "Its id (default: generated)."},
            "vmm": {"type": "string", "enum": ["firecracker", "kvm"]},
            "options": {
                "type": "object",
                "description": "Driver options (see 'pagefork forks create --help').",
            },
            **{
                k: {**v, "description": v["description"] + " Overrides the template's."}
                for k, v in _POLICY_FIELDS.items()
            },
        },
    },
    "Timeout": {
        "type": "object",
        "properties": {"timeout": {"type": "number", "exclusiveMinimum": 0}},
    },
    "NewSnapshot": {
        "type": "object",
        "required": ["template"],
        "properties": {
            "template": {"type": "string", "description": "The child template's id."},
            "release": {"type": "boolean", "default": False},
        },
    },
}

_T = "/templates/{id}"
_F = "/forks/{id}"

PATHS: dict[str, Any] = {
    "/templates": {
        "get": {
            "summary": "List templates",
            "responses": {"200": _json(_ref("TemplateList"), "Every template.")},
        },
        "post": {
            "summary": "Create a template",
            "requestBody": _body(
                _ref("NewTemplate"),
                {
                    "firecracker": {
                        "id": "web",
                        "kind": "firecracker",
                        "mem_file": "/var/lib/snapshots/web/mem",
                        "snapshot_path": "/var/lib/snapshots/web/vmstate",
                    },
                    "kvm": {
                        "id": "vm",
                        "kind": "kvm",
                        "mem_size_mib": 16,
                        "prefetch_policy": "stream",
                        "prefetch_head": 256,
                    },
                    "store": {"id": "pushed", "source": "s3://my-bucket/templates/web"},
                },
            ),
            "responses": {"201": _json(_ref("Template"), "Created."), **_errors(400, 409)},
        },
    },
    _T: {
        "parameters": [_ID],
        "get": {
            "summary": "Show a template",
            "responses": {"200": _json(_ref("Template"), "The template."), **_errors(404)},
        },
        "delete": {
            "summary": "Delete a template (409 while it has forks, live or exited)",
            "responses": {
                "200": _json({"type": "object", "properties": {"deleted": {}}}, "Deleted."),
                **_errors(404, 409),
            },
        },
    },
    _T + "/rerecord": {
        "parameters": [_ID],
        "post": {
            "summary": "Make the template's next fork record a new hot set",
            "responses": {"200": _json({"type": "object"}, "Done."), **_errors(404)},
        },
    },
    _T + "/flatten": {
        "parameters": [_ID],
        "post": {
            "summary": "Merge a child template's layers into one mem-file",
            "responses": {"200": _json(_ref("Template"), "Flattened."), **_errors(404, 409)},
        },
    },
    "/forks": {
        "get": {
            "summary": "List the forks the daemon holds, live and exited",
            "responses": {
                "200": _json(
                    {"type": "object", "properties": {"forks": {"items": _ref("Fork")}}},
                    "Oldest first.",
                )
            },
        },
        "post": {
            "summary": "Create a fork (with `vmm`, the daemon restores and resumes its VMM)",
            "requestBody": _body(
                _ref("NewFork"),
                {
                    "socket only": {"template": "web", "fork": "web-1"},
                    "whole hot set before resume": {
                        "template": "web",
                        "fork": "web-2",
                        "prefetch_policy": "before-resume",
                    },
                    "built-in microVM": {
                        "template": "vm",
                        "fork": "vm-1",
                        "vmm": "kvm",
                        "options": {"snapshots": True},
                    },
                },
            ),
            "responses": {
                "201": _json(_ref("Fork"), "Created; `socket` is its uffd socket."),
                **_errors(400, 404, 409, 502),
            },
        },
    },
    _F: {
        "parameters": [_ID],
        "get": {
            "summary": "Show a fork and its counters",
            "responses": {"200": _json(_ref("Fork"), "The fork."), **_errors(404)},
        },
        "delete": {
            "summary": "Release a fork (stops its VMM if the daemon started it)",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "released": {},
                            "stats": _ref("ForkStats"),
                            "memory": {"oneOf": [_ref("ForkMemory"), {"type": "null"}]},
                        },
                    },
                    "Released; its final counters, and its VMM's memory just before.",
                ),
                **_errors(404),
            },
        },
    },
    _F + "/prefetch": {
        "parameters": [_ID],
        "post": {
            "summary": "Install the template's hot set (waits for the VMM's handshake)",
            "requestBody": _body(_ref("Timeout"), {"bounded": {"timeout": 10}}, required=False),
            "responses": {"200": _json({"type": "object"}, "Done."), **_errors(400, 404, 409)},
        },
    },
    _F + "/wait": {
        "parameters": [_ID],
        "post": {
            "summary": "Wait until the guest is done and its session ended",
            "requestBody": _body(_ref("Timeout"), {"bounded": {"timeout": 30}}, required=False),
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "vmm": {"description": "The driver's summary of the guest's run."},
                            "stats": _ref("ForkStats"),
                            "prefetch": _PREFETCH_REPORT,
                        },
                    },
                    "Done; its final counters and prefetch report.",
                ),
                **_errors(400, 404, 409),
            },
        },
    },
    _F + "/snapshot": {
        "parameters": [_ID],
        "post": {
            "summary": "Snapshot a live fork into a child template of its own",
            "requestBody": _body(_ref("NewSnapshot"), {"resume after": {"template": "vm-warm"}}),
            "responses": {
                "201": _json({"type": "object"}, "The child template and the figures."),
                **_errors(400, 404, 409, 502),
            },
        },
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (text format), pagefork_*",
            "responses": {
                "200": {
                    "description": "Per template: counters, forks by state "
                    "(pagefork_live_forks, pagefork_exited_forks), the fault latency histogram.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        },
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
        },
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI document of the control API."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pagefork daemon control API",
            "version": __version__,
            "description": "JSON over HTTP/1.1 on the daemon's Unix socket (mode 0600; "
            "--control, default /run/pagefork.sock). Every answer but /metrics is JSON, "
            'errors included ({"error": message}). Ids in paths are one percent-encoded '
            "segment. Also: 405 for a known route with another method (Allow lists the "
            "right ones), 413 for a body over 1 MiB, 501 for a method HTTP does not define. "
            + _STATE_WORDS,
        },
        "servers": [
            {
                "url": "http://localhost",
                "description": "Through the Unix socket: curl --unix-socket "
                "/run/pagefork.sock http://localhost/templates",
            }
        ],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "responses": {
                f"E{code}": _json(_ref("Error"), text)
                for code, text in (
                    (400, "A bad request: the message names the field, or the driver option."),
                    (404, "No such template or fork (also one deleted or released meanwhile)."),
                    (409, "The current state refuses it."),
                    (502, "The VMM failed."),
                )
            },
        },
    }


def render() -> str:
    """The document as ``docs/openapi.json`` holds it."""
    return json.dumps(document(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
