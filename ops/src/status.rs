//! `custodia status`: the cluster at a glance, from the gateway's
//! `GET /v1/admin/status` — a table of nodes, the repair backlog and the
//! ledger, or the JSON itself with `--json`.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fmt::Write as _;

/// Fetches the status; returns the JSON, once it is known to be a status
/// (its nodes and repair backlog): a stranger's answer is not printed as a
/// cluster of nulls, nor read as an empty backlog.
pub fn fetch(api: &str, token: &str) -> Result<Value> {
    let s = crate::client::admin_call(api, token, "GET", "/v1/admin/status")?;
    backlog(&s)?;
    if !s["nodes"].is_array() {
        anyhow::bail!(
            "the gateway's status names no nodes: is this a Custodia gateway of this version?"
        );
    }
    Ok(s)
}

/// Human units: 1.5 GiB.
pub fn bytes(v: Option<u64>) -> String {
    let Some(v) = v else { return "-".into() };
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = v as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
}

/// A node's state column: health, then the lifecycle when not active and
/// "full" when it takes no new shards, "writes-failing" while its disk
/// fails writes (passed over for new shards), "new-disk" while the stripes
/// of a node back with another disk are being queued (e.g. `up draining`,
/// `up full`, `up writes-failing`, `up new-disk`).
fn state(n: &Value) -> String {
    let mut state = n["state"].as_str().unwrap_or("?").to_owned();
    if let Some(l) = n["lifecycle"].as_str().filter(|l| *l != "active") {
        state = format!("{state} {l}");
    }
    if n["full"] == true {
        state.push_str(" full");
    }
    if n["writes_failing"] == true {
        state.push_str(" writes-failing");
    }
    if n["reconciling"] == true {
        state.push_str(" new-disk");
    }
    state
}

