#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    univ_fuzz::harness::label_map(data);
});
