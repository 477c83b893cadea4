"""Growable classifier heads for class-incremental learning.

Both heads keep their weight as two Parameters, `old_weight` [n_old, D] and
`new_weight` [n_new, D], so the rows of earlier tasks can be frozen with
`requires_grad=False`. Zeroing their gradient with a hook is not enough: SGD weight
decay and momentum still move a row whose gradient is zero.

The state-dict keys never change with growth (only shapes do), because the federated
server and its clients exchange state dicts by key. `grow` replaces the Parameter
objects, so an optimiser must be rebuilt after growing. Loading a state dict adopts
its old/new row counts, so a model with fewer classes can receive a grown one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _default_rows(k: int, dim: int) -> Tensor:
    # Same range as nn.Linear's default (kaiming_uniform with a=sqrt(5)) and LUCIR's
    # CosineLinear: U(-1/sqrt(D), 1/sqrt(D)).
    bound = 1.0 / math.sqrt(dim)
    return torch.empty(k, dim).uniform_(-bound, bound)


class GrowableHead(nn.Module):
    """Shared old/new row bookkeeping; subclasses add the forward pass."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.in_features = in_features
        self._old_frozen = False
        self.old_weight = nn.Parameter(torch.empty(0, in_features))
        self.new_weight = nn.Parameter(_default_rows(num_classes, in_features))

    # Names of the row-indexed parameters, as (old, new) pairs.
    def _row_params(self) -> list[tuple[str, str]]:
        return [("old_weight", "new_weight")]

    @property
    def num_old(self) -> int:
        return self.old_weight.shape[0]

    @property
    def num_new(self) -> int:
        return self.new_weight.shape[0]

    @property
    def num_classes(self) -> int:
        return self.num_old + self.num_new

    @property
    def weight(self) -> Tensor:
        """All class rows, old first: [K, D]."""
        return torch.cat([self.old_weight, self.new_weight], dim=0)

    def freeze_old(self, flag: bool = True) -> None:
        """Stop (flag=True) or resume training of the old class rows."""
        self._old_frozen = bool(flag)
        for old_name, _ in self._row_params():
            getattr(self, old_name).requires_grad_(not self._old_frozen)

    def _new_rows(self, k: int, weights: Tensor | None) -> dict[str, Tensor]:
        ref = self.new_weight
        if weights is None:
            w = _default_rows(k, self.in_features)
        else:
            if tuple(weights.shape) != (k, self.in_features):
                raise ValueError(
                    f"weights must have shape ({k}, {self.in_features}), "
                    f"got {tuple(weights.shape)}"
                )
            w = weights.detach().clone()
        return {"new_weight": w.to(device=ref.device, dtype=ref.dtype)}

    @torch.no_grad()
    def grow(self, k: int, weights: Tensor | None = None) -> None:
        """Add k classes: merge the current new rows into old, then add k fresh rows.

        New rows are `weights` [k, D] when given (weight imprinting), else the default
        initialisation. Old rows keep their values exactly.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        fresh = self._new_rows(k, weights)
        for old_name, new_name in self._row_params():
            merged = torch.cat(
                [getattr(self, old_name).detach(), getattr(self, new_name).detach()]
            )
            setattr(self, old_name, nn.Parameter(merged))
            setattr(self, new_name, nn.Parameter(fresh[new_name]))
        self.freeze_old(self._old_frozen)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Adopt the incoming row counts so that a client that has not grown yet can
        # load the server's grown head; the copy below then fills the values in.
        for pair in self._row_params():
            for name in pair:
                key = prefix + name
                if key not in state_dict:
                    continue
                incoming = state_dict[key]
                current = getattr(self, name)
                if incoming.shape[1:] == current.shape[1:] and (
                    incoming.shape[0] != current.shape[0]
                ):
                    setattr(
                        self,
                        name,
                        nn.Parameter(
                            current.new_empty(incoming.shape),
                            requires_grad=current.requires_grad,
                        ),
                    )
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, old={self.num_old}, "
            f"new={self.num_new}, old_frozen={self._old_frozen}"
        )


class CosineHead(GrowableHead):
    """Cosine-normalised classifier (LUCIR, Hou et al. 2019; Class Impressions).

    logits_k = eta * <phi / |phi|, w_k / |w_k|> with one learnable scalar eta,
    initialised at `scale` (upstream: 1.0; see `Config.head_scale`).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0) -> None:
        super().__init__(in_features, num_classes)
        self.eta = nn.Parameter(torch.tensor(float(scale)))

    def forward_scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Return (cosine scores in [-1, 1], scaled logits), both [B, K]."""
        phi = F.normalize(features, dim=1)  # [B, D] unit features
        w = F.normalize(self.weight, dim=1)  # [K, D] unit class rows
        scores = phi @ w.t()  # [B, K] cosine scores
        return scores, self.eta * scores  # [B, K] logits

    def forward(self, features: Tensor) -> Tensor:
        return self.forward_scores(features)[1]


class LinearHead(GrowableHead):
    """Plain linear classifier with bias, logits = phi W^T + b."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        bound = 1.0 / math.sqrt(in_features)
        self.old_bias = nn.Parameter(torch.empty(0))
        self.new_bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))

    def _row_params(self) -> list[tuple[str, str]]:
        return [("old_weight", "new_weight"), ("old_bias", "new_bias")]

    @property
    def bias(self) -> Tensor:
        """All class biases, old first: [K]."""
        return torch.cat([self.old_bias, self.new_bias], dim=0)

    def _new_rows(self, k: int, weights: Tensor | None) -> dict[str, Tensor]:
        rows = super()._new_rows(k, weights)
        ref = self.new_bias
        if weights is None:
            bound = 1.0 / math.sqrt(self.in_features)
            b = torch.empty(k).uniform_(-bound, bound)
        else:
            # Imprinted rows carry no bias: the class score is the imprint alone.
            b = torch.zeros(k)
        rows["new_bias"] = b.to(device=ref.device, dtype=ref.dtype)
        return rows

    def forward_scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Return (scores, logits); for a linear head both are the logits [B, K]."""
        logits = F.linear(features, self.weight, self.bias)  # [B, K] logits
        return logits, logits

    def forward(self, features: Tensor) -> Tensor:
        return self.forward_scores(features)[1]


def build_head(
    kind: str, in_features: int, num_classes: int, scale: float = 1.0
) -> GrowableHead:
    """Build a `cosine` (eta starting at `scale`) or `linear` head."""
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    raise ValueError(f"unknown head {kind!r}; expected 'cosine' or 'linear'")
