//! `custodia ledger rotate-key`: a new log signing key under a new origin.
//!
//! The log goes on as the same tree: its newest checkpoint is re-signed with
//! the new key under the new origin, and everything signed from then on
//! (checkpoints, and the receipts served against them) is signed so.
//! Receipts issued before verify with the old verifier key, which is kept
//! beside the new one (`ledger.vkey.<old origin as a file name>`); the old
//! signing key is kept aside (`ledger/log.key.retired-<unix time>`, owner
//! only) for the operator to destroy once the rotation is done. Witnesses
//! know a log by its origin and key: each must be given the new key
//! (`custodia witness --log-key`), as must every verifier of new receipts.
//!
//! Each step is safe to repeat after a crash (running the command again
//! with the same origin finishes the rotation): the new key is written
//! beside the old (`log.key.next`) and reused if there; the index's
//! checkpoint is re-signed (left as it is if it already is); the old
//! verifier key is kept; the new key replaces the old (one rename); then
//! `ledger.vkey`, and last `cluster.toml`, name the new key and origin.

use crate::cluster::{self, Cluster, LEDGER_VKEY_FILE};
use anyhow::{bail, Context, Result};
use std::path::Path;

pub async fn rotate_key(data_dir: &Path, origin: &str) -> Result<()> {
    let index = cluster::open_index_offline(data_dir).await?;
    let _edit = cluster::lock_cluster_edits(data_dir)?;
    let mut cluster = Cluster::load(data_dir)?;
    let Some(ledger) = cluster.gateway.ledger.as_mut() else {
        bail!("this cluster has no ledger");
    };
    if !protocol::ledger::origin_is_valid(origin) {
        bail!("{}", cluster::origin_problem(origin));
    }
    if origin == ledger.origin {
        bail!("the log's origin is {origin:?} already: give the new one");
    }
    let vkey_path = data_dir.join(LEDGER_VKEY_FILE);
    let published = std::fs::read_to_string(&vkey_path)
        .with_context(|| format!("reading {}", vkey_path.display()))?
        .trim()
        .to_owned();
    let current = std::fs::read_to_string(&ledger.signer_key)
        .with_context(|| format!("reading the log key {}", ledger.signer_key.display()))?
        .trim()
        .to_owned();
    let ours = |skey: &str| skey.starts_with(&format!("PRIVATE+KEY+{origin}+"));
    // A rotation to this origin cut short after the new key took the old
    // one's place: finished from there.
    let swapped = ours(&current);
    let next_path = ledger.signer_key.with_extension("key.next");
    let next = match std::fs::read_to_string(&next_path) {
        _ if swapped => current.clone(),
        Ok(key) if ours(key.trim()) => key.trim().to_owned(),
        // The key of a rotation to another origin, cut short: the index's
        // checkpoint may be signed with it already, and it must not be lost.
        Ok(key) => bail!(
            "{} holds the key of a rotation to {:?} that did not finish: run the command \
             again with that origin (or, if it never got as far as the index, remove the file)",
            next_path.display(),
            key.split('+').nth(2).unwrap_or("another origin")
        ),
        Err(_) => {
            let (skey, _) = protocol::ledger::note_keys(origin, &rand::random());
            storage_node::tls::write_private(&next_path, skey.as_bytes())?;
            skey
        }
    };
    let new_vkey = gateway::ledger::verifier_key_of(&next).context("the new key")?;
    // The key verifiers pinned until now: `ledger.vkey`, unless a cut-short
    // run replaced it already (then the copy kept below holds it).
    let old_vkey = if published == new_vkey {
        None
    } else {
        if !swapped && gateway::ledger::verifier_key_of(&current).as_deref() != Some(&published) {
            bail!(
                "{} does not hold the log key's verifier key: restore it before rotating",
                vkey_path.display()
            );
        }
        Some(published)
    };
    let resigned = match &old_vkey {
        Some(old) => {
            gateway::ledger::resign_newest_checkpoint(&index.store, old, &next, origin).await?
        }
        None => None,
    };
    drop(index.store);

    let kept_vkey = data_dir.join(format!(
        "{LEDGER_VKEY_FILE}.{}",
        ledger.origin.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '.' && c != '-',
            "_"
        )
    ));
    if let Some(old) = &old_vkey {
        match std::fs::read_to_string(&kept_vkey) {
            Ok(there) if there.trim() != old && !there.trim().is_empty() => bail!(
                "{} holds another key already (an earlier rotation from an origin of the \
                 same name): move it aside first",
                kept_vkey.display()
            ),
            _ => write_public(&kept_vkey, old)?,
        }
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let retired = ledger
        .signer_key
        .with_extension(format!("key.retired-{stamp}"));
    if !swapped {
        storage_node::tls::write_private(&retired, current.as_bytes())?;
        std::fs::rename(&next_path, &ledger.signer_key)?;
    }
    write_public(&vkey_path, &new_vkey)?;
    let ledger_dir = ledger.signer_key.parent().map(Path::to_path_buf);
    ledger.origin = origin.to_owned();
    cluster.gateway.validate()?;
    cluster.save(data_dir)?;
    for dir in [Some(data_dir), ledger_dir.as_deref()]
        .into_iter()
        .flatten()
    {
        std::fs::File::open(dir)?.sync_all()?;
    }

    println!("the log is now {origin:?}, signed with a new key");
    match resigned {
        Some(size) => println!("  its newest checkpoint (size {size}) is re-signed with it"),
        None => println!("  (no checkpoint to re-sign)"),
    }
    println!("  new verifier key   {}", vkey_path.display());
    println!("                     {new_vkey}");
    println!(
        "  old verifier key   {} (receipts issued before verify with it)",
        kept_vkey.display()
    );
    if !swapped {
        println!(
            "  old signing key    {} (destroy it once the rotation is done)",
            retired.display()
        );
    }
    println!(
        "give the new verifier key to every witness (custodia witness --log-key) and \
         verifier, then start the gateway"
    );
    Ok(())
}

/// Writes a verifier key (public: readable by all) to `path` durably.
fn write_public(path: &Path, key: &str) -> Result<()> {
    let (dir, name) = (
        path.parent().context("a key file without a directory")?,
        path.file_name()
            .and_then(|n| n.to_str())
            .context("a key file without a name")?,
    );
    storage_node::store::write_durably(dir, name, &[key.as_bytes(), b"\n"])?;
    Ok(())
}
