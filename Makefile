# The two commands a newcomer needs (see README.md); everything else is in scripts/.
.PHONY: run test bench lint format

run:  ## set up everything in .venv and run Chorus on http://127.0.0.1:8000/
	scripts/run.sh

test:  ## lint, migration and deploy checks, then the whole test suite
	scripts/test.sh

bench:  ## the streaming benchmark (docs/performance.md); e.g. make bench ARGS="--k 100 --profile-k 100"
	scripts/bootstrap.sh && .venv/bin/python -m bench $(ARGS)

lint:
	scripts/bootstrap.sh && .venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	scripts/bootstrap.sh && .venv/bin/ruff format . && .venv/bin/ruff check --fix .
