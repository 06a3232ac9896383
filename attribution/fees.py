"""EIP-1559 fees for the node's transactions, and how a stuck one is priced again.

A transaction not mined within `replace_after` seconds is sent again with the same nonce and both fees
raised by `bump` (nodes refuse a replacement under +10% on each fee: geth's and Erigon's minimum), never
above `max_fee_per_gas`; only one transaction of a nonce can ever be mined, so a replaced call runs once.
A commit that must not be mined any more (its deadline is near, or it is stuck at the cap) is cancelled by an
empty transfer with the same nonce, one bump above its last version even past the cap (21,000 gas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

MIN_BUMP = 0.10  # the replacement minimum of geth's (and most nodes') transaction pools


@dataclass(frozen=True)
class FeePolicy:
    replace_after: float = 60.0  # seconds a transaction may wait unmined before it is replaced
    bump: float = 0.125  # fee increase per replacement (fraction)
    max_fee_per_gas: int = 500 * 10**9  # the most the node pays per gas (wei)

    def __post_init__(self) -> None:
        if self.bump < MIN_BUMP:
            raise ValueError(f"a fee bump of {self.bump} is below the {MIN_BUMP} that nodes require of a replacement")
        if self.replace_after <= 0 or self.max_fee_per_gas <= 0:
            raise ValueError("replace_after and max_fee_per_gas must be positive")

    def initial(self, base_fee: int, priority_fee: int) -> tuple[int, int]:
        """(maxFeePerGas, maxPriorityFeePerGas) for a new transaction: room for the base fee to double."""
        tip = min(priority_fee, self.max_fee_per_gas)
        return min(2 * base_fee + tip, self.max_fee_per_gas), tip

    def bumped(self, fees: tuple[int, int], market: tuple[int, int]) -> tuple[int, int] | None:
        """The fees of a replacement for a transaction sent with `fees`: each raised by `bump` (at least by 1
        wei) or to today's `market` fees if higher; None when that would pass `max_fee_per_gas`."""
        max_fee, tip = fees
        new_max = max(self._raise(max_fee), market[0])
        new_tip = max(self._raise(tip), market[1])
        if new_max > self.max_fee_per_gas:
            return None
        return new_max, min(new_tip, new_max)

    def cancellation(self, fees: tuple[int, int]) -> tuple[int, int]:
        """The fees of an empty transfer replacing a transaction sent with `fees` that must not be mined any
        more: each raised by `bump`, even past `max_fee_per_gas` (21,000 gas: at most one bump over the cap)."""
        return self._raise(fees[0]), self._raise(fees[1])

    def _raise(self, fee: int) -> int:
        # decimal, not float: 100 * 1.1 is 110.00000000000001 in floats, and its ceiling one wei too many
        return fee + max(math.ceil(Decimal(str(self.bump)) * fee), 1)
