# dspex_bridge: the two commands are `make run` and `make test`.
# Both install the Debian packages they need (only the missing ones), build, then run.

REBAR3   ?= /usr/bin/rebar3
ERL      ?= /usr/bin/erl
ELIXIR_APP := examples/elixir_app
export CI

# Exact Debian 12 packages, each a real need of the build or the tests.
APT_BUILD := gcc make erlang-base erlang-dev erlang-crypto erlang-syntax-tools erlang-tools \
             erlang-parsetools erlang-edoc rebar3 erlang-inets \
             pkg-config libgrpc-dev libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev \
             libsqlite3-dev libpq-dev
APT_GRPC_TEST := valgrind libcmocka-dev protobuf-compiler protobuf-compiler-grpc python3-grpcio python3-protobuf \
                 clang libclang-rt-14-dev
APT_TEST  := erlang-eunit erlang-common-test erlang-proper erlang-runtime-tools erlang-os-mon \
             libcmocka-dev valgrind clang libclang-rt-14-dev elixir erlang-dialyzer postgresql \
             python3-statsmodels python3-scipy openssl
# Python workers (dspex_workers): /usr/bin/python3 runs priv/python/dspex_bridge/worker.py
APT_WORKERS := python3
# dspex_cluster: OTP's httpc for the etcd backend, and etcd itself for its tests
APT_CLUSTER := erlang-inets etcd-server
# The Python client (priv/python/dspex_bridge), its stubs, tests and gRPC bench.
APT_PYTHON := python3-grpcio python3-protobuf protobuf-compiler protobuf-compiler-grpc libprotobuf-dev \
              python3-venv python3-setuptools python3-pip
# The debug console (dspex_console): Graphviz for dspex_graph:to_svg/1, npm to
# fetch the pinned chart library (Debian's npm unless an npm is on PATH, e.g.
# NodeSource's nodejs, which conflicts with it), headless Chromium + Selenium for its tests.
APT_CONSOLE := erlang-ssl graphviz chromium chromium-driver python3-selenium
# uPlot, the console's chart library, from the npm registry: exact version and
# the registry's sha512 integrity, checked before anything is unpacked; copied
# into priv/www/vendor (not committed). Never a CDN at run time.
UPLOT_VERSION   := 1.6.31
UPLOT_INTEGRITY := sha512-sQZqSwVCbJGnFB4IQjQYopzj5CoTZJ4Br1fG/xdONimqgHmsacvCjNesdGDypNKFbrhLGIeshYhy89FxPF+H+w==
CONSOLE_VENDOR  := priv/www/vendor
PYTHON   ?= /usr/bin/python3
# The optimizer validation bench (bench/opt_validate.py): Optuna, SciPy, plots.
APT_BENCH_OPT := python3-optuna python3-scipy python3-numpy python3-matplotlib
PY_STUBS := priv/python/dspex_bridge/_proto

.PHONY: all deps deps-test deps-cluster compile run test test-c test-erlang test-nif-asan test-elixir test-workers test-cluster bench docs clean
.PHONY: console-vendor test-console bench-console
.PHONY: deps-python python-stubs python-venv test-python bench-grpc
.PHONY: bench-opt bench-opt-kernel deps-bench-opt
.PHONY: deps-grpc-test test-grpc test-grpc-c test-grpc-valgrind

all: compile python-stubs

define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "==> installing Debian packages:" $$missing; \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call apt_install,$(APT_BUILD))
	$(call apt_install,$(APT_WORKERS))

deps-test: deps
	$(call apt_install,$(APT_TEST))
	$(call apt_install,$(APT_CONSOLE))

deps-cluster: deps
	$(call apt_install,$(APT_CLUSTER))

compile: deps
	$(REBAR3) compile

# Starts a node with the application in the foreground (bin/dspex_bridge):
# an Erlang shell when stdin is a terminal, else it serves until SIGTERM or
# SIGINT and stops cleanly. `make run GRPC=50151 METRICS=9669 NODE=name
# CONFIG=sys.config' (all optional). The Python client's stubs are built too.
GRPC    ?=
METRICS ?=
NODE    ?= dspex_bridge
CONFIG  ?=
.PHONY: remsh stop dialyzer test-run
RUN_ENV  = DSPEX_GRPC='$(GRPC)' DSPEX_METRICS='$(METRICS)' DSPEX_NODE='$(NODE)' DSPEX_CONFIG='$(CONFIG)' ERL='$(ERL)'
run: compile python-stubs
	@$(RUN_ENV) exec bin/dspex_bridge start

# A shell attached to the node of `make run' (same NODE), and a clean stop of it.
remsh:
	@$(RUN_ENV) exec bin/dspex_bridge remsh

