"""Fine-tuning: cross-entropy on the new classes' data only (the lower bound)."""

from __future__ import annotations

from fl_ci.methods.base import Method


class FineTune(Method):
    """Plain cross-entropy on the current task's real data; forgets old classes."""

    name = "finetune"
