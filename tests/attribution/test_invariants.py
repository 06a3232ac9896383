"""Stateful fuzzing: random deposits, withdrawals, commits (honest or cheating), challenges, finalizes,
distributions, claims and time jumps. After every step the OPEN held by each contract equals what it owes:

* escrow:     balance == sum(payer balance + thawing) + locked, and locked == charges of pending batches
* registry:   balance == sum(stake + unbonding)
* settlement: balance == sum(claimable) + undistributed revenue, and
              balance + everything claimed == everything finalized + everything slashed (no double payment)
* total supply is conserved (nothing minted or burnt after set-up).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from attribution.batch import Batch, Tree, build_batch
from attribution.chain import Chain
from attribution.deploy import Contracts
from attribution.errors import ContractRevert
from tests.attribution.helpers import CONFIG, World

E18 = 10**18


def machine_for(anvil, deployments):
    class SettlementMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.runner = asyncio.Runner()
            chain = self.run(Chain.connect(anvil.rpc_url))
            self.world = World(chain, deployments, Contracts.attach(chain, deployments), anvil.private_keys)
            self.snapshot = self.run(chain.snapshot())
            w = self.world
            self.payers = [w.payer_a, w.payer_b]
            self.accounts = [w.deployer, w.node, w.owner, w.contributor, w.challenger, *self.payers]
            self.pending: list[tuple[int, Batch, bool]] = []
            self.claimed = self.finalized = self.slashed = 0
            self.supply = self.run(w.c.token.total_supply())

        def run(self, coro):
            return self.runner.run(coro)

        def teardown(self) -> None:
            if hasattr(self, "world"):
                self.run(self.world.chain.revert(self.snapshot))
                self.run(self.world.chain.close())
                self.runner.close()

        @rule(payer=st.integers(0, 1), amount=st.integers(1, 50 * E18))
        def deposit(self, payer: int, amount: int) -> None:
            self.run(self.world.c.escrow.deposit(self.payers[payer], amount))

        @rule(payer=st.integers(0, 1), permille=st.integers(1, 1_000))
        def request_withdrawal(self, payer: int, permille: int) -> None:
            account = self.run(self.world.c.escrow.account_of(self.payers[payer].address))
            amount = account.balance * permille // 1_000
            if amount > 0:
                self.run(self.world.c.escrow.request_withdrawal(self.payers[payer], amount))

        @rule(payer=st.integers(0, 1))
        def withdraw(self, payer: int) -> None:
            try:
                self.run(self.world.c.escrow.withdraw(self.payers[payer]))
            except ContractRevert as exc:
                assert exc.error in ("PaymentEscrowNothingThawing", "PaymentEscrowStillThawing")

        @rule(spec=st.lists(st.tuples(st.integers(0, 1), st.integers(1, 2), st.integers(1, 2_000),
                                      st.integers(1, 2_000)), min_size=1, max_size=6), cheat=st.booleans())
        def commit(self, spec, cheat: bool) -> None:
            w = self.world
            leaves = [self.run(w.leaf(self.payers[p], a, i, o)) for p, a, i, o in spec]
            if cheat:
                leaves[0] = self.run(w.leaf(self.payers[spec[0][0]], max_charge=1))
            batch = build_batch(leaves)
            try:
                batch_id, _ = self.run(w.c.settlement.commit_batch(w.node_signer, w.node.address, batch, "x"))
            except ContractRevert as exc:
                assert exc.error in ("PaymentEscrowInsufficientBalance", "UsageSettlementNodeInactive")
                return
            self.pending.append((batch_id, batch, cheat))

        @precondition(lambda self: any(cheat for _, _, cheat in self.pending))
        @rule()
        def challenge(self) -> None:
            w = self.world
            batch_id, batch, _ = next(p for p in self.pending if p[2])
            index = next(i for i, leaf in enumerate(batch.payer_leaves) if leaf.request.max_charge == 1)
            try:
                receipt = self.run(w.c.settlement.prove_invalid_record(w.challenger, batch_id, batch, Tree.PAYER, index))
            except ContractRevert as exc:
                assert exc.error == "UsageSettlementChallengeWindowClosed"
                return
            self.slashed += w.c.settlement.events(receipt, "BatchVoided")[0]["slashed"]
            self.pending = [p for p in self.pending if p[0] != batch_id]

        @rule(seconds=st.sampled_from([1, 600, CONFIG.challenge_window, CONFIG.thaw_period]))
        def advance(self, seconds: int) -> None:
            self.run(self.world.chain.increase_time(seconds))

        @precondition(lambda self: self.pending)
        @rule(pick=st.integers(0, 10))
        def finalize(self, pick: int) -> None:
            w = self.world
            batch_id, batch, _ = self.pending[pick % len(self.pending)]
            try:
                self.run(w.c.settlement.finalize_batch(w.stranger, batch_id, batch.totals()))
            except ContractRevert as exc:
                assert exc.error == "UsageSettlementChallengeWindowOpen"
                return
            self.finalized += batch.payer_tree.root.sum
            self.pending = [p for p in self.pending if p[0] != batch_id]

        @rule(adapter=st.integers(1, 2))
        def distribute(self, adapter: int) -> None:
            try:
                self.run(self.world.c.settlement.distribute(self.world.stranger, adapter, 0))
            except ContractRevert as exc:
                assert exc.error == "UsageSettlementNothingToDistribute"

        @rule(who=st.integers(0, 4))
        def claim(self, who: int) -> None:
            account = self.accounts[who]
            s = self.world.c.settlement
            due = self.run(s.claimable_of(account.address))
            try:
                receipt = self.run(s.claim(account))
            except ContractRevert as exc:
                assert exc.error == "UsageSettlementNothingToClaim" and due == 0
                return
            amount = s.events(receipt, "Claimed")[0]["amount"]
            assert amount == due
            self.claimed += amount

        @invariant()
        def contracts_hold_what_they_owe(self) -> None:
            if not hasattr(self, "world"):
                return
            c = self.world.c
            escrow = self.run(c.token.balance_of(c.escrow.address))
            accounts = [self.run(c.escrow.account_of(p.address)) for p in self.payers]
            locked = self.run(c.escrow.total_locked())
            assert locked == sum(batch.payer_tree.root.sum for _, batch, _ in self.pending)
            assert escrow == sum(a.balance + a.thawing for a in accounts) + locked
            nodes = self.run(c.token.balance_of(c.nodes.address))
            node = self.run(c.nodes.node_of(self.world.node.address))
            assert nodes == node.stake + node.unbonding
            settlement = self.run(c.token.balance_of(c.settlement.address))
            claimable = sum(self.run(c.settlement.claimable_of(a.address)) for a in self.accounts)
            undistributed = sum(self.run(c.settlement.undistributed_of(a, 0)) for a in (1, 2))
            assert settlement == claimable + undistributed
            assert settlement + self.claimed == self.finalized + self.slashed
            assert self.run(c.token.total_supply()) == self.supply

    return SettlementMachine


def _run(anvil, fresh_chain, examples: int, steps: int) -> None:
    machine = machine_for(anvil, fresh_chain)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=list(HealthCheck)))


def test_settlement_invariants(anvil, fresh_chain) -> None:
    _run(anvil, fresh_chain, examples=6, steps=15)


@pytest.mark.slow
def test_settlement_invariants_long(anvil, fresh_chain) -> None:
    _run(anvil, fresh_chain, examples=40, steps=30)
