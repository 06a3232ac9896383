"""Stateful fuzzing of protocol v2 on anvil. Actors: payers (deposit, announce and cancel withdrawals,
withdraw, and as cheating payers try every fraud proof against the honest node's batches), the honest node
(commits what it served), a cheating node (commits a provably bad record, or withholds a leaf and charges a
payer for it), a challenger, anyone (finalize, distribute, claim) and the clock. After every step:

* escrow:     balance == sum(account balances) + collected pot, and the pot == what pending batches took
              from escrow (their charges minus what the node's stake covered); thawing <= balance
* registry:   balance == stake + unbonding
* settlement: balance == sum(claimable) + undistributed revenue + covered part of pending batches, and
              balance + everything claimed == everything finalized + everything slashed + pending cover
* P1: what the node collected from a payer (pending + finalized batches) never exceeds the highest
      cumulative cap the payer signed for it, even with withheld data;
* P2: no honest batch is ever voided; total supply is conserved.
"""

from __future__ import annotations

import asyncio
import random

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

from attribution.aggregation import Batch, Tree, build_batch
from attribution.chain import Chain
from attribution.deploy import Contracts
from attribution.errors import ContractRevert
from tests.attribution.helpers import CONFIG, World, withheld_batch

E18 = 10**18
COMMIT_REFUSALS = ("PaymentEscrowOverCap", "UsageSettlementStakeTooLow", "UsageSettlementNodeInactive")


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
            # batch id -> (batch, kind): "honest", "bad" (provable) or "withheld" (unprovable)
            self.pending: dict[int, tuple[Batch, str]] = {}
            self.honest: list[int] = []
            self.charged: dict[str, int] = {p.address: 0 for p in self.payers}  # pending + finalized
            self.claimed = self.finalized = self.slashed = 0
            self.supply = self.run(w.c.token.total_supply())

        def run(self, coro):
            return self.runner.run(coro)

        def teardown(self) -> None:
            if hasattr(self, "world"):
                self.run(self.world.chain.revert(self.snapshot))
                self.run(self.world.chain.close())
                self.runner.close()

        def _commit(self, batch: Batch, kind: str) -> None:
            w = self.world
            try:
                batch_id = self.run(w.commit(batch, "x"))
            except ContractRevert as exc:
                assert exc.error in COMMIT_REFUSALS, exc
                return
            self.pending[batch_id] = (batch, kind)
            if kind == "honest":
                self.honest.append(batch_id)
            for payer, amount in batch.payer_totals:
                self.charged[payer] += amount

        def _drop(self, batch_id: int, voided: bool) -> None:
            batch, _ = self.pending.pop(batch_id)
            if voided:
                for payer, amount in batch.payer_totals:
                    self.charged[payer] -= amount

        # ---------------------------------------------------------------- payers

        @rule(payer=st.integers(0, 1), amount=st.integers(1, 50 * E18))
        def deposit(self, payer: int, amount: int) -> None:
            self.run(self.world.c.escrow.deposit(self.payers[payer], self.world.node.address, amount))

        @rule(payer=st.integers(0, 1), permille=st.integers(0, 1_000))
        def request_withdrawal(self, payer: int, permille: int) -> None:
            e, node = self.world.c.escrow, self.world.node.address
            account = self.run(e.account_of(self.payers[payer].address, node))
            self.run(e.request_withdrawal(self.payers[payer], node, account.balance * permille // 1_000))

        @rule(payer=st.integers(0, 1))
        def withdraw(self, payer: int) -> None:
            try:
                self.run(self.world.c.escrow.withdraw(self.payers[payer], self.world.node.address))
            except ContractRevert as exc:
                assert exc.error in ("PaymentEscrowNothingThawing", "PaymentEscrowStillThawing")

        @precondition(lambda self: any(kind == "honest" for _, kind in self.pending.values()))
        @rule(pick=st.integers(0, 10**6), payer=st.integers(0, 1))
        def cheating_payer_challenges(self, pick: int, payer: int) -> None:
            """A payer tries to get the honest node slashed: every proof at a random place must revert."""
            s, sender = self.world.c.settlement, self.payers[payer]
            honest = [(i, b) for i, (b, kind) in self.pending.items() if kind == "honest"]
            batch_id, batch = honest[pick % len(honest)]
            rng = random.Random(pick)
            tree = rng.choice(list(Tree))
            index = rng.randrange(batch.count)
            other_id, other = rng.choice(honest)
            attempts = [
                s.prove_invalid_record(sender, batch_id, batch, tree, index),
                s.prove_leaf_sum_mismatch(sender, batch_id, batch, tree, rng.randrange(1 << batch.depth)),
                s.prove_missing_record(sender, batch_id, batch, tree, index),
                s.prove_duplicate(sender, batch_id, batch, index, other_id, other, rng.randrange(other.count)),
            ]
            if batch.depth:
                attempts.append(s.prove_misorder(sender, batch_id, batch, tree, rng.randrange((1 << batch.depth) - 1)))
                level = rng.randrange(1, batch.depth + 1)
                attempts.append(s.prove_node_sum_mismatch(sender, batch_id, batch, tree, level,
                                                          rng.randrange(1 << (batch.depth - level))))
            attempts.append(s.prove_total_mismatch(sender, batch_id, batch, Tree.PAYER,
                                                   rng.randrange(len(batch.payer_totals))))
            for attempt in attempts:
                with pytest.raises(ContractRevert):
                    self.run(attempt)

        # ---------------------------------------------------------------- nodes

        @rule(spec=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(1, 2_000),
                                      st.integers(0, 2_000)), min_size=1, max_size=5))
        def honest_commit(self, spec) -> None:
            w = self.world
            leaves = [self.run(w.leaf(self.payers[p], a, i, o)) for p, a, i, o in spec]
            self._commit(build_batch(leaves), "honest")

        @rule(payer=st.integers(0, 1))
        def cheating_node_commits_a_bad_record(self, payer: int) -> None:
            w = self.world
            bad = self.run(w.leaf(self.payers[payer], max_charge=1))
            honest = self.run(w.leaf(self.payers[payer]))  # the voucher: a valid, higher cap
            self._commit(build_batch([bad, honest]), "bad")

        @rule(payer=st.integers(0, 1), visible=st.integers(0, 1), permille=st.integers(1, 2_000))
        def cheating_node_withholds_a_leaf(self, payer: int, visible: int, permille: int) -> None:
            """Issue 9 attack 1: a phantom leaf nobody can open, charged to a payer. The payer's cap bounds it."""
            w = self.world
            victim = self.payers[payer]
            shown = self.run(w.leaf(self.payers[visible]))
            signed = w.caps.get(victim.address, 0)
            if signed == 0:
                return
            collected = self.run(w.c.escrow.collected_of(victim.address, w.node.address))
            phantom = max(1, (signed - collected) * permille // 1_000)  # up to twice the room left
            voucher = self.run(w.leaf(victim, cumulative_cap=signed, max_charge=1)).voucher
            self._commit(withheld_batch([shown], {victim.address: phantom}, {victim.address: voucher}), "withheld")

        # ---------------------------------------------------------------- everyone else

        @precondition(lambda self: any(kind == "bad" for _, kind in self.pending.values()))
        @rule()
        def challenge(self) -> None:
            w = self.world
            batch_id, (batch, _) = next((i, p) for i, p in self.pending.items() if p[1] == "bad")
            index = next(i for i, leaf in enumerate(batch.payer_leaves) if leaf.request.max_charge == 1)
            try:
                receipt = self.run(w.c.settlement.prove_invalid_record(w.challenger, batch_id, batch, Tree.PAYER, index))
            except ContractRevert as exc:
                assert exc.error == "UsageSettlementChallengeWindowClosed"
                return
            self.slashed += w.c.settlement.events(receipt, "BatchVoided")[0]["slashed"]
            self._drop(batch_id, voided=True)

        @rule(seconds=st.sampled_from([1, 300, CONFIG.challenge_window, CONFIG.thaw_period]))
        def advance(self, seconds: int) -> None:
            self.run(self.world.chain.increase_time(seconds))

        @precondition(lambda self: self.pending)
        @rule(pick=st.integers(0, 10))
        def finalize(self, pick: int) -> None:
            w = self.world
            batch_id = list(self.pending)[pick % len(self.pending)]
            batch, _ = self.pending[batch_id]
            try:
                self.run(w.c.settlement.finalize_batch(w.stranger, batch_id, batch.totals()))
            except ContractRevert as exc:
                assert exc.error == "UsageSettlementChallengeWindowOpen"
                return
            self.finalized += batch.charge
            self._drop(batch_id, voided=False)

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
            w = self.world
            c, node = w.c, w.node.address
            headers = {i: self.run(c.settlement.batch_of(i)) for i in self.pending}
            covered = sum(h.covered for h in headers.values())
            escrow = self.run(c.token.balance_of(c.escrow.address))
            accounts = [self.run(c.escrow.account_of(p.address, node)) for p in self.payers]
            pot = self.run(c.escrow.total_collected())
            assert pot == sum(b.charge for b, _ in self.pending.values()) - covered
            assert escrow == sum(a.balance for a in accounts) + pot
            assert all(a.thawing <= a.balance for a in accounts)
            nodes = self.run(c.token.balance_of(c.nodes.address))
            info = self.run(c.nodes.node_of(node))
            assert nodes == info.stake + info.unbonding
            settlement = self.run(c.token.balance_of(c.settlement.address))
            claimable = sum(self.run(c.settlement.claimable_of(a.address)) for a in self.accounts)
            undistributed = sum(self.run(c.settlement.undistributed_of(a, 0)) for a in (1, 2))
            assert settlement == claimable + undistributed + covered
            assert settlement + self.claimed == self.finalized + self.slashed + covered
            assert self.run(c.token.total_supply()) == self.supply
            for payer in self.payers:
                collected = self.run(c.escrow.collected_of(payer.address, node))
                assert collected == self.charged[payer.address]
                assert collected <= w.caps.get(payer.address, 0)  # P1
            for batch_id in self.honest:
                assert self.run(c.settlement.batch_of(batch_id)).status != c.settlement.VOIDED  # P2

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
    _run(anvil, fresh_chain, examples=15, steps=30)
