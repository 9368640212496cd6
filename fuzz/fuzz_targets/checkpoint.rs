//! Checkpoint notes arrive at witnesses and verifiers from the network:
//! signed-note parsing, log and cosignature verification and the
//! add-checkpoint body must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (_, vkey) = protocol::ledger::note_keys("example.org/log", &[1; 32]);
    let _ = protocol::ledger::verify_checkpoint(text, &vkey);
    let (_, wkey) = protocol::witness::witness_keys("example.org/w", &[2; 32]);
    let _ = protocol::witness::cosigned_by(text, &[wkey]);
    let _ = protocol::witness::parse_add_checkpoint(text);
});
