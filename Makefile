# dspex_bridge: the two commands are `make run` and `make test`.
# Both install the Debian packages they need (only the missing ones), build, then run.

REBAR3   ?= /usr/bin/rebar3
ERL      ?= /usr/bin/erl
ELIXIR_APP := examples/elixir_app
export CI

# Exact Debian 12 packages, each a real need of the build or the tests.
APT_BUILD := gcc make erlang-base erlang-dev erlang-crypto erlang-syntax-tools erlang-tools \
             erlang-parsetools erlang-edoc rebar3 erlang-inets \
             pkg-config libgrpc-dev libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev
APT_GRPC_TEST := valgrind libcmocka-dev protobuf-compiler protobuf-compiler-grpc python3-grpcio python3-protobuf \
                 clang libclang-rt-14-dev
APT_TEST  := erlang-eunit erlang-common-test erlang-proper erlang-runtime-tools erlang-os-mon \
             libcmocka-dev valgrind clang libclang-rt-14-dev elixir
# Python workers (dspex_workers): /usr/bin/python3 runs priv/python/dspex_bridge/worker.py
APT_WORKERS := python3
# dspex_cluster: OTP's httpc for the etcd backend, and etcd itself for its tests
APT_CLUSTER := erlang-inets etcd-server
# The Python client (priv/python/dspex_bridge), its stubs, tests and gRPC bench.
APT_PYTHON := python3-grpcio python3-protobuf protobuf-compiler protobuf-compiler-grpc libprotobuf-dev \
              python3-venv python3-setuptools python3-pip
PYTHON   ?= /usr/bin/python3
# The optimizer validation bench (bench/opt_validate.py): Optuna, SciPy, plots.
APT_BENCH_OPT := python3-optuna python3-scipy python3-numpy python3-matplotlib
PY_STUBS := priv/python/dspex_bridge/_proto

.PHONY: all deps deps-test deps-cluster compile run test test-c test-erlang test-nif-asan test-elixir test-workers test-cluster bench docs clean
.PHONY: deps-python python-stubs python-venv test-python bench-grpc bench-opt deps-bench-opt
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

deps-cluster: deps
	$(call apt_install,$(APT_CLUSTER))

compile: deps
	$(REBAR3) compile

# Starts a node with the application in the foreground (an Erlang shell).
run: compile python-stubs
	$(ERL) -pa _build/default/lib/*/ebin -sname dspex_bridge -s dspex_bridge start

test: deps-test deps-cluster compile test-c test-erlang test-nif-asan test-elixir test-workers test-grpc test-python
	@echo "==> all test suites passed"

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
	  DSPEX_PROP_STATEM_N=500 DSPEX_PROP_FUZZ_N=500 DSPEX_PROP_PARALLEL_N=200 DSPEX_PROP_GRAPH_N=200 DSPEX_PROP_LOCKS_N=100 \
	  $(ERL) -noshell -pa _build/test/lib/*/ebin -pa _build/test/lib/dspex_bridge/test -eval \
	  'case eunit:test([dspex_store_tests, dspex_graph_tests, dspex_locks_tests, dspex_acl_tests, dspex_props_tests, dspex_graph_props_tests, dspex_locks_props_tests, dspex_metrics_tests, dspex_telemetry_tests], []) of ok -> halt(0); _ -> halt(1) end.'

# The Python side of the worker protocol (priv/python/dspex_bridge/worker.py);
# the Erlang side (dspex_workers_SUITE, breaker, retry, JSON) runs in test-erlang.
test-workers:
	/usr/bin/python3 -m unittest discover -s test/python_workers -p 'test_*.py'

# The cluster suites alone (three peer nodes each; the etcd suite starts its own
# etcd on loopback). `make test' runs them within test-erlang (rebar3 ct).
test-cluster: deps-test deps-cluster compile
	$(REBAR3) ct --suite test/dspex_cluster_SUITE,test/dspex_cluster_etcd_SUITE

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
test-python: compile python-venv
	cd test/python && DSPEX_BRIDGE_INSTALLED=1 ../../$(PY_VENV)/bin/python -m unittest discover -v -s . -p 'test_*.py'

bench: compile
	@mkdir -p _build/bench
	erlc -o _build/bench bench/*.erl
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_bench:main(), halt().'
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_breaker_bench:main(), halt().'
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_workers_bench:main(), halt().'
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_cluster_bench:main(), halt().'
	$(MAKE) bench-grpc
	$(MAKE) bench-opt

# Optimizers (issue #18): ours through dspex_opt, then Optuna and SciPy at the
# same budgets and seeds; table and plots under _build/bench/ (OPT_BENCH_SEEDS, default 20).
deps-bench-opt:
	$(call apt_install,$(APT_BENCH_OPT))

bench-opt: compile deps-bench-opt
	@mkdir -p _build/bench
	erlc -o _build/bench bench/dspex_opt_bench.erl
	$(ERL) -noshell -pa _build/default/lib/*/ebin -pa _build/bench -eval 'dspex_opt_bench:main(), halt().'
	$(PYTHON) bench/opt_validate.py

# GetVariable round trips/s through our bridge vs a plain python3-grpcio server.
bench-grpc: compile python-stubs
	$(PYTHON) bench/grpc_bench.py

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
	$(PYTHON) test/grpc/valgrind_run.py $(GRPC_TEST_STUBS)
