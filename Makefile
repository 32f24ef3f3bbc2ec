# The two commands of the README. Both install and verify what the host needs first.
CARGO ?= cargo

.PHONY: setup build release demo test lint bench

setup:
	bash scripts/setup-host.sh

build: setup
	$(CARGO) build --workspace

# What users run, and what the demo and the benchmarks measure.
release: setup
	$(CARGO) build --workspace --release

# Brings up a lab, migrates a running container between simulated hosts, tears down.
demo: release
	target/release/demo

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Everything: formatting, lints, unit tests and the end-to-end tests in a real lab.
test: build lint
	target/debug/lab gc
	$(CARGO) test --workspace

# Measurements, not tests (README, Performance): iperf3 TCP and UDP with live-migrate and
# with plain podman checkpoint/restore, the memhog sweep and 10 echo migrations. Results in
# target/harness/bench/ (report.json, summary.md, throughput.png, sensitivity.png).
bench: release
	target/release/lab gc
	target/release/harness --mode tcp,udp --baseline --sensitivity --with-2g --dirty 0,20,100 --echo 20 --out target/harness/bench
