#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stackless_init::fuzzing::git_output(data));
