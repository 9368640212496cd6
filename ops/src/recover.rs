//! `custodia recover-index`: rebuilds DATA_DIR's index from the ledger's
//! openings archive, the published checkpoint and the storage nodes (see
//! `gateway::recover`), with the gateway stopped and every node running.
//!
//! The new index is built in a separate file and only swapped in when
//! recovery succeeded; the old file (if any) is kept beside it, renamed,
//! never deleted.

use crate::cluster::{self, Cluster};
use anyhow::{bail, Context, Result};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub async fn run(data_dir: &Path, allow_down: bool, trust_archive: bool, json: bool) -> Result<()> {
    // Held until the new index is in place: no gateway (which takes the
    // same lock) starts and files evidence into the index being replaced.
    let _lock = cluster::lock_cluster_dir(data_dir)?;
    let cluster = Cluster::load(data_dir)?;
    let index = cluster.gateway.index_path.clone();
    if index.exists() {
        // redb holds an exclusive lock on an open index: a gateway (one
        // started some other way, without the data directory's lock) must
        // not have its index replaced under it.
        let file =
            std::fs::File::open(&index).with_context(|| format!("opening {}", index.display()))?;
        if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock() {
            bail!(
                "the index {} is open in a running gateway; stop the gateway first",
                index.display()
            );
        }
    }
    let building = with_suffix(&index, "recovering");
    match std::fs::remove_file(&building) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context(format!("removing {}", building.display())),
    }
    let store = indexer::EmbeddedStore::open(&building)
        .with_context(|| format!("creating {}", building.display()))?;
    let mut config = cluster.gateway.clone();
    config.index_path = building.clone();
    let gw = gateway::Gateway::new(config, store, &prometheus::Registry::new())
        .context("starting the recovery")?;
    let report =
        gateway::recover::recover_index(&gw, allow_down, trust_archive, &|msg| eprintln!("{msg}"))
            .await
            .context("recovering the index")?;
    let revoked = match &gw.ledger {
        Some(ledger) => gateway::credentials::archived_revocations(ledger)
            .await
            .context("reading the revoked credentials in the openings archive")?,
        None => Default::default(),
    };
    let restored = restore_credentials(&gw.store, data_dir, &revoked).await?;
    drop(gw);

    // The old index is kept under a second name first, then the new one
    // takes its name in one rename: at no moment is there no index (a
    // crash in between must not leave a cluster that the next start would
    // take for a new, empty one).
    if index.exists() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // (Never over an earlier one: two recoveries in one second.)
        let mut n = 0;
        let aside = loop {
            let name = match n {
                0 => format!("replaced-{stamp}"),
                n => format!("replaced-{stamp}-{n}"),
            };
            let aside = with_suffix(&index, &name);
            // A hard link costs nothing; a file system without them gets
            // a copy (made durable: the rename below replaces the original).
            let kept = std::fs::hard_link(&index, &aside).or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
                let mut from = std::fs::File::open(&index)?;
                // Owner only, as the index itself: it holds the S3 keys.
                let mut to = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&aside)?;
                let copied = std::io::copy(&mut from, &mut to).and_then(|_| to.sync_all());
                if let Err(copy) = copied {
                    // No half copy that looks like a kept index.
                    let _ = std::fs::remove_file(&aside);
                    return Err(std::io::Error::new(
                        copy.kind(),
                        format!("no hard link ({e}), and the copy failed: {copy}"),
                    ));
                }
                Ok(())
            });
            match kept {
                Ok(()) => break aside,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("keeping the old index as {}", aside.display()))
                }
            }
        };
        // The kept one durable before the rename replaces the original.
        if let Some(dir) = index.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        eprintln!("the old index is kept as {}", aside.display());
    }
    std::fs::rename(&building, &index)?;
    if let Some(dir) = index.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }

    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("index recovered into {}", index.display());
        println!(
            "  ledger       {} leaves (published checkpoint: {})",
            report.ledger_leaves, report.checkpoint_size
        );
        println!(
            "  evidence     {} read back and verified ({} bytes), {} expunged, {} hash-only notarizations",
            report.evidence - report.unreadable.len() as u64,
            report.bytes_verified,
            report.expunged,
            report.notarized
        );
        println!(
            "  stripes      {} ({} queued for repair)",
            report.stripes, report.stripes_degraded
        );
        println!(
            "  nodes        {} listed, {} shards{}",
            report.nodes_listed,
            report.shards_listed,
            if report.nodes_down.is_empty() {
                String::new()
            } else {
                format!(", down: {:?}", report.nodes_down)
            }
        );
        if !report.nodes_draining.is_empty() || !report.nodes_removed.is_empty() {
            println!(
                "  decisions    draining: {:?}, removed: {:?} (restored from the archive)",
                report.nodes_draining, report.nodes_removed
            );
        }
        match report.compliance_clock_ms {
            Some(ms) => println!(
                "  clock        compliance clock restored from the archive: {}",
                crate::verify::rfc3339_ms(ms)
            ),
            None => println!(
                "  clock        no compliance clock in the archive (an archive from before it was \
                 kept there): it starts at the newest filing's time"
            ),
        }
        println!(
            "  unclaimed    {} shards of {} pieces of evidence the archive does not name",
            report.orphan_shards, report.orphan_evidence
        );
        if report.orphan_evidence > 0 {
            println!(
                "               (uploads that failed, parts of S3 multipart uploads under way, \
                 or filings the archive had not caught up with: kept, not collected, until \
                 `custodia release-unclaimed`)"
            );
            for id in &report.unclaimed {
                println!("               {id}");
            }
            if report.orphan_evidence > report.unclaimed.len() as u64 {
                println!(
                    "               ... and {} more (`custodia release-unclaimed --list`)",
                    report.orphan_evidence - report.unclaimed.len() as u64
                );
            }
        }
        println!(
            "  tenants      {}",
            report
                .tenants
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("  credentials  {}", restored.join(", "));
        println!(
            "  s3           {} tenants, {} buckets, {} object versions and delete markers",
            report.s3_tenants, report.s3_buckets, report.s3_versions
        );
        for (id, why) in &report.unreadable {
            println!("  UNREADABLE   {id}: {why}");
        }
        for (bucket, key, id) in &report.s3_versions_dropped {
            println!(
                "  S3 DROPPED   s3://{bucket}/{key} version {id}: its evidence was not recovered"
            );
        }
        for id in &report.header_not_as_filed {
            println!(
                "  NOT AS FILED {id}: its archived header named another tenant, case or content \
                 than its filed statement; restored as notarized"
            );
        }
        for id in &report.release_not_logged {
            println!(
                "  STILL HELD   {id}: the ledger's last word on it is a legal hold (its release \
                 was never notarized); restored held: give the release again"
            );
        }
        for id in &report.hold_not_logged {
            println!(
                "  HELD         {id}: its S3 version is under a legal hold the ledger had not \
                 taken yet; restored held"
            );
        }
        for id in &report.expunge_not_logged {
            println!(
                "  NOT EXPUNGED {id}: its expunge was never notarized before the index was lost; \
                 restored as it was: give the order again"
            );
        }
        println!("not recovered (no archive holds them):");
        for what in &report.not_recovered {
            println!("  - {what}");
        }
        println!("  (issue other tenants' keys anew with `custodia key create`)");
    }
    if !report.unreadable.is_empty() {
        bail!(
            "{} pieces of evidence could not be read back; they are indexed and queued for repair",
            report.unreadable.len()
        );
    }
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{suffix}"));
    PathBuf::from(name)
}

