"""Check every site's reply before any strategy sees it.

Flower's strategies check a reply's structure only, never its values: one NaN makes
FedAvg's model NaN, one update scaled by 1e6 ruins it, a site claiming 1e12 examples
takes over (../shared/docs/reliability-and-metrics.md). A reply that fails any check
here is left out of aggregation and logged with the site and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from fl_ci_flower import protocol as P

MAX_EXAMPLES = 10**8  # far above any hospital's share of a task, far below 1e12


@dataclass
class Rejected:
    site: int | str
    reason: str
    kind: str = "screen"  # "problem": the site said so or failed; "screen": rejected


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


@dataclass
class ScreenMemory:
    """What the screen keeps across rounds: references that no single site sets.

    `norms` are the update norms accepted in earlier rounds, apart for a task's first
    round (new head rows make those larger) and the rest; `claims` the example counts
    accepted earlier; `first_claim` each site's count at its first accepted round of
    a task, which bounds its weight for the rest of the task.
    """

    norms: dict[bool, list[float]] = field(
        default_factory=lambda: {True: [], False: []}
    )
    claims: list[float] = field(default_factory=list)
    # the last screened round's largest accepted update over the model's own norm
    # (federation.max_update_ratio's margin; nan when none was accepted)
    update_ratio: float = math.nan
    first_claim: dict[tuple[int, int | str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScreenPolicy:
    """The screen's tolerances (federation.* knobs; 0 switches a test off)."""

    max_norm_ratio: float = 10.0  # x the median of the other or earlier norms
    max_update_ratio: float = 10.0  # x the global model's own norm
    max_count_ratio: float = 10.0  # x the other or earlier example counts


def model_norm(sent: ArrayRecord) -> float:
    """L2 norm of the global model's float arrays."""
    total = 0.0
    for key in sent.keys():
        values = sent[key].numpy()
        if values.dtype.kind == "f":
            total += float(np.square(values.astype(np.float64)).sum())
    return math.sqrt(total)


def screen_replies(
    replies: list[Message],
    sent: ArrayRecord,
    *,
    announced_classes: int,
    max_norm_ratio: float = 10.0,
    known_sites: dict[int, int] | None = None,
    memory: ScreenMemory | None = None,
    policy: ScreenPolicy | None = None,
    task: int = 0,
    first_round: bool = True,
) -> tuple[list[Message], list[Rejected]]:
    """Split replies into sound ones and rejections (site, reason); `known_sites`
    (node id -> site) names the site of an error reply.

    Beyond each reply's own checks, an update's size and a claimed example count are
    judged against references one site cannot move: the global model's own norm, the
    norms and counts accepted in earlier rounds (`memory`), and the other replies when
    there are three or more (norms; counts when there are two or more). The reason
    names the reference that rejected it. `memory` learns the accepted values.
    """
    policy = policy or ScreenPolicy(max_norm_ratio=max_norm_ratio)
    good: list[Message] = []
    rejected: list[Rejected] = []
    for reply in replies:
        reason = check_reply(reply, sent, announced_classes=announced_classes)
        if reason:
            kind = (
                "problem"
                if reply.has_error() or P.PROBLEM in (reply.content.config_records)
                else "screen"
            )
            rejected.append(Rejected(site_of(reply, known_sites), reason, kind))
        else:
            good.append(reply)
    if memory is not None:
        memory.update_ratio = math.nan
    if not good:
        return good, rejected
    norms = [update_norm(r, sent) for r in good]
    claims = [float(r.content[P.METRICS][P.NUM_EXAMPLES]) for r in good]
    earlier_norms = memory.norms[first_round] if memory else []
    earlier_claims = memory.claims if memory else []
    weights = model_norm(sent)
    round_median = float(np.median(norms)) if len(good) >= 3 else 0.0
    kept, kept_norms, kept_claims = [], [], []
    for i, reply in enumerate(good):
        norm, claim = norms[i], claims[i]
        others = claims[:i] + claims[i + 1 :]
        reason = None
        r = policy.max_norm_ratio
        if r > 0 and round_median > 0 and norm > r * round_median:
            reason = f"update norm {norm:.3g} is over {r}x the round's median {round_median:.3g}"
        elif r > 0 and earlier_norms and norm > r * float(np.median(earlier_norms)):
            ref = float(np.median(earlier_norms))
            reason = (
                f"update norm {norm:.3g} is over {r}x the median {ref:.3g} of the "
                f"{len(earlier_norms)} norms accepted in earlier rounds"
            )
        elif (
            policy.max_update_ratio > 0
            and weights > 0
            and (norm > policy.max_update_ratio * weights)
        ):
            reason = (
                f"update norm {norm:.3g} is over {policy.max_update_ratio}x the global "
                f"model's own norm {weights:.3g} (federation.max_update_ratio)"
            )
        c = policy.max_count_ratio
        if reason is None and c > 0:
            if others and claim > c * float(np.median(others)):
                reason = (
                    f"example count {claim:.0f} is over {c}x the other sites' median "
                    f"{float(np.median(others)):.0f}"
                )
            elif (
                not others
                and earlier_claims
                and (claim > c * float(np.median(earlier_claims)))
            ):
                reason = (
                    f"example count {claim:.0f} is over {c}x the median "
                    f"{float(np.median(earlier_claims)):.0f} of the counts accepted in "
                    "earlier rounds"
                )
        if reason:
            rejected.append(Rejected(site_of(reply), reason, "screen"))
        else:
            kept.append(reply)
            kept_norms.append(norm)
            kept_claims.append(claim)
    if memory is not None:
        memory.norms[first_round] += kept_norms
        memory.claims += kept_claims
        if kept_norms and weights > 0:
            memory.update_ratio = max(kept_norms) / weights
    return kept, rejected


def bounded_weights(
    replies: list[Message],
    *,
    task: int,
    memory: ScreenMemory | None = None,
    max_share: float = 1.0,
) -> list[float]:
    """Each sound reply's FedAvg weight: its claimed example count, never above the
    count it claimed at its first accepted round of the task (a site may not raise
    its claim later), and with `max_share` < 1 no site above that share of the round
    when two or more reply."""
    weights = []
    for reply in replies:
        claim = float(reply.content[P.METRICS][P.NUM_EXAMPLES])
        if memory is not None:
            key = (task, site_of(reply))
            first = memory.first_claim.setdefault(key, claim)
            claim = min(claim, first)
        weights.append(claim)
    if max_share < 1 and len(weights) >= 2:
        for _ in range(len(weights)):  # clipping one can push another over: repeat
            total = sum(weights)
            over = [i for i, w in enumerate(weights) if w > max_share * total + 1e-9]
            if not over:
                break
            for i in over:
                rest = total - weights[i]
                weights[i] = max_share / (1 - max_share) * rest
    return weights
