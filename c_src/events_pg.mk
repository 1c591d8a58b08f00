# The PostgreSQL backend of the event store (events/pg.c, libpq): its cmocka tests and
# benchmark. Both need a running server: DX_PG_URL is a libpq conninfo of a database
# they may create schemas in, DX_PG_CTL is test/pg/pg_ctl.sh (the tests restart and
# stop the server through it). The top Makefile's test-events-pg / bench-events-pg
# start a throwaway server under _build/pg, set both and stop it afterwards.
#   make test-pg           plain cmocka run
#   make test-pg-asan      built with AddressSanitizer + UBSan
#   make test-pg-valgrind  plain build under valgrind memcheck
#   make bench-pg          events/s: one event per transaction vs batches of 100 and 1000

PG_CFLAGS := $(shell pkg-config --cflags libpq 2>/dev/null || echo -I/usr/include/postgresql)
PG_LIBS   := $(shell pkg-config --libs libpq 2>/dev/null || echo -lpq)
PG_SRC    := events/pg.c
PG_HDR    := events/backend.h

.PHONY: test-pg test-pg-asan test-pg-valgrind bench-pg pg-env
$(BUILD)/plain/test/test_events_pg: $(TESTSRC)/test_events_pg.c $(PG_SRC) $(PG_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(PG_CFLAGS) -Ievents $< $(PG_SRC) -o $@ -lcmocka $(PG_LIBS) $(LDLIBS)

$(BUILD)/asan/test/test_events_pg: $(TESTSRC)/test_events_pg.c $(PG_SRC) $(PG_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
	  $(PG_CFLAGS) -Ievents $< $(PG_SRC) -o $@ -lcmocka $(PG_LIBS) $(LDLIBS)

$(BUILD)/bench/events_pg_bench: ../bench/events_pg_bench.c $(PG_SRC) $(PG_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(PG_CFLAGS) -Ievents $< $(PG_SRC) -o $@ $(PG_LIBS) $(LDLIBS)

pg-env:
	@[ -n "$$DX_PG_URL" ] && [ -n "$$DX_PG_CTL" ] || \
	  { echo "set DX_PG_URL and DX_PG_CTL (or run: make test-events-pg at the top)"; exit 2; }

test-pg: pg-env $(BUILD)/plain/test/test_events_pg
	$(BUILD)/plain/test/test_events_pg

test-pg-asan: pg-env $(BUILD)/asan/test/test_events_pg
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(BUILD)/asan/test/test_events_pg

test-pg-valgrind: pg-env $(BUILD)/plain/test/test_events_pg
	DX_TEST_SCALE=1 valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
	  --show-leak-kinds=definite,indirect $(BUILD)/plain/test/test_events_pg

bench-pg: pg-env $(BUILD)/bench/events_pg_bench
	$(BUILD)/bench/events_pg_bench
