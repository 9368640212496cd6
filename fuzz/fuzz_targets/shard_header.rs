//! Shard files read from disk (a scrub, a recovered index): parsing the prefix
//! must never panic nor claim a body offset beyond the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::ShardHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, body_at)) = ShardHeader::parse_file_prefix(data) {
        assert!(body_at <= data.len());
        // What parsed writes back as a prefix that parses to the same
        // header (not necessarily the same bytes: postcard also reads
        // over-long varints, which it never writes).
        let again = header.file_prefix();
        let (back, at) = ShardHeader::parse_file_prefix(&again).expect("its own prefix parses");
        assert_eq!(back, header);
        assert_eq!(at, again.len());
    }
});
