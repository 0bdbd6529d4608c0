"""An oracle selector for the demo: the decision is the true batch type, not the score's.

``DATTA(model, selector=OracleSelector(stream.kinds))`` still computes the diversity score
(so it is recorded and timed as usual) but decides ``single`` exactly on the batches that are
single-domain. Comparing ``datta_oracle`` with ``datta`` separates what DABN + DAFT are worth
given a perfect decision from what the diversity detector costs. Evaluation-only: a real
stream has no labels, so this lives here and not in the library.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..diversity import MULTIPLE, SINGLE, SKEWED, Selector

__all__ = ["OracleSelector"]


class OracleSelector(Selector):
    """Answers ``kinds[i]`` (``"single"`` -> single, ``"skewed"`` -> skewed, anything else ->
    multiple) at the i-th
    ``update``; the score is ignored. Past the end of ``kinds`` it raises, so a stream and its
    selector that went out of step are caught rather than silently mislabelled."""

    #: no warm-up: decisions are right from the first batch.
    warmup = 0

    def __init__(self, kinds: Sequence[str]):
        self.kinds = [str(k) for k in kinds]
        self.position = 0
        self.last_decision: str | None = None

    def update(self, score: float | Tensor) -> str:
        if self.position >= len(self.kinds):
            raise IndexError(f"OracleSelector knows {len(self.kinds)} batches; got batch "
                             f"{self.position + 1}")
        kind = self.kinds[self.position]
        self.last_decision = kind if kind in (SINGLE, SKEWED) else MULTIPLE
        self.position += 1
        return self.last_decision

    def reset(self) -> None:
        self.position, self.last_decision = 0, None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "oracle", "kinds": list(self.kinds), "position": self.position,
                "last_decision": self.last_decision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "oracle":
            raise ValueError(f"not an OracleSelector state (kind={state.get('kind')!r})")
        self.kinds = list(state["kinds"])
        self.position = int(state["position"])
        self.last_decision = state.get("last_decision")

    def __repr__(self) -> str:
        return f"OracleSelector({len(self.kinds)} batches, at {self.position})"
