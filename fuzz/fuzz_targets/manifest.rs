//! Manifest records read back from the index: decoding must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::{ManifestHeader, StripeRecord};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = ManifestHeader::decode(data) {
        assert_eq!(ManifestHeader::decode(&h.encode()).ok(), Some(h));
    }
    if let Ok(s) = StripeRecord::decode(data) {
        assert_eq!(StripeRecord::decode(&s.encode()).ok(), Some(s));
    }
});
