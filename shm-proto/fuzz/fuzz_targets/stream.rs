//! The stream form of frames (an HTTP body) pushed in arbitrary chunks through the receiver's
//! FrameAssembler, then the frame codec and the batch state machine: must never panic, and the
//! assembler must stay within its memory bound.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shmback_proto::stream::fuzz_chunks(data));
