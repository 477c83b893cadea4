"""Check every site's reply before any strategy sees it.

Flower's strategies check a reply's structure only, never its values: one NaN makes
FedAvg's model NaN, one update scaled by 1e6 ruins it, a site claiming 1e12 examples
takes over (../shared/docs/reliability-and-metrics.md). A reply that fails any check
here is left out of aggregation and logged with the site and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from fl_ci_flower import protocol as P

MAX_EXAMPLES = 10**8  # far above any hospital's share of a task, far below 1e12


@dataclass
class Rejected:
    site: int | str
    reason: str


def site_of(reply: Message, known: dict[int, int] | None = None) -> int | str:
    """The site number a reply reports, else the one its node reported earlier
    (`known`: node id -> site, e.g. for an error reply), else its node id."""
    if not reply.has_error() and P.METRICS in reply.content.metric_records:
        site = reply.content[P.METRICS].get(P.SITE)
        if isinstance(site, (int, float)) and not isinstance(site, bool):
            return int(site)
    node = reply.metadata.src_node_id
    if known and node in known:
        return known[node]
    return f"node {node}"


def short_error(reason: str, limit: int = 300) -> str:
    """The message of an error reply without the runtime's traceback (Ray wraps a
    site's exception as '... Message: <text>'>')."""
    text = reason.rsplit("Message: ", 1)[-1].strip().removesuffix("'>").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    text = lines[-1].strip() if lines else reason.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_reply(
    reply: Message,
    sent: ArrayRecord,
    *,
    announced_classes: int,
    max_examples: int = MAX_EXAMPLES,
) -> str | None:
    """The reason `reply` must not be aggregated, or None if it is sound."""
    if reply.has_error():
        return f"site error: {short_error(reply.error.reason)}"
    content = reply.content
    if P.ARRAYS not in content.array_records or P.METRICS not in content.metric_records:
        return "reply lacks the 'arrays' or 'metrics' record"
    metrics = content[P.METRICS]
    if P.PROBLEM in content.config_records:
        return f"site reported: {content[P.PROBLEM].get(P.REASON, 'unknown problem')}"
    n = metrics.get(P.NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return f"example count {n!r} is not a positive number"
    if n > max_examples:
        return f"example count {n} exceeds the plausible maximum {max_examples}"
    classes = metrics.get(P.NUM_CLASSES)
    if classes is not None and int(classes) != announced_classes:
        return f"model has {classes} classes, the server announced {announced_classes}"
    held = metrics.get(P.CLASSES)
    if held is not None:
        # a site whose data names a class the server never announced trained its
        # head on labels the global model does not have
        held = held if isinstance(held, list) else [held]
        unknown = [
            c
            for c in held
            if not (float(c).is_integer() and 0 <= c < announced_classes)
        ]
        if unknown:
            return (
                f"site's data holds classes {unknown[:5]} the server did not announce "
                f"(announced 0..{announced_classes - 1})"
            )
    arrays = content[P.ARRAYS]
    if set(arrays.keys()) != set(sent.keys()):
        missing = sorted(set(sent.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(sent.keys()))
        return f"array keys differ (missing {missing[:3]}, extra {extra[:3]})"
    for key, array in arrays.items():
        ref = sent[key]
        if tuple(array.shape) != tuple(ref.shape) or array.dtype != ref.dtype:
            return (
                f"array '{key}' is {array.dtype}{list(array.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
        values = array.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"array '{key}' holds NaN or Inf"
    return None


def update_norm(reply: Message, sent: ArrayRecord) -> float:
    """L2 norm of (returned - sent) over the float arrays."""
    total = 0.0
    for key, array in reply.content[P.ARRAYS].items():
        new = array.numpy()
        if new.dtype.kind != "f":
            continue
        diff = new.astype(np.float64) - sent[key].numpy().astype(np.float64)
        total += float((diff * diff).sum())
    return math.sqrt(total)


def screen_replies(
    replies: list[Message],
    sent: ArrayRecord,
    *,
    announced_classes: int,
    max_norm_ratio: float,
    known_sites: dict[int, int] | None = None,
) -> tuple[list[Message], list[Rejected]]:
    """Split replies into sound ones and rejections (site, reason); `known_sites`
    (node id -> site) names the site of an error reply."""
    good: list[Message] = []
    rejected: list[Rejected] = []
    for reply in replies:
        reason = check_reply(reply, sent, announced_classes=announced_classes)
        if reason:
            rejected.append(Rejected(site_of(reply, known_sites), reason))
        else:
            good.append(reply)
    if len(good) >= 3 and max_norm_ratio > 0:
        # an update far larger than the round's median is a scaled or broken one
        norms = [update_norm(r, sent) for r in good]
        median = float(np.median(norms))
        kept = []
        for reply, norm in zip(good, norms, strict=True):
            if median > 0 and norm > max_norm_ratio * median:
                rejected.append(
                    Rejected(
                        site_of(reply),
                        f"update norm {norm:.3g} is over {max_norm_ratio}x the round's "
                        f"median {median:.3g}",
                    )
                )
            else:
                kept.append(reply)
        good = kept
    return good, rejected
