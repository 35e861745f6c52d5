# swift-tpm-frontend: the README's two commands are `make demo` and `make test`.
SWIFT ?= swift
BIN_DEBUG := .build/debug

.PHONY: demo test bench deps deps-build build fuzz clean

# Build dependencies only (libtpms-dev, libssl-dev, pkg-config).
deps-build:
	@bash scripts/install-deps.sh build

# Everything the tests need too (swtpm, swtpm-tools, QEMU 7.2, tpm2-tools).
deps:
	@bash scripts/install-deps.sh

build: deps-build
	$(SWIFT) build --product tis-sim

# The main job: an embedded TPM 2.0 driven through the TIS registers.
demo: build
	$(BIN_DEBUG)/tis-sim demo

# Every test: unit tests, and end-to-end tests against the real libtpms, swtpm and QEMU 7.2.
test: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

# Benchmarks, release mode, ratios against references measured in the same run.
bench: deps
	$(SWIFT) build -c release --product tis-bench
	.build/release/tis-bench --markdown BENCHMARKS.md

# libFuzzer runs of the three fuzz targets (Fuzz/, docs/FUZZING.md), FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
fuzz: deps-build
	cd Fuzz && $(SWIFT) build -c release --sanitize=fuzzer
	Fuzz/runs.sh TISFuzz tis $(FUZZ_SECONDS) -max_len=8192 -len_control=0
	Fuzz/runs.sh StreamFuzz stream $(FUZZ_SECONDS) -max_len=8192 -len_control=0
	Fuzz/runs.sh CtrlReplyFuzz ctrl $(FUZZ_SECONDS)

clean:
	rm -rf .build
