# The two commands of the README. Both do all set-up on a fresh machine first.
.PHONY: serve test bootstrap

bootstrap:
	@scripts/bootstrap.sh

# Run the node with no configuration: bundled SmolLM2 base model on http://127.0.0.1:8000
serve: bootstrap
	.venv/bin/openlora serve

# The default suite first; slow tests (real model end to end, fuzzing) after it.
test: bootstrap
	.venv/bin/python -m pytest -q -m "not slow"
	.venv/bin/python -m pytest -q -m slow
