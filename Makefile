# The two commands a newcomer needs:
#   make run    bring up the local stack and the platform's services
#   make test   bring up what the tests need, run every test, leave nothing running
# Everything is installed from this repository's files (servers from Maven
# Central, crates from crates.io, the Python test client from PyPI).

SHELL := /bin/bash
VENV  := tests/py/.venv
CARGO ?= cargo

.PHONY: run test infra-up infra-down infra-status infra-fetch cluster-up cluster-down cluster-status test-faults setup build py-deps lint bench clean schema-release

## run: start Kafka, Cassandra and the registry, create topics/schemas/tables, run the services
run: infra-up build setup
	@infra/run-services.sh

## test: every test (unit and end to end against the real stack)
test:
	@bash tests/run-all.sh

infra-fetch:
	@infra/stack.sh fetch

## infra-up: fetch (cached) and start the servers; idempotent
infra-up:
	@infra/stack.sh up

## infra-down: stop exactly the servers infra-up started
infra-down:
	@infra/stack.sh down

infra-status:
	@infra/stack.sh status

## cluster-up: a 3-node Kafka cluster (KRaft, replication 3, min ISR 2) beside the stack, brokers 19092/19094/19096
cluster-up:
	@infra/stack.sh cluster-up

## cluster-down: stop exactly the cluster nodes cluster-up started
cluster-down:
	@infra/stack.sh cluster-down

cluster-status:
	@infra/stack.sh cluster-status

## test-faults: the fault suite, one test at a time, each under continuous load on the 3-broker
## cluster with the checker of tests/src/checker.rs: SIGKILL a Kafka broker (faults_broker.rs);
## SIGKILL each service kind in turn, a stalled presence service, a rebalance of the sequencers and
## routers (faults_services.rs); the dev stack's Cassandra stopped for 20 s (faults_cassandra.rs:
## it stops the SHARED Cassandra of the stack whose run dir is CHAT_STACK_RUN_DIR, default .run,
## and starts it again); then a reconnect storm of 2,000 devices through two routers
## (faults_reconnect.rs). Starts the cluster if it is not up and stops it again if it started it.
## Needs the dev stack (registry, Cassandra: make infra-up).
test-faults:
	@for port in $${CHAT_REGISTRY_PORT:-8081} $${CHAT_CQL_PORT:-9042}; do \
	  (exec 3<>/dev/tcp/127.0.0.1/$$port) 2>/dev/null || { echo "test-faults needs the dev stack (nothing on port $$port): make infra-up" >&2; exit 1; }; \
	done
	$(CARGO) build --locked --bins -p chat-sequencer -p chat-router -p chat-projectors -p chat-gateway
	@started=0; \
	if ! infra/stack.sh cluster-status >/dev/null 2>&1; then infra/stack.sh cluster-up || exit 1; started=1; fi; \
	$(CARGO) test --locked -p chat-tests --test faults_broker --test faults_services --test faults_cassandra --test faults_reconnect -- --ignored --nocapture --test-threads=1; rc=$$?; \
	if [ $$started = 1 ]; then infra/stack.sh cluster-down; fi; \
	exit $$rc

build:
	$(CARGO) build --locked --bins

## setup: create topics, register schemas, migrate Cassandra (all idempotent)
setup: build
	target/debug/chat-admin setup

py-deps: $(VENV)/.installed

$(VENV)/.installed: tests/py/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/py/requirements.txt
	touch $@

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## bench: Kafka produce->consume latency on loopback (needs infra-up)
bench:
	$(CARGO) run --release --locked -p chat-tests --bin log-latency

clean:
	infra/stack.sh clean
	$(CARGO) clean

## schema-release: record the composed Envelope schema as the next released version
## (schemas/released/envelope-v<N>.json) when the .avsc files changed; commit it with the change
schema-release:
	$(CARGO) run -q --locked -p chat-schemas --example envelope -- --release
