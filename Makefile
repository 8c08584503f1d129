# kvq: `make test` is what CI runs. No build system beyond make.
CC      ?= cc
CLANG   ?= clang
CFLAGS  ?= -O2 -march=native
WARN     = -std=c99 -Wall -Wextra -Werror -I.
LDLIBS   = -lm -pthread
B        = build
SAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fno-sanitize-recover=all
AARCH64_CC ?= aarch64-linux-gnu-gcc
QEMU    ?= qemu-aarch64-static

TESTS    = $(B)/test_core $(B)/test_simd $(B)/test_simd_dispatch $(B)/test_serialize $(B)/test_rotate $(B)/test_salient \
           $(B)/test_runtime $(B)/test_threads $(B)/test_batch $(B)/test_hugepages $(B)/test_examples $(B)/compile_gcc_c $(B)/compile_gcc_cxx \
           $(B)/compile_clang_c $(B)/compile_clang_cxx $(B)/compile_gcc_strict $(B)/compile_clang_strict
HDR      = kvq.h tests/test_util.h tests/hostile.h

.PHONY: all test example eval bench kernels figure asan ubsan tsan neon fuzz lint check cuda cuda-emu cuda-emu-asan install package clean
all: $(TESTS) $(B)/quickstart $(B)/llama $(B)/kvq_eval $(B)/kvdump $(B)/overview $(B)/bench $(B)/kernels

$(B):
	mkdir -p $(B)

# ---- tests ------------------------------------------------------------------
$(B)/test_core: tests/test_core.c tests/golden_*.inc $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_core.c $(LDLIBS)
$(B)/test_simd: tests/test_simd.c $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_simd.c $(LDLIBS)
# a plain build, no -march and no macro: AVX2 and AVX-512 compiled with target attributes and
# picked by cpuid on first use (the default), which test_runtime_pick checks
$(B)/test_simd_dispatch: tests/test_simd.c $(HDR) | $(B)
	$(CC) $(WARN) -O2 -o $@ tests/test_simd.c $(LDLIBS)
