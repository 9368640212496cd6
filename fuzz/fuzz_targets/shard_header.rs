//! Shard files read from disk (a scrub, a recovered index): parsing the prefix
//! must never panic nor claim a body offset beyond the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::ShardHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, body_at)) = ShardHeader::parse_file_prefix(data) {
        assert!(body_at <= data.len());
        assert_eq!(header.file_prefix().len(), body_at);
    }
});
