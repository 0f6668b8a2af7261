"""Which entry point serves each backend name: the rule for reserved and duplicate names.

The entry-point name is the backend name. Discovery never depends on ``sys.path`` order:

- a **built-in** name (:data:`BUILTIN`: ``numpy``) is served only by the distribution that
  ships it (``dshal``); the same name registered by any other distribution is ignored and
  reported (``dshal info`` shows it under the built-in backend);
- a name registered by **two or more distributions** is loaded from none of them: the backend
  shows as ``conflict`` in ``dshal info``, naming every claimant, until all but one are
  uninstalled (loading either would make the choice depend on installation order).

The same distribution seen twice (e.g. on two ``sys.path`` entries) is one claim.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint

#: backend names shipped inside dshal itself -> the distribution that owns each
BUILTIN: dict[str, str] = {"numpy": "dshal"}


def _dist(ep: EntryPoint) -> tuple[str, str]:
    """(normalised name, "name version") of the distribution declaring ``ep``."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "", "(unknown distribution)"
    return re.sub(r"[-_.]+", "-", dist.name).lower(), f"{dist.name} {dist.version}"


@dataclass(frozen=True)
class Claim:
    """The outcome for one backend name: the entry point to load (``None``: none may load,
    see ``problem``) and notes on ignored claims."""

    name: str
    chosen: EntryPoint | None
    problem: str = ""
    notes: tuple[str, ...] = ()
    claimants: tuple[str, ...] = ()


def resolve(eps: Iterable[EntryPoint]) -> list[Claim]:
    """Apply the naming rule to every entry point of the group; one :class:`Claim` per name,
    sorted by name."""
    by_name: dict[str, dict[tuple[str, str], EntryPoint]] = {}
    for ep in eps:
        by_name.setdefault(ep.name, {}).setdefault((_dist(ep)[0], ep.value), ep)
    claims = []
    for name in sorted(by_name):
        found = list(by_name[name].values())
        owner = BUILTIN.get(name)
        if owner is not None:
            claims.append(_builtin(name, owner, found))
        elif len(found) == 1:
            claims.append(Claim(name, found[0]))
        else:
            listed = tuple(f"{_dist(ep)[1]} ({name} = {ep.value})" for ep in found)
            claims.append(Claim(
                name, None, f"registered by {len(found)} distributions: {'; '.join(listed)}. "
                "None is loaded (the choice would depend on installation order): uninstall "
                "all but one", claimants=listed))
    return claims


def _builtin(name: str, owner: str, found: list[EntryPoint]) -> Claim:
    own = [ep for ep in found if _dist(ep)[0] == owner]
    ignored = tuple(
        f"{_dist(ep)[1]} also registers {name} = {ep.value}: ignored (the built-in backend "
        f"name {name!r} is reserved for {owner})" for ep in found if _dist(ep)[0] != owner)
    if own:
        return Claim(name, own[0], notes=ignored)
    return Claim(name, None, f"the built-in backend {name!r} is not installed (only other "
                 f"distributions register the reserved name: reinstall {owner})", ignored)
