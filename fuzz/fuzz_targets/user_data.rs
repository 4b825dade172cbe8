#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stackless_init::fuzzing::user_data(data));