stop:
	@$(RUN_ENV) exec bin/dspex_bridge stop

test: disk-check deps-test deps-cluster compile dialyzer test-c test-erlang test-nif-asan test-elixir test-workers test-grpc test-python test-run \
      test-events-pg test-console
	@echo "==> all test suites passed"

# The suites write event logs, a PostgreSQL cluster, Chromium profiles and
# build trees: refuse to start on a nearly full disk, where the event log's
# writer would retry failing batches and hold writers back instead of a test
# failing. MIN_FREE_MB on the repository's file system and on TMPDIR.
MIN_FREE_MB ?= 4096

# The Python-driven suites run under a bound (each takes a few minutes at
# most): a test that hangs fails its suite instead of holding CI to its limit.
BOUND = timeout --kill-after=30 1200
.PHONY: disk-check
disk-check:
	@for d in . "$${TMPDIR:-/tmp}"; do \
	  free=$$(df -Pm "$$d" | awk 'NR==2 {print $$4}'); \
	  if [ "$$free" -lt $(MIN_FREE_MB) ]; then \
	    echo "==> only $$free MB free on $$d; the tests need $(MIN_FREE_MB) MB (old event logs: data/events/)" >&2; \
	    exit 1; \
	  fi; \
	done

# Success typing of src/ (zero warnings); the PLT is built once, then cached.
dialyzer: deps-test compile
	$(REBAR3) dialyzer

# `make run' and bin/dspex_bridge without a terminal (serve until SIGTERM /
# SIGINT, clean stop, nothing left running) and with one (banner, then prompt).
test-run: compile python-stubs
	$(BOUND) $(PYTHON) -m unittest discover -v -s test/run -p 'test_*.py'

test-c:
	$(MAKE) -C c_src test test-asan test-valgrind fuzz-glob FUZZ_SECONDS=$${FUZZ_SECONDS:-20}

test-erlang:
	$(REBAR3) eunit
	$(REBAR3) ct

