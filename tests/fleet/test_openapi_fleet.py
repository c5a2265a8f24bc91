"""docs/openapi.yaml names every error code fleet mode answers with, and every route fleet mode forwards documents
the statuses forwarding adds (403 fleet_key_invalid, 410 host_lost, 503 fleet_host_unreachable)."""

from __future__ import annotations

import re

import yaml

from tests.daemonproc import REPO

SPEC = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
FLEET_SOURCES = [*sorted((REPO / "gpud" / "fleet").glob("*.py")), *sorted((REPO / "gpud" / "api").glob("fleet*.py"))]
# code="..." of a domain error, or error_response(<status>, "<code>", ...)
CODE_RE = re.compile(r'code="([a-z_]+)"|error_response\(\s*\d+,\s*"([a-z_]+)"')


def fleet_codes() -> set[str]:
    """Every error code the fleet modules raise or answer with."""
    found = set()
    for path in FLEET_SOURCES:
        for match in CODE_RE.finditer(path.read_text()):
            found.add(match.group(1) or match.group(2))
    return found


def test_every_fleet_error_code_is_in_the_document() -> None:
    documented = SPEC["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    listed = documented["x-gpud-fleet-codes"]
    codes = fleet_codes()
    assert {"host_lost", "fleet_key_invalid", "fleet_host_unreachable"} <= codes, codes
    assert codes <= set(listed), f"undocumented fleet error codes: {sorted(codes - set(listed))}"
    expected = {"host_lost": "410", "fleet_key_invalid": "403", "fleet_host_unreachable": "503"}
    for code, status in expected.items():
        assert listed[code].startswith(status), (code, listed[code])


def test_every_forwarded_route_documents_what_forwarding_may_answer() -> None:
    forwarded = [
        path
        for path, item in SPEC["paths"].items()
        if item.get("x-gpud-app") != "admin" and ("{session_id}" in path or "{task_id}" in path)
    ] + ["/api/tasks/submit"]
    assert len(forwarded) >= 5, forwarded
    for path in forwarded:
        for method, operation in SPEC["paths"][path].items():
            if method in ("get", "post", "delete", "put", "patch"):
                missing = {"403", "410", "503"} - set(operation["responses"])
                assert not missing, f"{method.upper()} {path} does not document {sorted(missing)}"