/// Registers the admin credentials DATA_DIR's files hold (`admin.token`,
/// `s3.credentials`), so the operator's tools keep working; returns what was
/// restored.
async fn restore_credentials<S: indexer::KvStore>(
    store: &S,
    data_dir: &Path,
    revoked: &std::collections::HashSet<String>,
) -> Result<Vec<String>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    cluster::create_tenant(store, "admin", now).await?;
    let token = std::fs::read_to_string(data_dir.join(cluster::ADMIN_TOKEN_FILE))
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    let s3 = std::fs::read_to_string(data_dir.join(cluster::S3_CREDENTIALS_FILE))
        .ok()
        .and_then(|text| {
            let field = |name| cluster::credentials_field(&text, name);
            Some((field("aws_access_key_id")?, field("aws_secret_access_key")?))
        });
    // Revoked through the admin API while a file still held it: never
    // brought back.
    let token = token.filter(|t| {
        let gone = revoked.contains(&gateway::credentials::revoked_token_name(t));
        if gone {
            eprintln!(
                "{} holds a revoked token: not restored (`custodia key create --tenant admin \
                 --role admin` makes a new credential to put there)",
                data_dir.join(cluster::ADMIN_TOKEN_FILE).display()
            );
        }
        !gone
    });
    let s3 = s3.filter(|(id, _)| {
        let gone = revoked.contains(&gateway::credentials::revoked_access_key_name(id));
        if gone {
            eprintln!(
                "{} holds a revoked access key ({id}): not restored",
                data_dir.join(cluster::S3_CREDENTIALS_FILE).display()
            );
        }
        !gone
    });
    let mut restored = Vec::new();
    indexer::run(store, |tx| {
        let (token, s3) = (&token, &s3);
        async move {
            if let Some(t) = token {
                indexer::schema::put_token_tx(
                    &tx,
                    t,
                    &indexer::schema::TokenRecord {
                        tenant: "admin".into(),
                        role: indexer::schema::Role::Admin,
                    },
                )?;
            }
            if let Some((id, secret)) = s3 {
                indexer::s3::put_access_key_tx(
                    &tx,
                    id,
                    &indexer::s3::AccessKeyRecord {
                        tenant: "admin".into(),
                        role: indexer::schema::Role::Admin,
                        secret: secret.clone(),
                        bypass_governance: false,
                    },
                )
                .await?;
            }
            Ok::<_, indexer::s3::ObjectError>(())
        }
    })
    .await?;
    if token.is_some() {
        restored.push(cluster::ADMIN_TOKEN_FILE.to_owned());
    }
    if s3.is_some() {
        restored.push(cluster::S3_CREDENTIALS_FILE.to_owned());
    }
    Ok(restored)
}

