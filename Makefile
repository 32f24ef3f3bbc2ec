# The two commands of the README. Both install and verify what the host needs first.
CARGO ?= cargo

.PHONY: setup build demo test lint

setup:
	bash scripts/setup-host.sh

build: setup
	$(CARGO) build --workspace

# Brings up a lab, migrates a running container between simulated hosts, tears down.
demo: build
	target/debug/demo

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Everything: formatting, lints, unit tests and the end-to-end tests in a real lab.
test: build lint
	target/debug/lab gc
	$(CARGO) test --workspace
