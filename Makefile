# The README's two commands: `make run` and `make test`. Each does all its setup on a fresh
# Debian/Ubuntu machine: system packages (apt), a virtualenv in .venv, the project with its test extras.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
APT_PACKAGES := redis-server sip-tester kamailio kamailio-redis-modules openssl iproute2 util-linux \
	baresip-core chromium rtpengine-daemon slapd ldap-utils libldap-dev libsasl2-dev twinkle linphone-cli
# Commands (or files: the LDAP headers the bonsai client builds against) that tell us whether
# each package above is there.
APT_PROBES := redis-server sipp kamailio openssl ip unshare baresip chromium rtpengine slapd ldapadd twinkle linphonec \
	/usr/include/ldap.h /usr/include/sasl/sasl.h
# Node.js and npm install JsSIP and SIP.js for the web phone tests (tests/browser); installed apart so that a
# machine with Node.js from elsewhere (NodeSource) keeps it.
NODE_PACKAGES := nodejs npm
NODE_PROBES := node npm
BROWSER_STAMP := tests/browser/node_modules/.installed

.PHONY: run test lint typecheck pytest pytest-compiled setup system-deps bench bench-quick bench-scaling clean compiled docker-test asan-check

# The farm runs the mypyc build of the hot path (built here when missing or stale; sipfarm.build
# re-executes into it), or the pure-Python modules if it cannot be built.
run: setup
	@bash scripts/build-compiled.sh --if-stale || echo "make run: the compiled build failed: the farm runs the pure-Python modules"
	.venv/bin/sipfarm up

test: setup lint typecheck pytest pytest-compiled

setup: system-deps $(VENV_STAMP) $(BROWSER_STAMP)

system-deps:
	@bash scripts/system-deps.sh $(APT_PACKAGES) -- $(APT_PROBES)
	@bash scripts/system-deps.sh $(NODE_PACKAGES) -- $(NODE_PROBES)

# JsSIP, SIP.js and esbuild from the npm registry, versions pinned by the lock file, in a directory git ignores.
$(BROWSER_STAMP): tests/browser/package.json tests/browser/package-lock.json | system-deps
	@npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
	@touch $(BROWSER_STAMP)

$(VENV_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@touch $(VENV_STAMP)

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check sipfarm media

typecheck:
	.venv/bin/mypy

# Both stages run their test files in PYTEST_WORKERS processes (pytest-xdist; a file's tests stay
# together, so its fixtures start once): most of a test's time is spent waiting on the peers and
# servers it starts. PYTEST_WORKERS=0 runs them in this process, one after another.
PYTEST_WORKERS ?= 2
PARALLEL = -n $(PYTEST_WORKERS) --dist loadfile

pytest:
	@bash scripts/in-netns.sh .venv/bin/pytest -q $(PARALLEL) --durations=25 -m 'not slow'; rc=$$?; \
	$(PY) scripts/client_matrix.py; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no test: failing"; exit 1; fi; exit $$rc

# The protocol, node and balancer suites again, against the mypyc build (what benchmarks run).
pytest-compiled: $(VENV_STAMP)
	@PYTEST_ADDOPTS="$(PARALLEL)" bash scripts/test-compiled.sh tests/sip tests/node tests/balancer tests/store tests/transport tests/protect tests/e2e/test_attacks.py tests/e2e/test_redis_cluster.py \
		tests/media/test_media_fastpath.py tests/media/test_media_plane.py tests/media/test_media_relay.py \
		tests/e2e/test_sentinel_failover.py::test_registrations_survive_master_sigkill

# Benchmarks measure the mypyc build of the hot path (`make compiled`).
bench: setup compiled
	.venv/bin/sipfarm bench --build compiled

bench-quick: setup compiled
	.venv/bin/sipfarm bench --quick --build compiled

# The scaling curve: 1, 2, 4 nodes of 0.1 core each (cgroup v1 quotas: root), then the balancer alone.
bench-scaling: setup compiled
	.venv/bin/sipfarm bench --scaling --quick --build compiled

# mypyc build of the hot-path modules in build/compiled/ (the source tree is untouched):
# PYTHONPATH=build/compiled to use it, scripts/test-compiled.sh to test it.
compiled: $(VENV_STAMP)
	@bash scripts/build-compiled.sh --if-stale

# The Docker image and docker/compose.yaml built and run for real (slow: not part of `make test`):
# installs Docker (Debian's docker.io, docker-compose) and debootstrap when missing, starts a
# dockerd of its own if none answers (and stops it), builds the base from Debian's packages and
# the images, brings the compose farm up, registers phones and places a call through it with
# SIPp, checks every metrics endpoint and Prometheus, brings it down. See docker/README.md.
docker-test: $(VENV_STAMP)
	@bash scripts/docker-test.sh

# The hand-written C extensions under AddressSanitizer + UBSan, fed by their tests and the parser
# fuzzer (~2 min; not part of `make test`): run it after touching a .c file.
asan-check: $(VENV_STAMP)
	@bash scripts/asan-check.sh

clean:
	rm -rf .run results build .mypy_cache .pytest_cache .ruff_cache
