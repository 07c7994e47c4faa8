# The commands a newcomer needs (see README.md): run, test, and the two logins; everything else is in scripts/
.PHONY: run test bench lint format demo-password admin

run:  ## set up everything in .venv and run Chorus on http://127.0.0.1:8000/
	scripts/run.sh

demo-password:  ## a new password for the demo login, printed once (in the same mode as `make run`)
	DEBUG=$${DEBUG:-1} .venv/bin/python manage.py demo_user --reset

admin:  ## create an administrator login for /admin/ (asks for a name and a password; same mode as `make run`)
	DEBUG=$${DEBUG:-1} .venv/bin/python manage.py createsuperuser $(ARGS)

test:  ## lint, migration and deploy checks, then the whole test suite
	scripts/test.sh

bench:  ## the streaming benchmark (docs/performance.md); e.g. make bench ARGS="--k 100 --profile-k 100"
	scripts/bootstrap.sh && .venv/bin/python -m bench $(ARGS)

lint:
	scripts/bootstrap.sh && .venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	scripts/bootstrap.sh && .venv/bin/ruff format . && .venv/bin/ruff check --fix .
