"""The spending cap of a run (tokens and/or US dollars): see ``Budget`` for the rule."""

from __future__ import annotations

import threading


class BudgetExhausted(Exception):
    """Raised inside the client when a request does not fit the budget; its row gets ``budget_exhausted``."""


class Budget:
    """A spending cap for a run: tokens (input + output) and/or US dollars (from the role's price table).

    The rule: a request is sent only while what was spent, plus what requests already on the wire may still
    spend, plus this request's worst case (its estimated prompt tokens + ``max_tokens``, priced) stays within
    every cap. The first request that does not fit exhausts the budget for good: it and every later request
    (of every client sharing this object) are not sent, and come back with ``error="budget_exhausted"``;
    requests already on the wire finish and are kept. So a run never spends more than the cap (up to the
    error of the prompt estimate), stops cleanly, and keeps everything paid for (it is in the response cache:
    a re-run with a larger budget pays only for the rest). Cache hits cost nothing and are always served.

    The budget counts in this process: ``RoleConfig.budget_tokens`` / ``budget_usd`` give each client (one
    role in one materialization) its own; pass one ``Budget`` to several clients for a run-wide cap.
    """

    def __init__(self, tokens: int | None = None, usd: float | None = None) -> None:
        if tokens is not None and tokens < 1:
            raise ValueError(f"budget tokens must be >= 1 or None, got {tokens}")
        if usd is not None and usd <= 0:
            raise ValueError(f"budget usd must be > 0 or None, got {usd}")
        self.tokens, self.usd = tokens, usd
        self.spent_tokens, self.spent_usd = 0, 0.0
        self._reserved_tokens, self._reserved_usd = 0, 0.0
        self.exhausted = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Budget(tokens={self.tokens}, usd={self.usd}, spent_tokens={self.spent_tokens}, "
            f"spent_usd={self.spent_usd:.6f}, exhausted={self.exhausted})"
        )

    def try_reserve(self, tokens: int, usd: float) -> bool:
        """Reserve a request's worst case; False (and exhausted from now on) if it does not fit."""
        with self._lock:
            if self.exhausted:
                return False
            fits = (self.tokens is None or self.spent_tokens + self._reserved_tokens + tokens <= self.tokens) and (
                self.usd is None or self.spent_usd + self._reserved_usd + usd <= self.usd + 1e-12
            )
            if not fits:
                self.exhausted = True
                return False
            self._reserved_tokens += tokens
            self._reserved_usd += usd
            return True

    def settle(self, reserved_tokens: int, reserved_usd: float, tokens: int, usd: float) -> None:
        """Replace a reservation with what the request really cost (0 when nothing came back)."""
        with self._lock:
            self._reserved_tokens -= reserved_tokens
            self._reserved_usd -= reserved_usd
            self.spent_tokens += tokens
            self.spent_usd += usd

    def describe(self) -> str:
        parts = []
        if self.tokens is not None:
            parts.append(f"{self.spent_tokens} of {self.tokens} tokens")
        if self.usd is not None:
            parts.append(f"${self.spent_usd:.4f} of ${self.usd:g}")
        return ", ".join(parts)