$(B)/test_serialize: tests/test_serialize.c $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_serialize.c $(LDLIBS)
$(B)/test_rotate: tests/test_rotate.c $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_rotate.c $(LDLIBS)
$(B)/test_salient: tests/test_salient.c $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_salient.c $(LDLIBS)
$(B)/test_runtime: tests/test_runtime.c $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_runtime.c $(LDLIBS)
$(B)/test_hugepages: tests/test_hugepages.c $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_hugepages.c $(LDLIBS)
$(B)/test_threads: tests/test_threads.c $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_threads.c $(LDLIBS)
$(B)/test_batch: tests/test_batch.c $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_batch.c $(LDLIBS)
$(B)/test_examples: tests/test_examples.c examples/*.h $(HDR) | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/test_examples.c $(LDLIBS)

# the header as C99 and as C++, with gcc and clang, two units each with KVQ_STATIC; C++ with
# $(CFLAGS) (optimized, the machine's ISA: g++ 12 warns inside its AVX-512 intrinsics there)
COMPILE_SRC = tests/compile_a.c tests/compile_b.c
$(B)/compile_gcc_c: $(COMPILE_SRC) kvq.h | $(B)
	gcc -std=c99 -pedantic -Wall -Wextra -Werror -o $@ $(COMPILE_SRC) -lm
$(B)/compile_gcc_cxx: $(COMPILE_SRC) kvq.h | $(B)
	g++ -x c++ -std=c++11 -Wall -Wextra -Werror $(CFLAGS) -o $@ $(COMPILE_SRC) -lm
$(B)/compile_clang_c: $(COMPILE_SRC) kvq.h | $(B)
	$(CLANG) -std=c99 -pedantic -Wall -Wextra -Werror -o $@ $(COMPILE_SRC) -lm
$(B)/compile_clang_cxx: $(COMPILE_SRC) kvq.h | $(B)
	$(CLANG) -x c++ -std=c++11 -Wall -Wextra -Werror $(CFLAGS) -o $@ $(COMPILE_SRC) -lm
# ggml's C warning set, with the SIMD kernels compiled in (runtime dispatch)
STRICT = -std=c99 -Wall -Wextra -Wpedantic -Wcast-qual -Wshadow -Wstrict-prototypes -Wpointer-arith \
         -Wmissing-prototypes -Wdouble-promotion -Werror -DKVQ_RUNTIME_DISPATCH
$(B)/compile_gcc_strict: $(COMPILE_SRC) kvq.h | $(B)
	gcc $(STRICT) -o $@ $(COMPILE_SRC) -lm
$(B)/compile_clang_strict: $(COMPILE_SRC) kvq.h | $(B)
	$(CLANG) $(STRICT) -o $@ $(COMPILE_SRC) -lm

# the plain build (runtime dispatch) loads the image the -march build saved: the same bytes
$(B)/test_serialize_plain: tests/test_serialize.c $(HDR) | $(B)
	$(CC) $(WARN) -O2 -o $@ tests/test_serialize.c $(LDLIBS)
test: $(TESTS) $(B)/test_serialize_plain $(B)/overview
	mkdir -p $(B)/xplat && $(B)/test_serialize --write $(B)/xplat >/dev/null
	tests/run_all.sh $(TESTS) "$(B)/test_serialize_plain --check $(B)/xplat" "tests/test_overview.sh $(B)/overview"

# ---- sanitizers: the unit tests under ASan (gcc) and UBSan (clang), SIMD paths included
SAN_TESTS = core simd serialize rotate salient batch runtime examples
$(B)/asan_%: tests/test_%.c $(HDR) examples/*.h | $(B)
	$(CC) $(WARN) $(SAN_FLAGS) -march=native -fsanitize=address -o $@ $< $(LDLIBS)
$(B)/ubsan_%: tests/test_%.c $(HDR) examples/*.h | $(B)
	$(CLANG) $(WARN) $(SAN_FLAGS) -march=native -fsanitize=undefined,float-cast-overflow -o $@ $< $(LDLIBS)
asan: $(addprefix $(B)/asan_,$(SAN_TESTS))
	tests/run_all.sh $^
ubsan: $(addprefix $(B)/ubsan_,$(SAN_TESTS))
	tests/run_all.sh $^

# concurrent attention calls under ThreadSanitizer
$(B)/tsan_threads: tests/test_threads.c $(HDR) | $(B)
	$(CLANG) $(WARN) $(SAN_FLAGS) -fsanitize=thread -o $@ tests/test_threads.c $(LDLIBS)
$(B)/tsan_threads_dispatch: tests/test_threads.c $(HDR) | $(B)
	$(CLANG) $(WARN) $(SAN_FLAGS) -DKVQ_RUNTIME_DISPATCH -fsanitize=thread -o $@ tests/test_threads.c $(LDLIBS)
tsan: $(B)/tsan_threads $(B)/tsan_threads_dispatch
	tests/run_all.sh $^

# ---- fuzzing (libFuzzer): FUZZ_SECONDS per target, seeds in tests/fuzz ----------
# fuzz_load builds a cache, mutates its image and uses what loads (seeds: written by
# tests/fuzz/make_seeds_load.py). It is compiled with KVQ_RUNTIME_DISPATCH, so each input
# also picks the ISA (scalar, AVX2, AVX-512), and without comparison tracing: kvq's
# per-element loops made that 2/3 of its time, and it runs ~4x as many inputs without
# (more coverage in 60 s; its input bytes are table indices, not values to match).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = deserialize api load
FUZZ_FLAGS = -std=c99 -g -O1 -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION \
             -fsanitize=fuzzer,address,undefined,float-cast-overflow -fno-sanitize-recover=all
FUZZ_EXTRA =
$(B)/fuzz_load: FUZZ_EXTRA = -DKVQ_RUNTIME_DISPATCH -fno-sanitize-coverage=trace-cmp
$(B)/fuzz_%: tests/fuzz/fuzz_%.c kvq.h | $(B)
	$(CLANG) $(FUZZ_FLAGS) $(FUZZ_EXTRA) -o $@ $< -lm
fuzz: $(addprefix $(B)/fuzz_,$(FUZZ_TARGETS))
	@for t in $(FUZZ_TARGETS); do \
	  rm -rf $(B)/corpus_$$t && mkdir -p $(B)/corpus_$$t && cp tests/fuzz/seeds_$$t/* $(B)/corpus_$$t/ && \
	  echo "fuzz_$$t: $(FUZZ_SECONDS) s" && \
	  if $(B)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -artifact_prefix=$(B)/ \
	       $(B)/corpus_$$t > $(B)/fuzz_$$t.log 2>&1; then grep -E 'executed_units|new_units' $(B)/fuzz_$$t.log; \
	  else tail -n 40 $(B)/fuzz_$$t.log; exit 1; fi; \
	done

# ---- static analysis: cppcheck and clang-tidy (.clang-tidy), gcc -fanalyzer ------
# Each tool sees kvq.h through tests/compile_b.c once per kernel set: portable C (no -march,
# scalar only); x86 with KVQ_RUNTIME_DISPATCH (AVX2 and AVX-512 under target attributes,
# cpuid dispatch); x86 with -m flags, AVX2 then AVX-512 (static dispatch, as -march=native
# builds); aarch64 (NEON, with the dot product kernels, $(NEON_ARCH); gcc -fanalyzer sees the
# plain armv8-a build; skipped without $(AARCH64_CC), whose headers `make neon` needs too).
# cppcheck does not run a compiler, so it gets the macros those flags define.
# clang-tidy reports nothing in a header unless told: --header-filter lets kvq.h's through.
# gcc -fanalyzer takes ~90 s on a SIMD build: x86 only as the dispatch build (the same
# kernels as the -m builds), with KVQ__ANALYZER: the unrolled integer attention kernels took it
# past 10 minutes, so there they are the portable ones (clang-tidy and cppcheck see the SIMD
# ones). Every step runs; lint fails at the end if one failed.
LINT_CPPCHECK = cppcheck --enable=warning,performance,portability --std=c99 --error-exitcode=1 -q \
                --suppress=missingIncludeSystem
LINT_TIDY     = clang-tidy --quiet --warnings-as-errors='*' --header-filter='.*'
LINT_AVX2     = -mavx2 -mfma -mf16c
LINT_AVX512   = $(LINT_AVX2) -mavx512f -mavx512bw -mavx512dq -mavx512vl
LINT_DEF_X86  = -D__GNUC__ -D__x86_64__
LINT_DEF_AVX2 = $(LINT_DEF_X86) -D__AVX2__ -D__FMA__ -D__F16C__
LINT_DEF_512  = $(LINT_DEF_AVX2) -D__AVX512F__ -D__AVX512BW__ -D__AVX512DQ__ -D__AVX512VL__
lint:
	@st=0; step() { echo "lint: $$*"; "$$@" || st=1; }; \
	step $(LINT_CPPCHECK) tests/compile_b.c tests/test_core.c tests/test_serialize.c; \
	step $(LINT_CPPCHECK) $(LINT_DEF_X86) -DKVQ_RUNTIME_DISPATCH tests/compile_b.c; \
	step $(LINT_CPPCHECK) $(LINT_DEF_AVX2) tests/compile_b.c; \
	step $(LINT_CPPCHECK) $(LINT_DEF_512) tests/compile_b.c; \
	step $(LINT_CPPCHECK) -D__GNUC__ -D__aarch64__ -D__ARM_FEATURE_DOTPROD tests/compile_b.c; \
	step $(LINT_TIDY) tests/compile_b.c tests/test_serialize.c -- -std=c99 -I. -DKVQ_NO_RUNTIME_DISPATCH; \
	step $(LINT_TIDY) tests/compile_b.c -- -std=c99 -I. -DKVQ_RUNTIME_DISPATCH; \
	step $(LINT_TIDY) tests/compile_b.c -- -std=c99 -I. $(LINT_AVX2); \
	step $(LINT_TIDY) tests/compile_b.c -- -std=c99 -I. $(LINT_AVX512); \
	step gcc -std=c99 -fanalyzer -Werror -DKVQ_NO_RUNTIME_DISPATCH -c -o /dev/null tests/compile_b.c; \
	step gcc -std=c99 -fanalyzer -Werror -DKVQ_RUNTIME_DISPATCH -DKVQ__ANALYZER -c -o /dev/null tests/compile_b.c; \
	if command -v $(AARCH64_CC) >/dev/null; then \
	  step $(LINT_TIDY) tests/compile_b.c -- -std=c99 -I. --target=aarch64-linux-gnu $(NEON_ARCH); \
	  step $(AARCH64_CC) -std=c99 -fanalyzer -Werror -c -o /dev/null tests/compile_b.c; \
	else echo "lint: NEON skipped: $(AARCH64_CC) not found"; fi; \
	exit $$st

# ---- everything that fits in CI's time ------------------------------------------
check: test asan ubsan tsan neon lint fuzz cuda-emu cuda-emu-asan package

# ---- NEON: cross-compiled, run under qemu -----------------------------------
# The tests target Armv8.2 with the dot product (sdot, udot: the integer attention kernels;
# qemu's default cpu has them). A plain armv8-a build, where those kernels are the scalar
# ones, is compiled too (neon_plain.o), so the fallback keeps building.
NEON_TESTS = core simd serialize rotate salient batch runtime
NEON_ARCH  = -march=armv8.2-a+dotprod
$(B)/neon_%: tests/test_%.c $(HDR) | $(B)
	$(AARCH64_CC) $(WARN) -O2 -static $(NEON_ARCH) -o $@ $< -lm
$(B)/neon_plain.o: tests/compile_b.c kvq.h | $(B)
	$(AARCH64_CC) $(WARN) -O2 -march=armv8-a -c -o $@ tests/compile_b.c
# the aarch64 run also loads a cache image saved by the native build
neon: $(addprefix $(B)/neon_,$(NEON_TESTS)) $(B)/neon_plain.o $(B)/test_serialize
	mkdir -p $(B)/xplat && $(B)/test_serialize --write $(B)/xplat >/dev/null
	tests/run_all.sh "$(QEMU) $(B)/neon_core" "$(QEMU) $(B)/neon_simd" "$(QEMU) $(B)/neon_rotate" \
	  "$(QEMU) $(B)/neon_salient" "$(QEMU) $(B)/neon_batch" "$(QEMU) $(B)/neon_runtime" \
	  "$(QEMU) $(B)/neon_serialize --check $(B)/xplat"

# ---- CUDA: compiled wherever nvcc is; the tests skip without a device -------------
NVCC      ?= nvcc
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
NVFLAGS   = -std=c++17 -O2 $(CUDA_ARCH) -I. -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
$(B)/test_cuda: tests/test_cuda.cu kvq_cuda.h kvq.h tests/test_util.h tests/hostile.h | $(B)
	$(NVCC) $(NVFLAGS) -o $@ tests/test_cuda.cu -lm
$(B)/bench_cuda: bench/bench_cuda.cu kvq_cuda.h kvq.h | $(B)
	$(NVCC) $(NVFLAGS) -o $@ bench/bench_cuda.cu -lm
cuda: $(B)/test_cuda $(B)/bench_cuda
	tests/run_all.sh $(B)/test_cuda

# ---- CUDA without a GPU: the kernels run on tests/cuda_emu's CPU emulator ---------
# launch.py rewrites <<<...>>> launches into build/emu/ copies; threads run in forward and
# reverse order (a missing barrier shows in one of them). -Wno-maybe-uninitialized: g++'s
# flow analysis cannot see loop counts >= 1 in the kernels; -fno-strict-aliasing: kernels
# load fp16 rows through uint4, as CUDA code does.
EMU_CXX  = g++ -std=c++17 -ffp-contract=off -fno-strict-aliasing -Wall -Wextra -Werror -Wno-maybe-uninitialized \
           -I$(B)/emu -Itests/cuda_emu -I. -Itests
EMU_DEPS = tests/cuda_emu/emu.cpp tests/cuda_emu/cuda_runtime.h tests/cuda_emu/cuda_fp16.h tests/test_util.h tests/hostile.h
EMU_GEN  = mkdir -p $(B)/emu && python3 tests/cuda_emu/launch.py $< $@
$(B)/emu/kvq_cuda.h: kvq_cuda.h tests/cuda_emu/launch.py | $(B)
	$(EMU_GEN)
$(B)/emu/test_cuda.cpp: tests/test_cuda.cu tests/cuda_emu/launch.py | $(B)
	$(EMU_GEN)
$(B)/emu/emu_selftest.cpp: tests/cuda_emu/emu_selftest.cu tests/cuda_emu/launch.py | $(B)
	$(EMU_GEN)
$(B)/emu_selftest: $(B)/emu/emu_selftest.cpp $(EMU_DEPS)
	$(EMU_CXX) $(CFLAGS) -o $@ $< tests/cuda_emu/emu.cpp -lm -pthread
$(B)/test_cuda_emu: $(B)/emu/test_cuda.cpp $(B)/emu/kvq_cuda.h kvq.h $(EMU_DEPS)
	$(EMU_CXX) $(CFLAGS) -o $@ $< tests/cuda_emu/emu.cpp -lm -pthread
cuda-emu: $(B)/emu_selftest $(B)/test_cuda_emu
	tests/run_all.sh $(B)/emu_selftest "$(B)/test_cuda_emu --quick" "env KVQ_EMU_ORDER=reverse $(B)/test_cuda_emu --quick"
# the same under ASan and UBSan: out-of-bounds device accesses in kernels abort with a report
$(B)/emu_selftest_asan: $(B)/emu/emu_selftest.cpp $(EMU_DEPS)
	$(EMU_CXX) $(SAN_FLAGS) -march=native -fsanitize=address,undefined -o $@ $< tests/cuda_emu/emu.cpp -lm -pthread
$(B)/test_cuda_emu_asan: $(B)/emu/test_cuda.cpp $(B)/emu/kvq_cuda.h kvq.h $(EMU_DEPS)
	$(EMU_CXX) $(SAN_FLAGS) -march=native -fsanitize=address,undefined -o $@ $< tests/cuda_emu/emu.cpp -lm -pthread
cuda-emu-asan: $(B)/emu_selftest_asan $(B)/test_cuda_emu_asan
	tests/run_all.sh $(B)/emu_selftest_asan "$(B)/test_cuda_emu_asan --quick"

# ---- examples, eval, bench ---------------------------------------------------
$(B)/quickstart: examples/quickstart.c kvq.h | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ examples/quickstart.c $(LDLIBS)
$(B)/llama: examples/llama.c examples/*.h kvq.h | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ examples/llama.c $(LDLIBS)
$(B)/kvq_eval: examples/kvq_eval.c examples/*.h kvq.h | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ examples/kvq_eval.c $(LDLIBS)
# no FMA contraction (clang's default): the dumps it writes do not depend on the CPU's FMA
$(B)/kvdump: examples/kvdump.c examples/*.h kvq.h | $(B)
	$(CC) $(WARN) $(CFLAGS) -ffp-contract=off -o $@ examples/kvdump.c $(LDLIBS)
$(B)/bench: bench/bench.c bench/bench_clock.h kvq.h | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ bench/bench.c $(LDLIBS)
$(B)/kernels: bench/kernels.c bench/bench_clock.h kvq.h | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ bench/kernels.c $(LDLIBS)

example: $(B)/llama $(B)/quickstart
	$(B)/quickstart
	$(B)/llama
# make eval: the two Llama dumps are generated from the checkpoints and token lists in
# examples/data (remade when one of them or kvdump changes); MiniLM-L6's dump cannot be
# (no model for it here: a BERT encoder, not a Llama), so it is read from $(SHARED) when
# there. EVAL_CONFIGS="k2v2 k2v2x10 ..." replaces kvq_eval's default configs.
SHARED ?= ../shared/data
EVAL_DUMPS = $(B)/stories260K_gen.kvd $(B)/babyllama105_gen.kvd
EVAL_CONFIGS =
$(B)/stories260K_gen.kvd: examples/data/stories260K.bin examples/data/stories260K_gen.tokens $(B)/kvdump
	$(B)/kvdump examples/data/stories260K.bin examples/data/stories260K_gen.tokens $@
$(B)/babyllama105_gen.kvd: examples/data/babyllama_tok105_model5000.bin examples/data/babyllama105_gen.tokens $(B)/kvdump
	$(B)/kvdump examples/data/babyllama_tok105_model5000.bin examples/data/babyllama105_gen.tokens $@
eval: $(B)/kvq_eval $(EVAL_DUMPS)
	@minilm=; if [ -f $(SHARED)/minilm_gpl3.kvd ]; then minilm=$(SHARED)/minilm_gpl3.kvd; fi; \
	$(B)/kvq_eval --csv $(B)/eval.csv --svg $(B)/eval.svg $(EVAL_DUMPS) $$minilm $(addprefix -c ,$(EVAL_CONFIGS)) || exit 1; \
	if [ -z "$$minilm" ]; then echo "MiniLM-L6: skipped: $(SHARED)/minilm_gpl3.kvd not found (its dump is not in the" \
	  "repository and cannot be generated here: no MiniLM model ships; make eval SHARED=DIR reads DIR/minilm_gpl3.kvd)"; fi
bench: $(B)/bench
	$(B)/bench --csv $(B)/bench.csv --svg $(B)/bench.svg
kernels: $(B)/kernels
	$(B)/kernels
	$(B)/kernels --heads 1

# ---- the README's figure: docs/overview.svg from build/eval.csv and build/bench.csv -----
# build/eval.csv comes from `make eval`; build/bench.csv from `make bench` (every config,
# both heads layouts, 1 and 2 threads) or a shorter run with what the figure draws:
#   build/bench --n 1K,4K,16K,64K --configs fp32,16,8,4,3,2 --threads 1 --heads gqa \
#     --csv build/bench.csv --svg build/bench.svg
# The figure says which CPU and when (bench.csv's '#' lines). FIGURE_NOTE="..." adds a note.
FIGURE_NOTE =
$(B)/overview: bench/overview.c | $(B)
	$(CC) $(WARN) $(CFLAGS) -o $@ bench/overview.c -lm
figure: $(B)/overview
	@for f in $(B)/eval.csv $(B)/bench.csv; do [ -f $$f ] || { echo "figure: $$f not found: make eval;" \
	  "build/bench ... --csv $(B)/bench.csv (see the Makefile)"; exit 1; }; done
	mkdir -p docs
	$(B)/overview $(if $(FIGURE_NOTE),--note "$(FIGURE_NOTE)") --configs fp32,kvq-8,kvq-4,kvq-2,kvq-k3v2 \
	  $(B)/eval.csv $(B)/bench.csv docs/overview.svg

# ---- install: the headers, pkg-config and CMake package files under PREFIX ------
PREFIX  ?= /usr/local
VERSION  = $(shell sed -n 's/^\#define KVQ_VERSION_STRING "\([0-9.]*\)".*/\1/p' kvq.h)
install:
	install -d $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/share/pkgconfig $(DESTDIR)$(PREFIX)/share/cmake/kvq
	install -m 644 kvq.h kvq_cuda.h $(DESTDIR)$(PREFIX)/include/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' kvq.pc.in > $(DESTDIR)$(PREFIX)/share/pkgconfig/kvq.pc
	install -m 644 cmake/kvqConfig.cmake $(DESTDIR)$(PREFIX)/share/cmake/kvq/
	sed -e 's|@VERSION@|$(VERSION)|' -e 's|@VERSION_MINOR@|$(word 2,$(subst ., ,$(VERSION)))|' \
	  cmake/kvqConfigVersion.cmake.in > $(DESTDIR)$(PREFIX)/share/cmake/kvq/kvqConfigVersion.cmake
# a consumer of each kind, built against a fresh install and against the source tree
package: | $(B)
	tests/test_package.sh $(B)/package

clean:
	rm -rf $(B)
