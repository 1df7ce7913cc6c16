# The two commands: `make run` and `make test` (see README.md).
.PHONY: run test deps lint unit functional e2e bench plugin clean

deps:
	sh scripts/install-deps.sh

run: deps
	sh scripts/start-dockerd.sh
	.venv/bin/calico-cnm serve

test: deps
	sh scripts/start-dockerd.sh
	sh scripts/build-test-image.sh
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -p no:cacheprovider -q tests

# The managed plugin calico/cnm:latest (PLUGIN=owner/name:tag for another name).
plugin: deps
	sh scripts/start-dockerd.sh
	mkdir -p /var/lib/calico-cnm/tls
	sh scripts/build-plugin.sh

unit: deps
	.venv/bin/python -m pytest -q tests/unit

lint: deps
	.venv/bin/ruff check .

bench: deps
	sh scripts/start-dockerd.sh
	sh scripts/build-test-image.sh
	.venv/bin/python bench/docker_run.py

clean:
	rm -rf .venv build *.egg-info
