"""Ids as people type them: a full id, or a unique prefix of one (tables show ids cut to 12 characters).

The daemon is asked for the id as given first, so a full id costs nothing extra; only when it answers "not
found" does gpuctl list the sessions (or tasks) and look for the one id that begins with what was given.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from gpuctl.client import ApiError, Client, ClientError, resolve_socket

if TYPE_CHECKING:  # imported when completing only: every other run skips its import
    from click.shell_completion import CompletionItem

T = TypeVar("T")


@dataclass(frozen=True)
class Kind:
    """Where a kind of id is listed, and the error codes meaning the daemon does not know one."""

    name: str
    plural: str
    field: str
    not_found: frozenset[str]

    @property
    def path(self) -> str:
        """The list route."""
        return f"/api/{self.plural}"


SESSION = Kind("session", "sessions", "session_id", frozenset({"session_not_found"}))
TASK = Kind("task", "tasks", "task_id", frozenset({"task_not_found", "not_found"}))
# How many candidates an ambiguous prefix lists.
SHOWN_CANDIDATES = 10
# A shell waits for completion: a daemon that does not answer quickly gets no say.
COMPLETION_TIMEOUT = 2.0


class AmbiguousId(ClientError):
    """The prefix begins more than one id: gpuctl will not guess which one was meant."""

    def __init__(self, kind: Kind, given: str, candidates: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(f"ambiguous {kind.name} id {given!r}: {len(candidates)} {kind.plural} begin with it")
        self.kind = kind
        self.given = given
        self.candidates = list(candidates)

    def lines(self) -> list[str]:
        """One line per candidate (full id, model/preset, state), then how many more there are."""
        shown = []
        for item in self.candidates[:SHOWN_CANDIDATES]:
            state = item.get("state") or item.get("status") or "?"
            shown.append(f"  {item.get(self.kind.field)}  {item.get('model_id')}/{item.get('task_preset')}  {state}")
        if len(self.candidates) > SHOWN_CANDIDATES:
            shown.append(f"  ... and {len(self.candidates) - SHOWN_CANDIDATES} more")
        return shown


def expand(client: Client, kind: Kind, given: str) -> str | None:
    """The one known id equal to `given` or beginning with it; None when there is none; AmbiguousId for several."""
    items = client.get(kind.path).get(kind.plural) or []
    matches = [item for item in items if str(item.get(kind.field, "")).startswith(given)]
    ids = [str(item[kind.field]) for item in matches]
    if given in ids:
        return given
    if len(ids) > 1:
        raise AmbiguousId(kind, given, matches)
    return ids[0] if ids else None


def with_id(client: Client, kind: Kind, given: str, action: Callable[[str], T]) -> T:
    """`action(id)`; if the daemon does not know `given`, `action` of the one full id that `given` begins."""
    try:
        return action(given)
    except ApiError as exc:
        if exc.status != 404 or exc.code not in kind.not_found or not given:
            raise
        full = expand(client, kind, given)
        if full is None or full == given:
            raise
        return action(full)


def started(items: Iterator[T]) -> Iterator[T]:
    """Begin a lazy stream now, so that the request's error (an unknown id) is raised here and not at first use."""
    try:
        first = next(items)
    except StopIteration:
        return iter(())
    return itertools.chain([first], items)


def completer(kind: Kind) -> Callable[[click.Context, click.Parameter, str], list[CompletionItem]]:
    """Shell completion of a session or task id: the daemon's ids beginning with what was typed. Completion never
    fails: without a daemon it offers nothing."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        from click.shell_completion import CompletionItem

        socket_flag = ctx.find_root().params.get("socket_path")
        try:
            choice = resolve_socket(socket_flag, os.environ)
            items = Client(choice.path, timeout=COMPLETION_TIMEOUT).get(kind.path).get(kind.plural) or []
            return [
                CompletionItem(str(item[kind.field]), help=_summary(item))
                for item in items
                if str(item.get(kind.field, "")).startswith(incomplete)
            ]
        except Exception:  # a shell's completion must never print a traceback
            return []

    return complete


def _summary(item: Mapping[str, Any]) -> str:
    state = item.get("state") or item.get("status") or "?"
    return f"{item.get('model_id')}/{item.get('task_preset')} {state}"