/// `custodia release-unclaimed`: lists the evidence `recover-index` held
/// (shards no filing in the archive names), or lets GC collect it: all of
/// it, or the ids given.
pub async fn release_unclaimed(data_dir: &Path, list: bool, ids: &[String]) -> Result<()> {
    let index = crate::cluster::open_index_offline(data_dir).await?;
    let chosen = ids
        .iter()
        .map(|s| {
            s.parse::<protocol::EvidenceId>()
                .map_err(|_| anyhow::anyhow!("{s:?} is not an evidence id"))
        })
        .collect::<Result<Vec<_>>>()?;
    let held = indexer::run(&index.store, |tx| async move {
        indexer::schema::unclaimed_tx(&tx, 0).await
    })
    .await
    .context("reading the held evidence")?;
    if list {
        for id in &held {
            println!("{id}");
        }
        eprintln!("{} held", held.len());
        return Ok(());
    }
    let release: Vec<protocol::EvidenceId> = if chosen.is_empty() {
        held
    } else {
        for id in &chosen {
            if !held.contains(id) {
                bail!("{id} is not held (see `custodia release-unclaimed --list`)");
            }
        }
        chosen
    };
    for chunk in release.chunks(512) {
        indexer::run(&index.store, |tx| async move {
            for id in chunk {
                indexer::schema::release_unclaimed_tx(&tx, *id);
            }
            Ok::<_, indexer::schema::SchemaError>(())
        })
        .await
        .context("releasing held evidence")?;
    }
    println!(
        "released {}: the orphan sweep collects their shards after its grace",
        release.len()
    );
    Ok(())
}
