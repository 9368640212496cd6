//! Tiles and entry bundles are fetched from mirrors anyone may run.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = protocol::ledger::parse_entry_bundle(data) {
        // Re-encoding what parsed gives back the same bytes.
        let again = protocol::ledger::entry_bundle(entries.iter().copied());
        assert_eq!(again, data);
    }
});
