//! `cargo +nightly fuzz run handshake -- ../tests/corpus/handshake`
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    silo_nbd::fuzz_support::handshake(data);
});
