//! Frames a storage node or gateway reads from the network: decoding must never
//! panic, and whatever decodes must re-encode to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::decode_frame(data) {
        assert_eq!(Request::decode_frame(&req.encode()).ok(), Some(req));
    }
    if let Ok(resp) = Response::decode_body(data) {
        let frame = resp.encode();
        assert_eq!(Response::decode_body(&frame[protocol::wire::FRAME_PREFIX..]).ok(), Some(resp));
    }
    if let Ok(prefix) = <[u8; protocol::wire::FRAME_PREFIX]>::try_from(data.get(..5).unwrap_or(&[])) {
        if let Ok(len) = protocol::wire::decode_frame_prefix(&prefix) {
            assert!(len <= protocol::wire::MAX_FRAME);
        }
    }
});
