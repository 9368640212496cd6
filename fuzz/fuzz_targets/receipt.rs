//! Receipts come from anyone (a party to a case hands one to the court):
//! parsing and verifying arbitrary bytes must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<protocol::Receipt>(data) {
        let (_, key) = protocol::ledger::note_keys("custodia.local/ledger", &[1; 32]);
        let _ = r.verify(&key);
    }
    let _ = protocol::ledger::Statement::decode(data);
});
