# The two commands of the README. Both install and verify what the host needs first.
CARGO ?= cargo

.PHONY: setup build release demo test lint bench programs install uninstall deb deb-tool

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
test: build lint deb-tool
	target/debug/lab gc
	$(CARGO) test --workspace

# Measurements, not tests (README, Performance): iperf3 TCP and UDP with live-migrate and
# with plain podman checkpoint/restore, the memhog sweep (3 rounds), 20 echo migrations and the
# forwarded path's steady throughput (8 runs each way). Results in
# target/harness/bench/ (report.json, summary.md, throughput.png, sensitivity.png).
bench: release
	target/release/lab gc
	target/release/harness --mode tcp,udp --baseline --sensitivity --with-2g --dirty 0,20,100 --rounds 3 --echo 20 --forwarded 8 --out target/harness/bench

# On real hosts (README, "On real hosts"): the programs, the service unit and the default
# configuration. PROFILE=debug packages the debug build instead (the packaging test does).
PROFILE ?= release
PREFIX ?= /usr/local
DEB_DIR ?= target/debian
CARGO_PROFILE = $(if $(filter debug,$(PROFILE)),dev,$(PROFILE))

programs:
	$(CARGO) build --workspace --profile $(CARGO_PROFILE)

# A configuration file already there is kept, as are the token and the state.
install: programs
	install -D -m 0755 target/$(PROFILE)/agent-server $(DESTDIR)$(PREFIX)/bin/agent-server
	install -D -m 0755 target/$(PROFILE)/agent-client $(DESTDIR)$(PREFIX)/bin/agent-client
	install -d $(DESTDIR)/etc/systemd/system
	sed 's|^ExecStart=/usr/bin/|ExecStart=$(PREFIX)/bin/|' packaging/agent-server.service \
		> $(DESTDIR)/etc/systemd/system/agent-server.service
	[ -e $(DESTDIR)/etc/live-migrate/config.toml ] || \
		install -D -m 0644 packaging/config.toml $(DESTDIR)/etc/live-migrate/config.toml
	install -d -m 0700 $(DESTDIR)/var/lib/live-migrate
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; next: agent-server init (or copy the token of another host), then"
	@echo "  systemctl enable --now agent-server"

# Leaves the configuration, the token and the state (a journal may still be needed).
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/agent-server $(DESTDIR)$(PREFIX)/bin/agent-client
	rm -f $(DESTDIR)/etc/systemd/system/agent-server.service

deb-tool:
	command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --locked --version '^3'

# target/debian/live-migrate_VERSION_ARCH.deb, from [package.metadata.deb] in
# agent-server/Cargo.toml.
deb: programs deb-tool
	$(CARGO) deb -p agent-server --no-build --profile $(CARGO_PROFILE) -o $(DEB_DIR)/
