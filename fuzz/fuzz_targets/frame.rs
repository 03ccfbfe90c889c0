//! Fuzzes the frame decoder: any payload decodes or errs, never panics; decoded frames re-encode.
#![no_main]

use clusterfs::proto::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        assert_eq!(Frame::decode(&frame.encode()).expect("re-encoded frames decode"), frame);
    }
});
