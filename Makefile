# The two commands of the README. Both do all set-up on a fresh machine first.
.PHONY: serve test bootstrap

bootstrap:
	@scripts/bootstrap.sh

# The whole local network with no configuration: anvil, IPFS, the contracts, a funded demo payer, demo
# adapters, and the node (bundled SmolLM2) on http://127.0.0.1:8000; prints a paid client command.
serve: bootstrap
	.venv/bin/openlora devnet up

# The default suite first; slow tests (real model end to end, fuzzing) after it.
test: bootstrap
	.venv/bin/python -m pytest -q -m "not slow"
	.venv/bin/python -m pytest -q -m slow