/// The table a person reads.
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
    // Removed nodes are listed (their shards may still be moving off) but
    // are no part of the cluster's count.
    let removed = |n: &&Value| n["lifecycle"] == "removed";
    let up = nodes
        .iter()
        .filter(|n| n["state"] == "up" && !removed(n))
        .count();
    let gone = nodes.iter().filter(removed).count();
    let _ = writeln!(
        out,
        "nodes: {up} of {} up{}, RS({},{})",
        nodes.len() - gone,
        match gone {
            0 => String::new(),
            n => format!(" ({n} removed)"),
        },
        s["code"]["k"],
        s["code"]["m"]
    );
    let _ = writeln!(
        out,
        "{:>4}  {:<20} {:<22} {:<10} {:>10} {:>10} {:>10} {:>8} {:>9} {:>8}",
        "NODE", "STATE", "ADDRESS", "DOMAIN", "CAPACITY", "USED", "FREE", "SHARDS", "SEEN", "SKEW"
    );
    for n in &nodes {
        let seen = n["last_seen_s"]
            .as_f64()
            .map(|s| format!("{s:.0}s ago"))
            .unwrap_or_else(|| "never".into());
        let _ = writeln!(
            out,
            "{:>4}  {:<20} {:<22} {:<10} {:>10} {:>10} {:>10} {:>8} {:>9} {:>8}",
            n["id"].as_u64().map_or("?".into(), |v| v.to_string()),
            state(n),
            n["addr"].as_str().unwrap_or("?"),
            n["failure_domain"].as_str().unwrap_or("-"),
            bytes(n["capacity_bytes"].as_u64()),
            bytes(n["used_bytes"].as_u64()),
            bytes(n["free_bytes"].as_u64()),
            n["shards"].as_u64().map_or("-".into(), |v| v.to_string()),
            seen,
            n["clock_offset_ms"]
                .as_i64()
                .map_or("-".into(), |ms| format!("{ms:+}ms"))
        );
    }
    let capped = if s["degraded_count_capped"] == true {
        " (at least)"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "repair backlog: {} degraded stripes{capped} in {} pieces of evidence",
        s["degraded_stripes"], s["degraded_evidence"]
    );
    let l = &s["ledger"];
    let age = match (l["checkpoint_age_s"].as_f64(), l["integrating"].as_bool()) {
        (Some(a), _) => format!("{a:.1} s"),
        (None, Some(false)) => "unknown here (another gateway integrates the ledger)".into(),
        (None, _) => "unknown".into(),
    };
    let _ = writeln!(
        out,
        "ledger: {} entries, checkpoint age {age}, {} witnesses (newest cosigned size {})",
        l["entries"].as_u64().unwrap_or(0),
        l["witnesses"],
        l["cosigned_entries"]
    );
    if let Some(line) = clock_line(&s["clock"]) {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// How the compliance clock (retention is judged by it) stands against
/// the system clock, and what last confirmed it.
fn clock_line(c: &Value) -> Option<String> {
    let offset = c["compliance_offset_s"].as_f64()?;
    let span = |s: f64| {
        let s = s.abs();
        if s < 120.0 {
            format!("{s:.1} s")
        } else if s < 7_200.0 {
            format!("{:.1} min", s / 60.0)
        } else if s < 172_800.0 {
            format!("{:.1} h", s / 3_600.0)
        } else {
            format!("{:.1} days", s / 86_400.0)
        }
    };
    let state = if offset > 1.0 {
        format!(
            "{} ahead of the system clock (the system clock was stepped back)",
            span(offset)
        )
    } else if offset < -1.0 {
        format!("{} behind the system clock", span(offset))
    } else {
        "with the system clock".to_owned()
    };
    let confirmed = match (c["confirmed_by"].as_str(), c["confirmed_s_ago"].as_f64()) {
        (Some(by), Some(ago)) => {
            let by = if by == "tsa" {
                "time-stamping authority"
            } else {
                by
            };
            format!("confirmed by the {by} {} ago", span(ago))
        }
        _ => "no independent time source confirmed it yet".to_owned(),
    };
    Some(format!("compliance clock: {state}; {confirmed}"))
}

/// `custodia repair`: wakes the repair worker and follows the backlog with
/// a progress bar until it is empty, or until it stops shrinking for
/// `patience` (stripes waiting on nodes within their grace period, or lost).
pub fn repair(
    api: &str,
    token: &str,
    verify_all: bool,
    patience: std::time::Duration,
) -> Result<()> {
    let path = if verify_all {
        "/v1/admin/repair?verify=all"
    } else {
        "/v1/admin/repair"
    };
    let started = crate::client::admin_call(api, token, "POST", path)?;
    let first = backlog(&started)?;
    // Stripes repair took out of its queue: how progress is measured while
    // the backlog is larger than the gateway counts (its count then stays
    // at the cap for a long while).
    let settled = |s: &serde_json::Value| s["repair_settled_stripes"].as_u64().unwrap_or(0);
    let settled_at_start = settled(&started);
    let mut best_settled = settled_at_start;
    let bar = indicatif::ProgressBar::new(first.max(1));
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "repair [{bar:40}] {pos}/{len} stripes {per_sec} eta {eta} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut best = first;
    let mut since = std::time::Instant::now();
    loop {
        let s = fetch(api, token)?;
        let left = backlog(&s)?;
        let capped = s["degraded_count_capped"] == true;
        let done = settled(&s).saturating_sub(settled_at_start);
        if capped {
            // At least `left` to go: the bar's end moves with it.
            bar.set_length(done + left);
            bar.set_position(done);
        } else {
            if left > bar.length().unwrap_or(0) {
                bar.set_length(left);
            }
            bar.set_position(bar.length().unwrap_or(0).saturating_sub(left));
        }
        // A node back with another disk: until its stripes are all queued
        // an empty backlog says nothing.
        let reconciling = s["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["reconciling"] == true));
        // A node down or suspect within its grace period holds shards that
        // nothing queues until it is back or gone for good: an empty backlog
        // does not make them verified.
        let unverified = not_up(&s);
        if left == 0 && !reconciling && unverified.is_empty() {
            bar.finish_and_clear();
            // Said on stdout whether or not a terminal shows the bar (cron,
            // CI): a repair that ends in silence reads as one that did not.
            // Only a pass over every stripe (--verify-all) read them all;
            // otherwise what was queued (damage a read or scrub met, nodes
            // lost or drained) was repaired.
            let unreadable = started["stripe_records_unreadable"].as_u64().unwrap_or(0);
            if verify_all && unreadable > 0 {
                anyhow::bail!(
                    "repair done, except {unreadable} stripe records that do not decode \
                     (damaged, or written by a newer version): nothing is known of their \
                     shards; the gateway's log names them"
                );
            }
            if verify_all {
                println!("repair done: every stripe has k+m verified shards");
            } else {
                println!(
                    "repair done: every stripe queued for repair has k+m verified shards \
                     (--verify-all reads every stripe)"
                );
            }
            return Ok(());
        }
        // While the count is capped it stays put: then what repair took out
        // of its queue is the progress (otherwise it could be another
        // node's, and the backlog asked about be stuck).
        if left < best || capped && settled(&s) > best_settled {
            best = best.min(left);
            best_settled = best_settled.max(settled(&s));
            since = std::time::Instant::now();
        } else if since.elapsed() >= patience {
            let (short, why) = why_not_done(&s, left);
            bar.abandon_with_message(short);
            anyhow::bail!(why);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// Why a repair that stopped making progress with `left` stripes queued
/// is not done, as the status `s` says: (the progress bar's last word, the
/// error).
fn why_not_done(s: &serde_json::Value, left: u64) -> (String, String) {
    let unverified = not_up(s);
    let reconciling: Vec<String> = s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["reconciling"] == true)
        .map(|n| format!("node {}", n["id"]))
        .collect();
    if left == 0 && !unverified.is_empty() {
        return (
            "the backlog is empty, but not every node is up".into(),
            format!(
                "the shards on {} are not verified: the node is not up, and its stripes \
                 are queued only once it is back or past its grace period (custodia status)",
                unverified.join(", ")
            ),
        );
    }
    if left == 0 && !reconciling.is_empty() {
        return (
            "the backlog is empty, but a new disk is being checked".into(),
            format!(
                "{} came back with another disk, and its stripes are still being queued for \
                 repair: run custodia repair again shortly (custodia status shows it)",
                reconciling.join(", ")
            ),
        );
    }
    (
        format!("{left} stripes still queued"),
        format!(
            "{left} stripes could not be repaired yet (nodes within their grace \
             period, too few nodes, or lost stripes: see the gateway's log and \
             custodia status)"
        ),
    )
}

/// The repair backlog an answer reports. An answer without it is not one
/// this command can judge: never read as an empty backlog (a success).
fn backlog(answer: &serde_json::Value) -> Result<u64> {
    answer["degraded_stripes"].as_u64().with_context(|| {
        format!(
            "the gateway's answer has no repair backlog (degraded_stripes): is this a \
             Custodia gateway of this version? {}",
            answer.to_string().chars().take(200).collect::<String>()
        )
    })
}

/// The nodes of a status answer that are not up but not given up on yet
/// (within their grace period, "node 3 (down)"): their shards are neither
/// readable nor queued for repair.
fn not_up(status: &serde_json::Value) -> Vec<String> {
    status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["awaiting_grace"] == true)
        .map(|n| {
            format!(
                "node {} ({})",
                n["id"],
                n["state"].as_str().unwrap_or("unknown")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_within_their_grace_are_named() {
        let status = serde_json::json!({ "nodes": [
            { "id": 1, "state": "up", "awaiting_grace": false },
            { "id": 2, "state": "down", "awaiting_grace": true },
            { "id": 3, "state": "suspect", "awaiting_grace": true },
            { "id": 4, "state": "down", "awaiting_grace": false },
        ]});
        assert_eq!(not_up(&status), ["node 2 (down)", "node 3 (suspect)"]);
        assert!(not_up(&serde_json::json!({})).is_empty());
    }

    /// A repair that stops with nothing queued says why it is not done:
    /// a node not up, or one whose new disk is still being queued, not
    /// "0 stripes could not be repaired".
    #[test]
    fn a_stopped_repair_says_why() {
        let reconciling = serde_json::json!({ "nodes": [
            { "id": 1, "state": "up", "awaiting_grace": false },
            { "id": 5, "state": "up", "awaiting_grace": false, "reconciling": true },
        ]});
        let (_, why) = why_not_done(&reconciling, 0);
        assert!(why.contains("node 5 came back with another disk"), "{why}");
        let (_, why) = why_not_done(&reconciling, 3);
        assert!(why.starts_with("3 stripes could not be repaired"), "{why}");
        let down = serde_json::json!({ "nodes": [
            { "id": 2, "state": "down", "awaiting_grace": true },
        ]});
        let (_, why) = why_not_done(&down, 0);
        assert!(why.contains("node 2 (down) are not verified"), "{why}");
    }

    #[test]
    fn sizes_read_like_a_person_writes_them() {
        assert_eq!(bytes(None), "-");
        assert_eq!(bytes(Some(512)), "512 B");
        assert_eq!(bytes(Some(1536)), "1.5 KiB");
        assert_eq!(bytes(Some(3 << 30)), "3.0 GiB");
    }

    #[test]
    fn the_table_names_every_node_and_the_backlog() {
        let s = serde_json::json!({
            "code": {"k": 4, "m": 2},
            "nodes": [
                {"id": 0, "state": "up", "addr": "127.0.0.1:7100", "capacity_bytes": 1u64 << 40,
                 "used_bytes": 1u64 << 30, "free_bytes": 1u64 << 39, "shards": 12, "last_seen_s": 1.2,
                 "writes_failing": true},
                {"id": 1, "state": "down", "addr": "127.0.0.1:7101", "last_seen_s": null},
                {"id": 2, "state": "up", "lifecycle": "draining", "full": true,
                 "addr": "127.0.0.1:7102", "last_seen_s": 0.4},
                {"id": 3, "state": "up", "lifecycle": "active", "full": true,
                 "addr": "127.0.0.1:7103", "last_seen_s": 0.4},
                {"id": 4, "state": "up", "lifecycle": "removed",
                 "addr": "127.0.0.1:7104", "last_seen_s": 0.4},
            ],
            "degraded_stripes": 7, "degraded_evidence": 2, "degraded_count_capped": false,
            "ledger": {"entries": 42, "checkpoint_age_s": 0.5, "witnesses": 0, "cosigned_entries": 0},
            "clock": {"compliance_offset_s": -5_400.0, "confirmed_by": null},
        });
        let t = render(&s);
        assert!(t.contains("nodes: 3 of 4 up (1 removed), RS(4,2)"), "{t}");
        let row = |id: &str| {
            t.lines()
                .find(|l| l.trim_start().starts_with(id))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(row("2 ").contains("up draining full"), "{t}");
        assert!(row("3 ").contains("up full "), "{t}");
        assert!(!row("0 ").contains("full"), "{t}");
        assert!(row("0 ").contains("up writes-failing"), "{t}");
        assert!(!row("3 ").contains("writes-failing"), "{t}");
        assert!(t.contains("1.0 TiB") && t.contains("never"), "{t}");
        assert!(t.contains("down"), "{t}");
        assert!(t.contains("7 degraded stripes in 2 pieces"), "{t}");
        assert!(
            t.contains("ledger: 42 entries, checkpoint age 0.5 s"),
            "{t}"
        );
        assert!(
            t.contains("compliance clock: 90.0 min behind the system clock; no independent"),
            "{t}"
        );
        let c = serde_json::json!({"compliance_offset_s": 86_400.0,
                                   "confirmed_by": "witnesses", "confirmed_s_ago": 3.0});
        assert_eq!(
            clock_line(&c).unwrap_or_default(),
            "compliance clock: 24.0 h ahead of the system clock (the system clock was stepped \
             back); confirmed by the witnesses 3.0 s ago"
        );
    }
}
