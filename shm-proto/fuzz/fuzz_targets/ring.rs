//! The consumer reading a ring a hostile producer filled: must never panic or read out of bounds.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmback_proto::fuzzing::read_hostile_ring(data));
