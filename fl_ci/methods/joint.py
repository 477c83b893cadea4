"""Joint training, the upper bound: every seen class's real data at once.

Not a continual method: at each task the site trains on all rows of every class it
has received so far (`train_classes`), with plain cross-entropy over all classes.
It keeps old data, so it is not data-free.
"""

from __future__ import annotations

from fl_ci.methods.base import Method, SiteContext


class Joint(Method):
    """Cross-entropy on the real data of all classes seen so far (upper bound)."""

    name = "joint"
    data_free = False

    def train_classes(self, ctx: SiteContext) -> list[int]:
        return list(range(ctx.num_classes))
