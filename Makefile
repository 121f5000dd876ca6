# Setup on demand: every target creates .venv and installs requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.PHONY: server client test bench proto tools clean

server: $(STAMP)  ## run the server on localhost:50051 with the default SQLite store
	$(BIN)/python server.py

client: $(STAMP)  ## open the interactive client
	$(BIN)/python client.py

test: $(STAMP) tools  ## run every test, results for Allure in allure-results/
	$(BIN)/python -m pytest test_grpc_system.py tests --alluredir=allure-results

bench: $(STAMP)  ## benchmark beside grpcio alone (python -m bench --help); more: make bench ARGS=--full
	$(BIN)/python -m bench $(ARGS)

proto: $(STAMP)  ## regenerate generated/ from connection.proto and notifications.proto
	$(BIN)/python -m grpc_tools.protoc --proto_path=generated=. --python_out=. --grpc_python_out=. connection.proto notifications.proto

tools:  ## the commands the tests use (openssl makes TLS certificates, redis-server is the shared store), from apt when missing
	@missing=$$(for tool in openssl setsid prlimit redis-server; do command -v $$tool >/dev/null || echo $$tool; done); \
	if [ -n "$$missing" ]; then \
		echo "installing what provides: $$missing"; \
		apt-get update -qq && apt-get install -y -qq openssl util-linux redis-server; \
	fi

clean:
	rm -rf $(VENV) allure-results allure-report .pytest_cache

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@
