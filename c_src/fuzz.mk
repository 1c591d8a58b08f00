# libFuzzer runtime for clang 14 on Debian 12: package libclang-rt-14-dev
#   (apt-get install -y clang-14 libclang-rt-14-dev; it ships
#   libclang_rt.fuzzer-x86_64.a, which -fsanitize=fuzzer links. The separate
#   libfuzzer-14-dev package only adds a standalone libFuzzer.a for -lFuzzer
#   and is not needed.)
#
# Included by c_src/Makefile.
#   make fuzz-glob                  fuzz dx_glob_match for FUZZ_SECONDS (30)
#   make fuzz-glob FUZZ_SECONDS=600
# Fails (non-zero exit) on a crash, sanitizer report, reference mismatch
# (the harness abort()s) or a slow unit; the reproducer is written to
# ../_build/c/fuzz/. The corpus is kept there too, so runs build on each other.

# Paths are taken relative to this file so the fragment works wherever the
# including Makefile is run from.
FUZZ_DIR     := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
FUZZ_BUILD   := $(FUZZ_DIR)/../_build/c/fuzz
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 30
FUZZ_CFLAGS  := -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -g -O1 \
                -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
                -fno-sanitize-recover=all -I$(FUZZ_DIR)/core
# -max_len covers patterns over the 1024-byte limit as well as under it;
# -timeout turns an accidental super-linear path into a reported failure.
FUZZ_FLAGS   ?= -max_len=3000 -timeout=10

# Keep whatever default goal the including Makefile has (this fragment may be
# included before its first target).
_fuzz_saved_goal := $(.DEFAULT_GOAL)

.PHONY: fuzz-glob
fuzz-glob: $(FUZZ_BUILD)/fuzz_glob
	@mkdir -p $(FUZZ_BUILD)/corpus-glob
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(FUZZ_BUILD)/fuzz_glob -max_total_time=$(FUZZ_SECONDS) $(FUZZ_FLAGS) \
	    -artifact_prefix=$(FUZZ_BUILD)/ -print_final_stats=1 \
	    $(FUZZ_BUILD)/corpus-glob

$(FUZZ_BUILD)/fuzz_glob: $(FUZZ_DIR)/../test/fuzz/fuzz_glob.c $(FUZZ_DIR)/core/glob.c $(FUZZ_DIR)/core/glob.h
	@mkdir -p $(FUZZ_BUILD)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(filter %.c,$^) -o $@

.DEFAULT_GOAL := $(_fuzz_saved_goal)
