"""`gpuctl fleet`: the hosts of the fleet this gpud belongs to (fleet mode; docs/fleet.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from gpuctl.context import App, output_option, pass_app, show
from gpuctl.output import Style, ago, cell, fields, table


def render_fleet(report: Mapping[str, Any], style: Style) -> str:
    """One row per host: URL, health, GPUs free/total per tier, sessions, version, last seen."""
    etcd = report.get("etcd") or {}
    rows = []
    for host in report.get("hosts") or []:
        tiers = host.get("gpus") or {}
        gpus = " ".join(f"{tier} {c.get('free', 0)}/{c.get('total', 0)} free" for tier, c in sorted(tiers.items()))
        name = f"{host.get('host_id')}{' (this host)' if host.get('self') else ''}"
        rows.append(
            [
                name,
                cell(host.get("url")),
                style.state(str(host.get("health", "?"))),
                gpus or "-",
                str(host.get("sessions", 0)),
                cell(host.get("version")),
                ago(host.get("last_seen")),
            ]
        )
    head = fields(
        [
            ("fleet", style.state(str(report.get("status", "?")))),
            ("this host", f"{report.get('host_id')} ({report.get('url')})"),
            ("etcd", f"{etcd.get('in_use')} ({len(etcd.get('endpoints') or [])} endpoint(s))"),
        ]
        + ([("problem", style.paint(str(report["reason"]), "red"))] if report.get("reason") else [])
    )
    return head + "\n\n" + table(["HOST", "URL", "HEALTH", "GPUS", "SESSIONS", "VERSION", "LAST SEEN"], rows)


@click.command()
@output_option
@pass_app
def fleet(app: App, fmt: str) -> None:
    """The fleet's hosts: GPUs per tier, sessions, health, last seen (fleet mode only)."""
    body = app.client().get("/api/fleet")
    show(app, fmt, body, render_fleet)
