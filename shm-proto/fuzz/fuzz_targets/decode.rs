//! Frame payload codec + batch state machine on arbitrary records: must never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmback_proto::fuzzing::decode_stream(data));
