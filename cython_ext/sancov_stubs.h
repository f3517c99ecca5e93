/* sancov_stubs.h: force-included (-include) into every extension of the fuzz build
 * (PYVHOST_FUZZ_BUILD=1, setup.py) and nowhere else.
 *
 * The fuzz build compiles the extensions with clang's -fsanitize=fuzzer-no-link (SanitizerCoverage:
 * inline 8-bit counters, PC tables, comparison tracing), whose instrumentation calls into
 * libFuzzer.  libFuzzer lives in atheris's core module; the fuzz runner (tests/fuzz) loads that
 * module RTLD_GLOBAL *before* importing any extension, so the dynamic linker binds these calls to
 * libFuzzer (the global scope is searched before the extension's own symbols).  Without the
 * runner (the test suite, the programs) nothing defines them globally and these weak no-op
 * definitions are used instead, so a fuzz build is also an ordinary debug build.
 *
 * `pyvhost_sancov_stubbed` tells whether this extension's counters went to the stubs (1) or to
 * libFuzzer (0); the runner checks it.  None of this is instrumented itself. */
#ifndef PYVHOST_SANCOV_STUBS_H
#define PYVHOST_SANCOV_STUBS_H
/* No #include here: this comes before Python.h, which must be first to set _GNU_SOURCE. */
typedef __UINT8_TYPE__ pyvhost_u8;
typedef __UINT16_TYPE__ pyvhost_u16;
typedef __UINT32_TYPE__ pyvhost_u32;
typedef __UINT64_TYPE__ pyvhost_u64;
typedef __UINTPTR_TYPE__ pyvhost_uptr;

#define PYVHOST_SANCOV_STUB __attribute__((weak, visibility("default"), no_sanitize("coverage")))

int pyvhost_sancov_stubbed __attribute__((visibility("default"))) = 0;

PYVHOST_SANCOV_STUB void __sanitizer_cov_8bit_counters_init(pyvhost_u8 *start,
                                                           pyvhost_u8 *stop) {
    (void)start; (void)stop;
    pyvhost_sancov_stubbed = 1;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_pcs_init(const pyvhost_uptr *beg,
                                                  const pyvhost_uptr *end) {
    (void)beg; (void)end;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_pc_indir(pyvhost_uptr callee) { (void)callee; }
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_cmp1(pyvhost_u8 a, pyvhost_u8 b) {
    (void)a; (void)b;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_cmp2(pyvhost_u16 a, pyvhost_u16 b) {
    (void)a; (void)b;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_cmp4(pyvhost_u32 a, pyvhost_u32 b) {
    (void)a; (void)b;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_cmp8(pyvhost_u64 a, pyvhost_u64 b) {
    (void)a; (void)b;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_const_cmp1(pyvhost_u8 a, pyvhost_u8 b) {
    (void)a; (void)b;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_const_cmp2(pyvhost_u16 a, pyvhost_u16 b) {
    (void)a; (void)b;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_const_cmp4(pyvhost_u32 a, pyvhost_u32 b) {
    (void)a; (void)b;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_const_cmp8(pyvhost_u64 a, pyvhost_u64 b) {
    (void)a; (void)b;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_switch(pyvhost_u64 val, pyvhost_u64 *cases) {
    (void)val; (void)cases;
}
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_div4(pyvhost_u32 val) { (void)val; }
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_div8(pyvhost_u64 val) { (void)val; }
PYVHOST_SANCOV_STUB void __sanitizer_cov_trace_gep(pyvhost_uptr idx) { (void)idx; }
#endif
