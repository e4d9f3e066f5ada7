//! `cargo +nightly fuzz run requests -- ../tests/corpus/requests`
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    silo_nbd::fuzz_support::requests(data);
    silo_nbd::fuzz_support::requests_with_magic(data);
});
