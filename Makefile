# moai-finetune: one C11 binary that plans and runs Llama fine-tuning from YAML recipes.
#
# Sources are found by wildcard: every lib/**/*.c (and the one C++ shim, lib/data/*.cc) goes
# into libmoai.a, every tests/test_*.c is one cmocka binary, every bench/bench_*.c one
# benchmark, every tests/fuzz/fuzz_*.c one libFuzzer harness. Adding a file needs no edit here.
#
# MODE=release (default, under build/), MODE=asan (AddressSanitizer + UBSan, under
# build/asan/) or MODE=tsan (ThreadSanitizer, under build/tsan/). WERROR=0 turns warnings back
# into warnings.

MODE   ?= release
WERROR ?= 1
PREFIX ?= /usr/local

ifeq ($(MODE),asan)
BUILD  ?= build/asan
OPT    := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
LDSAN  := -fsanitize=address,undefined
else ifeq ($(MODE),tsan)
BUILD  ?= build/tsan
OPT    := -O1 -g -fno-omit-frame-pointer -fsanitize=thread
LDSAN  := -fsanitize=thread
else
BUILD  ?= build
OPT    := -O2 -g
LDSAN  :=
endif

CC  ?= cc
CXX ?= c++
PKGS := yaml-0.1 jansson openblas libzstd sentencepiece libpcre2-8 cmocka ompi-c

# -Wno-format-truncation: gcc guesses at snprintf truncation into fixed buffers from type
# ranges, not values; every snprintf here is bounded on purpose.
WARN := -Wall -Wextra -Wpedantic -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wvla \
        -Wwrite-strings -fno-common -Wno-format-truncation
ifeq ($(WERROR),1)
WARN += -Werror
endif

PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

CPPFLAGS += -Ilib -D_GNU_SOURCE $(PKG_CFLAGS) -MMD -MP
CFLAGS   += -std=c11 $(OPT) $(WARN) -pthread
CXXFLAGS += -std=c++17 $(OPT) -Wall -Wextra $(if $(filter 1,$(WERROR)),-Werror) -pthread
LDFLAGS  += $(LDSAN) -pthread
LDLIBS   += $(PKG_LIBS) -lstdc++ -lm