# The EUnit suites again, against the NIF built with AddressSanitizer + UBSan
# (fewer property cases: the sanitizers slow every call down).
ASAN_RT  = $(shell gcc -print-file-name=libasan.so):$(shell gcc -print-file-name=libubsan.so)
test-nif-asan:
	$(MAKE) -C c_src asan-nif
	$(REBAR3) as test compile
	DSPEX_NIF_PATH=$(CURDIR)/_build/c/asan_nif/dspex_nif LD_PRELOAD=$(ASAN_RT) \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  DSPEX_PROP_STATEM_N=500 DSPEX_PROP_FUZZ_N=500 DSPEX_PROP_PARALLEL_N=200 DSPEX_PROP_GRAPH_N=200 DSPEX_PROP_LOCKS_N=100 DSPEX_PROP_EVENTS_N=20 DSPEX_PROP_PRINCIPAL_N=100 \
	  $(ERL) -noshell -pa _build/test/lib/*/ebin -pa _build/test/lib/dspex_bridge/test -eval \
	  'case eunit:test([dspex_store_tests, dspex_cache_nif_tests, dspex_graph_tests, dspex_locks_tests, dspex_acl_tests, dspex_props_tests, dspex_graph_props_tests, dspex_locks_props_tests, dspex_metrics_tests, dspex_telemetry_tests, dspex_events_tests, dspex_events_batch_tests, prop_principal, dspex_nif_lifecycle_tests, dspex_replica_batch_tests, dspex_repl_nif_tests], []) of ok -> halt(0); _ -> halt(1) end.'

# The Python side of the worker protocol (priv/python/dspex_bridge/worker.py);
# the Erlang side (dspex_workers_SUITE, breaker, retry, JSON) runs in test-erlang.
test-workers:
	$(BOUND) /usr/bin/python3 -m unittest discover -s test/python_workers -p 'test_*.py'

# The cluster suites alone (three peer nodes each; the etcd suite starts its own
# etcd on loopback; the linearizability suite records and checks histories).
# `make test' runs them within test-erlang (rebar3 ct).
test-cluster: deps-test deps-cluster compile
	$(REBAR3) ct --suite test/dspex_cluster_SUITE,test/dspex_cluster_etcd_SUITE,test/dspex_lincheck_SUITE

test-elixir: compile
	cd $(ELIXIR_APP) && MIX_REBAR3=$(REBAR3) MIX_ENV=test mix test

deps-python:
	$(call apt_install,$(APT_PYTHON))

# Python stubs of priv/proto/snakepit_bridge.proto, generated (never committed)
# into the package (priv/python/dspex_bridge/_proto), the grpc module's import
# of its message module made package-relative, so the package installs whole.
python-stubs: deps-python $(PY_STUBS)/snakepit_bridge_pb2_grpc.py

$(PY_STUBS)/snakepit_bridge_pb2_grpc.py: priv/proto/snakepit_bridge.proto
	protoc -I priv/proto --python_out=$(PY_STUBS) --grpc_out=$(PY_STUBS) \
	  --plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin $<
	sed -i 's/^import snakepit_bridge_pb2 as /from . import snakepit_bridge_pb2 as /' $@

# The package as users install it: a fresh venv over Debian's grpcio/protobuf
# (offline: no build isolation, no dependency download).
PY_VENV := _build/python_venv
python-venv: python-stubs
	rm -rf $(PY_VENV) _build/python_pkg
	$(PYTHON) -m venv --system-site-packages $(PY_VENV)
	cp -r priv/python _build/python_pkg   # pip builds in place: keep priv/ clean
	$(PY_VENV)/bin/pip install --quiet --no-deps --no-build-isolation --no-index ./_build/python_pkg

# Codec/cache/error/CLI unit tests, then integration tests against a real node,
# all importing dspex_bridge from the venv's installed package, not priv/python.
# Bounded (about 80 s on a quiet machine): a test that hangs fails the suite
# with a clear exit instead of holding CI until its own limit.
test-python: compile python-venv
	cd test/python && DSPEX_BRIDGE_INSTALLED=1 $(BOUND) \
	  ../../$(PY_VENV)/bin/python -m unittest discover -v -s . -p 'test_*.py'

bench: disk-check compile
	@mkdir -p _build/bench
	erlc -o _build/bench bench/*.erl test/dspex_region_proxy.erl
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_bench:main(), halt().'
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_breaker_bench:main(), halt().'
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_workers_bench:main(), halt().'
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_cluster_bench:main(), halt().'
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_cache_bench:main(), halt().'
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_events_bench:main(), halt().'
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_console_page_bench:main(), halt().'
	$(ERL) +sbwt none +sbwtdcpu none +sbwtdio none -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_region_bench:main(), halt().'
	$(ERL) +sbwt none +sbwtdcpu none +sbwtdio none -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_models_bench:main(), halt().'
	$(MAKE) bench-grpc
	$(MAKE) bench-events-pg
	$(MAKE) bench-opt

# Optimizers (issue #18): ours through dspex_opt, then Optuna and SciPy at the
# same budgets and seeds; table and plots under _build/bench/ (OPT_BENCH_SEEDS, default 20).
deps-bench-opt:
	$(call apt_install,$(APT_BENCH_OPT))

bench-opt: compile deps-bench-opt
	@mkdir -p _build/bench
	erlc -o _build/bench bench/dspex_opt_bench.erl
	$(ERL) +sbwt none +sbwtdcpu none +sbwtdio none -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_opt_bench:main(), halt().'
	$(PYTHON) bench/opt_validate.py
	$(MAKE) bench-opt-kernel

# The optimizer kernels alone (no VM): ask CPU time, TPE's regret over 200 seeds.
bench-opt-kernel:
	$(MAKE) -C c_src bench-opt-kernel

# GetVariable round trips/s through our bridge vs a plain python3-grpcio server.
bench-grpc: compile python-stubs
	$(PYTHON) bench/grpc_bench.py

# Event store, PostgreSQL backend (c_src/events/pg.c): a throwaway PostgreSQL 15 server
# under _build/pg (test/pg/pg_ctl.sh: 127.0.0.1, a free port), the backend's cmocka tests
# against it (plain, ASan+UBSan, valgrind) or its benchmark, then the server is stopped
# and its data deleted, also when a test fails.
.PHONY: test-events-pg test-events-pg-eunit bench-events-pg
PG_CTL := $(CURDIR)/test/pg/pg_ctl.sh
define with_pg
	@$(PG_CTL) start
	@url=$$($(PG_CTL) url dx_events_test) && DX_PG_URL="$$url" DX_PG_CTL=$(PG_CTL) $(1); \
	  rc=$$?; $(PG_CTL) stop; exit $$rc
endef

test-events-pg: deps-test compile
	$(call with_pg,$(MAKE) -C c_src test-pg test-pg-asan test-pg-valgrind && $(EVENTS_PG_EUNIT) && $(EVENTS_PG_CLUSTER))

# The event log's EUnit suite (the same as with SQLite) against PostgreSQL, in a database of its own
EVENTS_PG_EUNIT = DX_EVENTS_PG_URL="$$($(PG_CTL) url dx_events_eunit)" DX_PG_CTL=$(PG_CTL) $(REBAR3) eunit --module=dspex_events_tests

# Three peer nodes appending to one PostgreSQL database (a cluster suite case that skips without it)
EVENTS_PG_CLUSTER = DX_EVENTS_PG_URL="$$($(PG_CTL) url dx_events_cluster)" $(REBAR3) ct --suite test/dspex_cluster_SUITE --case event_sequence_on_one_postgres_database_across_failover

# The same EUnit suite alone against a throwaway PostgreSQL server
test-events-pg-eunit: deps-test compile
	$(call with_pg,$(EVENTS_PG_EUNIT))

# events/s with one event per transaction vs batches of 100 and 1000 (durable commits), then the event
# log's sync group commit (16 writers, with and without the gather) against one transaction per event
bench-events-pg: deps-test compile
	@mkdir -p _build/bench
	erlc -o _build/bench bench/dspex_events_bench.erl
	$(call with_pg,$(MAKE) -C c_src bench-pg && $(EVENTS_PG_BENCH))

EVENTS_PG_BENCH = DX_EVENTS_PG_URL="$$($(PG_CTL) url dx_events_bench)" $(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'logger:set_primary_config(level, error), dspex_events_bench:pg(), halt().'

docs: compile
	$(REBAR3) edoc

clean:
	$(REBAR3) clean
	rm -rf _build $(ELIXIR_APP)/_build $(ELIXIR_APP)/deps

# gRPC server: cmocka tests of the port's C cores (plain, ASan+UBSan, valgrind),
# the request decoder fuzzed (a deterministic descriptor-driven driver under
# ASan+UBSan in test-asan, then libFuzzer for FUZZ_SECONDS, default 20),
# then 1,000 calls through the port program running under valgrind.
GRPC_TEST_STUBS := _build/grpc_test
deps-grpc-test:
	$(call apt_install,$(APT_GRPC_TEST))

test-grpc: test-grpc-c test-grpc-valgrind

test-grpc-c: deps-grpc-test
	$(MAKE) -C c_src/grpc_port test test-asan test-valgrind fuzz FUZZ_SECONDS=$${FUZZ_SECONDS:-20}

$(GRPC_TEST_STUBS)/snakepit_bridge_pb2_grpc.py: priv/proto/snakepit_bridge.proto
	@mkdir -p $(GRPC_TEST_STUBS)
	protoc -I priv/proto --python_out=$(GRPC_TEST_STUBS) --grpc_out=$(GRPC_TEST_STUBS) \
	  --plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin $<

test-grpc-valgrind: deps-grpc-test compile $(GRPC_TEST_STUBS)/snakepit_bridge_pb2_grpc.py
	$(BOUND) $(PYTHON) test/grpc/valgrind_run.py $(GRPC_TEST_STUBS)

# The debug console's chart library (see UPLOT_*): npm pack fetches the
# tarball, whose sha512 must equal the pinned integrity.
console-vendor: $(CONSOLE_VENDOR)/uPlot.iife.min.js

$(CONSOLE_VENDOR)/uPlot.iife.min.js: Makefile
	@command -v npm >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm; }
	@rm -rf _build/console/npm && mkdir -p _build/console/npm $(CONSOLE_VENDOR)
	cd _build/console/npm && npm pack --silent uplot@$(UPLOT_VERSION) >/dev/null
	@got="sha512-$$(openssl dgst -sha512 -binary _build/console/npm/uplot-$(UPLOT_VERSION).tgz | base64 -w0)"; \
	if [ "$$got" != "$(UPLOT_INTEGRITY)" ]; then echo "uplot-$(UPLOT_VERSION).tgz: integrity $$got, expected $(UPLOT_INTEGRITY)" >&2; exit 1; fi
	tar -xzf _build/console/npm/uplot-$(UPLOT_VERSION).tgz -C _build/console/npm package/dist/uPlot.iife.min.js package/dist/uPlot.min.css package/LICENSE
	cp _build/console/npm/package/dist/uPlot.iife.min.js _build/console/npm/package/dist/uPlot.min.css $(CONSOLE_VENDOR)/
	cp _build/console/npm/package/LICENSE $(CONSOLE_VENDOR)/uPlot.LICENSE

# The debug console in headless Chromium (Selenium) against a node started by
# the test on free ports; screenshots go to _build/console/.
test-console: deps-test compile console-vendor
	$(BOUND) $(PYTHON) -m unittest discover -v -s test/console -p "test_*.py"

# API server time and Chromium time to first render, 10,000 sessions and a
# 1,000-variable session.
bench-console: compile console-vendor
	$(PYTHON) bench/console_bench.py
