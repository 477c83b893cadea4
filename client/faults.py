"""Test-only fault injection at a site (docs/reliability.md).

The run-config key `faults`, e.g. `"1:crash@2, 0:empty@3/0"`, makes site 1 raise at
server round 2 and site 0 see an empty partition at round 3's first attempt; `@*` is
every round. Kinds: `crash` (an uncaught exception: Flower turns it into an error
reply), `bad-labels` (half the site's labels become a class the server has not
announced), `empty` (no rows), `restart` (the site's store is deleted first, as on a
fresh machine), and the attacks on a reply (docs/reliability.md): `scale1000`,
`scale50` (the update multiplied), `sign-flip` (the update negated), `nan` (a NaN in
the weights), `claim` (10,000,000 examples claimed, the update x5).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from fl_ci.config import ConfigError
from fl_ci.data.base import ImageData
from fl_ci.site import SiteData

ATTACKS = ("scale1000", "scale50", "sign-flip", "nan", "claim")
FAULT_KINDS = ("crash", "bad-labels", "empty", "restart", *ATTACKS)
_FAULT = re.compile(r"(\d+):([a-z0-9-]+)@(\d+|\*)(?:/(\d+))?")
CLAIMED_EXAMPLES = 10_000_000


class InjectedCrash(Exception):
    """Raised by the `crash` test fault; deliberately not caught by the site."""


@dataclasses.dataclass(frozen=True)
class Fault:
    site: int
    kind: str
    server_round: int | None  # 1-based, as the server counts; None: every round
    attempt: int | None  # None: every attempt of that round


def parse_faults(spec: str) -> list[Fault]:
    """`SITE:KIND@ROUND[/ATTEMPT]`, comma-separated (the `faults` run-config key)."""
    faults = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        m = _FAULT.fullmatch(item)
        if m is None or m.group(2) not in FAULT_KINDS:
            raise ConfigError(
                f"run-config key 'faults': {item!r} is not SITE:KIND@ROUND[/ATTEMPT] "
                f"with KIND one of {', '.join(FAULT_KINDS)}"
            )
        attempt = None if m.group(4) is None else int(m.group(4))
        at = None if m.group(3) == "*" else int(m.group(3))
        faults.append(Fault(int(m.group(1)), m.group(2), at, attempt))
    return faults


def active_faults(spec: str, site: int, server_round: int, attempt: int) -> set[str]:
    """The fault kinds that apply to this site's reply now."""
    return {
        f.kind
        for f in parse_faults(spec)
        if f.site == site
        and f.server_round in (None, server_round)
        and f.attempt in (None, attempt)
    }


@dataclasses.dataclass
class FaultySite:
    """`data` whose training rows are empty or mislabelled (the data faults); the
    site's cached data itself is left untouched."""

    data: SiteData
    kinds: set[str]

    def __getattr__(self, name: str):
        return getattr(self.data, name)

    def train(self, task: int, classes: list[int] | None = None) -> ImageData:
        rows = self.data.train(task, classes)
        if "empty" in self.kinds:
            return rows.subset(torch.zeros(0, dtype=torch.long))
        labels = rows.labels.clone()
        labels[::2] = self.data.plan.seen(task)  # the next task's first class, or none
        return dataclasses.replace(rows, labels=labels)


def attack(
    kinds: set[str], sent: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], int | None]:
    """The reply a malicious site sends instead of `trained` (state dicts), and the
    example count it claims (None: its own)."""
    scale = {"scale1000": 1000.0, "scale50": 50.0, "sign-flip": -1.0, "claim": 5.0}
    out = dict(trained)
    for kind in kinds & set(scale):
        for key, value in trained.items():
            if value.is_floating_point():
                out[key] = sent[key] + scale[kind] * (value - sent[key])
    if "nan" in kinds:
        key = next(k for k, v in trained.items() if v.is_floating_point())
        out[key] = torch.full_like(trained[key], float("nan"))
    return out, CLAIMED_EXAMPLES if "claim" in kinds else None