LIB_C   := $(sort $(wildcard lib/*.c lib/*/*.c))
LIB_CC  := $(sort $(wildcard lib/*.cc lib/*/*.cc))
LIB_OBJ := $(LIB_C:%.c=$(BUILD)/obj/%.o) $(LIB_CC:%.cc=$(BUILD)/obj/%.o)
TESTS   := $(sort $(wildcard tests/test_*.c))
TEST_BIN := $(TESTS:tests/%.c=$(BUILD)/tests/%)
BENCHES := $(sort $(wildcard bench/bench_*.c))
BENCH_BIN := $(BENCHES:bench/%.c=$(BUILD)/bench/%)
FUZZERS := $(sort $(wildcard tests/fuzz/fuzz_*.c))
CLI_TESTS := $(sort $(wildcard tests/cli/*.sh))

BIN := $(BUILD)/moai-finetune
LIB := $(BUILD)/libmoai.a

.PHONY: all deps run check test test-unit test-cli test-coretypes test-tsan alloc-sweep bench \
        fuzz fuzz-run install format format-check man-lint clean help dataset

# Build the binary (and libmoai.a) under build/.
all: $(BIN)

# Install the Debian packages the project needs (no-op when present).
deps:
	@scripts/install-deps.sh

# Build and run the default recipe (the README's first command).
run: deps
	@$(MAKE) --no-print-directory all
	$(BIN) configs/tiny-llama.yaml

# Build everything under ASan+UBSan, run every test (test_alloc: every 17th allocation failing),
# then the unit tests (under each OpenBLAS kernel family the CPU runs) and the CLI tests on the
# release build, the executor's tests under ThreadSanitizer, build the fuzzers, then lint the
# man pages and the source layout.
check: deps
	@$(MAKE) --no-print-directory MODE=asan test
	@$(MAKE) --no-print-directory MODE=release all $(BENCH_BIN) test-coretypes test-cli
	@$(MAKE) --no-print-directory test-tsan
	@$(MAKE) --no-print-directory fuzz
	@$(MAKE) --no-print-directory man-lint
	@$(MAKE) --no-print-directory format-check && echo "sources: clang-format clean"
	@scripts/summarize-tests.sh build/test-results

# Run the unit tests and CLI tests of this MODE's build.
test: $(BIN) $(TEST_BIN) test-unit test-cli

# Run every cmocka binary of this MODE.
test-unit: $(TEST_BIN)
	@scripts/run-tests.sh unit $(MODE) $(TEST_BIN)

# Run this MODE's unit tests once under each OpenBLAS kernel family this CPU can execute
# (OPENBLAS_CORETYPE: Sandybridge, Haswell, Zen, SkylakeX); the allocation sweep once is enough.
test-coretypes: $(TEST_BIN)
	@scripts/run-tests.sh coretypes $(MODE) $(filter-out %/test_alloc,$(TEST_BIN))

# Build the executor's tests (devices, communicators, training loop) under ThreadSanitizer and
# run them.
TSAN_TESTS := test_exec test_train test_tensor_parallel
test-tsan: deps
	@$(MAKE) --no-print-directory MODE=tsan $(TSAN_TESTS:%=build/tsan/tests/%)
	@TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
		scripts/run-tests.sh unit tsan $(TSAN_TESTS:%=build/tsan/tests/%)

# Fail every allocation of a short train-validate-save-resume run in turn, one run each (ASan;
# about 20 minutes on 2 cores; make check tries every 17th).
alloc-sweep:
	@$(MAKE) --no-print-directory MODE=asan build/asan/tests/test_alloc
	MOAI_ALLOC_STRIDE=1 build/asan/tests/test_alloc

# Run every end-to-end script in tests/cli/ against this MODE's binary.
test-cli: $(BIN)
	@scripts/run-tests.sh cli $(MODE) $(BIN) $(CLI_TESTS)

# Measure speed targets against this machine's own sgemm rate (release build).
bench: deps
	@$(MAKE) --no-print-directory MODE=release all $(BENCH_BIN)
	@scripts/run-bench.sh $(BENCH_BIN)

# Build the libFuzzer harnesses with clang under build/fuzz/.
fuzz:
	@scripts/build-fuzz.sh $(FUZZERS)

# Run each fuzzer for FUZZ_SECONDS (default 30) from its corpus; any finding fails (CI).
fuzz-run: fuzz
	@scripts/run-fuzz.sh $(or $(FUZZ_SECONDS),30) $(FUZZERS:tests/fuzz/%.c=build/fuzz/%)

# Lint the man pages.
man-lint:
	@for m in man/*.[0-9]; do \
		out=$$(groff -man -ww -z $$m 2>&1; mandoc -T lint -W warning $$m 2>&1); \
		if [ -n "$$out" ]; then echo "$$out"; exit 1; fi; \
	done; echo "man pages: lint clean"

# Install the binary and man pages under PREFIX.
install: $(BIN)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 \
		$(DESTDIR)$(PREFIX)/share/man/man5
	install -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/moai-finetune
	install -m 644 man/moai-finetune.1 $(DESTDIR)$(PREFIX)/share/man/man1/
	install -m 644 man/moai-recipe.5 $(DESTDIR)$(PREFIX)/share/man/man5/

# Rebuild the shipped datasets and tokenizer from Debian's package descriptions.
dataset:
	datasets/build-dataset.sh
	datasets/build-tokenizer.sh
	datasets/build-chat-dataset.sh

# Reformat the sources with .clang-format.
format:
	clang-format -i $(LIB_C) $(LIB_CC) $(wildcard lib/*.h lib/*/*.h) cmd/*.c $(TESTS)

# Fail when a source file differs from its clang-format form.
format-check:
	@clang-format --dry-run --Werror $(LIB_C) $(LIB_CC) $(wildcard lib/*.h lib/*/*.h) cmd/*.c

# Remove every build output.
clean:
	rm -rf build

# List the targets.
help:
	@grep -B1 -E '^[a-z-]+:' Makefile | grep -E '^#' | sed 's/^# //'

$(LIB): $(LIB_OBJ)
	@mkdir -p $(@D)
	rm -f $@
	ar rcs $@ $^

$(BIN): $(BUILD)/obj/cmd/moai-finetune.o $(LIB)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# test_alloc fails the N-th allocation of libmoai.a: its allocation calls go through wrappers.
$(BUILD)/tests/test_alloc: LDFLAGS += -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc \
	-Wl,--wrap=aligned_alloc,--wrap=posix_memalign,--wrap=strdup,--wrap=strndup

# test_atomicfile fails system calls of libmoai.a's file writing: they go through wrappers.
$(BUILD)/tests/test_atomicfile: LDFLAGS += -Wl,--wrap=open,--wrap=write,--wrap=fsync,--wrap=rename

$(BUILD)/tests/%: tests/%.c $(LIB) $(wildcard tests/*.h)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) -Itests $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(LIB) $(wildcard bench/*.h)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) -Ibench $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(BUILD)/obj/%.o: %.cc
	@mkdir -p $(@D)
	$(CXX) $(filter-out -MMD -MP,$(CPPFLAGS)) -MMD -MP $(CXXFLAGS) -c -o $@ $<

-include $(LIB_OBJ:.o=.d) $(BUILD)/obj/cmd/moai-finetune.d
