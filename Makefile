# Setup on demand: every target creates .venv and installs requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
# One setup at a time: `make server` and `make test` started together must not run pip twice
# at once in one .venv (the second waits, then finds everything installed).
LOCK := flock $(VENV).lock
ALLURE_VERSION := 2.46.1
ALLURE := $(VENV)/allure/node_modules/.bin/allure
CHROMIUM ?= chromium

.PHONY: server client test lint coverage report bench profile proto tools venv clean

server: $(STAMP)  ## run the server on localhost:50051 with the default SQLite store
	$(BIN)/python server.py

client: $(STAMP)  ## open the interactive client
	$(BIN)/python client.py

test: $(STAMP) tools  ## run every test, results for Allure in allure-results/ (emptied first)
	$(BIN)/python -m pytest test_grpc_system.py tests --alluredir=allure-results --clean-alluredir

lint: $(STAMP)  ## ruff check and mypy, with the settings in pyproject.toml (CI runs it before the tests)
	$(BIN)/ruff check .
	$(BIN)/mypy

coverage: $(STAMP) tools  ## every test under coverage, the servers and clients they start too; line coverage of server.py and client.py
	rm -f .coverage .coverage.*
	$(BIN)/python -m coverage run -m pytest test_grpc_system.py tests
	$(BIN)/python -m coverage combine --quiet
	$(BIN)/python -m coverage report

report: $(STAMP) $(ALLURE)  ## the HTML report of the last make test in allure-report/, checked in Chromium
	@test -f allure-results/environment.properties || { echo "no test results: run make test first"; exit 1; }
	@command -v java >/dev/null && command -v $(CHROMIUM) >/dev/null || { \
		echo "installing Java and Chromium from apt"; \
		apt-get update -qq && apt-get install -y -qq default-jre-headless chromium; }
	$(ALLURE) generate allure-results -o allure-report --clean
	$(BIN)/python tests/report_in_browser.py allure-report allure-results --chromium $(CHROMIUM)

bench: $(STAMP)  ## benchmark beside grpcio alone (python -m bench --help); more: make bench ARGS=--full
	$(BIN)/python -m bench $(ARGS)

profile: $(STAMP)  ## where the server's CPU goes under load: py-spy's top functions for memory:// and SQLite, stacks in profiles/
	$(BIN)/python -m bench --only profile $(ARGS)

proto: $(STAMP)  ## regenerate generated/ from connection.proto and notifications.proto
	$(BIN)/python -m grpc_tools.protoc --proto_path=generated=. --python_out=. --pyi_out=. --grpc_python_out=. connection.proto notifications.proto

tools:  ## the commands the tests use (openssl makes TLS certificates, redis-server is the shared store), from apt when missing
	@missing=$$(for tool in openssl setsid prlimit redis-server; do command -v $$tool >/dev/null || echo $$tool; done); \
	if [ -n "$$missing" ]; then \
		echo "installing what provides: $$missing"; \
		apt-get update -qq && apt-get install -y -qq openssl util-linux redis-server; \
	fi

venv: $(STAMP)  ## only the setup: .venv with requirements.txt installed

clean:
	rm -rf $(VENV) $(VENV).lock allure-results allure-report .pytest_cache .coverage .coverage.* .mypy_cache .ruff_cache

# Under the lock, and only if no other make did it meanwhile.
$(STAMP): requirements.txt
	@$(LOCK) sh -c 'test -f $@ || { \
		echo "setting up $(VENV): requirements.txt"; \
		$(PYTHON) -m venv $(VENV) && \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt && \
		rm -f $(VENV)/.installed-* && touch $@; }'

# allure-commandline from the npm registry (it brings its own jars; it needs Java to run).
$(ALLURE):
	@command -v npm >/dev/null || { echo "installing npm from apt"; \
		apt-get update -qq && apt-get install -y -qq npm; }
	$(LOCK) npm install --silent --no-audit --no-fund --prefix $(VENV)/allure allure-commandline@$(ALLURE_VERSION)
