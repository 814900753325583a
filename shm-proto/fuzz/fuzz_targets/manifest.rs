//! The manifest phase of the batch state machine (BEGIN, ENTRY frames with hostile fields,
//! END_OF_MANIFEST, interleaved garbage) through the uploader's decoder: must never panic, and
//! what it accepts must be safe.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmback_proto::fuzzing::manifest_stream(data));
