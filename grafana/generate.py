#!/usr/bin/env python3
"""Writes Custodia's Grafana dashboards (dashboards/*.json) from the panel
lists below: one place to read every query, and JSON that stays uniform.
Run it after editing; the JSON is committed (Grafana provisions it as is)
and tests/tests/metrics.rs checks every panel's query against a live
cluster scraped by a real Prometheus."""

import json
import pathlib

DS = {"type": "prometheus", "uid": "custodia-prometheus"}


def panel(title, exprs, unit="short", kind="timeseries", legend=None, desc=""):
    if isinstance(exprs, str):
        exprs = [exprs]
    legend = legend or [""] * len(exprs)
    return {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
            for i, (e, l) in enumerate(zip(exprs, legend))
        ],
    }


def stat(title, expr, unit="short", desc=""):
    return panel(title, expr, unit, kind="stat", desc=desc)


# A 5xx series exists only once a 5xx happened: `or ... * 0` keeps the panel
# at 0 instead of "no data".
ERRORS = (
    'sum by (api) (rate(custodia_http_requests_total{status=~"5.."}[1m]))'
    " or sum by (api) (rate(custodia_http_requests_total[1m])) * 0"
)
# Timestamps are exported once known (`> 0`: an older gateway exported 0
# until then, which would read as 55 years).
CHECKPOINT_AGE = "time() - max(custodia_ledger_integrated_timestamp_seconds > 0)"
S3_JOURNAL_AGE = "time() - max(custodia_s3_journal_synced_timestamp_seconds > 0)"
# Every gateway exports the same cluster-wide view (nodes, degraded stripes,
# orphans) from the index: take one (max), never the sum over gateways.
NODES_UP = "count(max by (node) (custodia_cluster_node_up) == 1) or vector(0)"
NODES_NOT_UP = "count(max by (node) (custodia_cluster_node_up) == 0) or vector(0)"
DEGRADED = "max(custodia_degraded_stripes)"
LOST = "max(custodia_lost_stripes)"

DASHBOARDS = {
    "overview": (
        "Custodia / Overview",
        [
            stat("Nodes up", NODES_UP, desc="Nodes that answered a gateway's last probe (removed nodes are not counted)."),
            stat("Degraded stripes", DEGRADED, desc="Stripes waiting for repair."),
            stat("Ledger entries", "max(custodia_ledger_entries)"),
            stat("Checkpoint age", CHECKPOINT_AGE, "s", desc="Since a signed checkpoint last covered every waiting entry."),
            panel("Filings per second", "sum(rate(custodia_filings_total[1m]))", "ops"),
            panel("Ingest and read throughput", ["sum(rate(custodia_ingest_bytes_total[1m]))", "sum(rate(custodia_read_bytes_total[1m]))"], "Bps", legend=["ingest", "read"]),
            panel("HTTP 5xx per second", ERRORS, "reqps", legend=["{{api}}"]),
            panel("Disk used (fraction)", "max by (node) (1 - custodia_cluster_node_free_bytes / custodia_cluster_node_capacity_bytes)", "percentunit", legend=["node {{node}}"]),
        ],
    ),
    "ingest-reads": (
        "Custodia / Ingest and reads",
        [
            panel("Requests per second by route", "sum by (api, route, status) (rate(custodia_http_requests_total[1m]))", "reqps", legend=["{{api}} {{route}} {{status}}"]),
            panel("p99 latency by route", "histogram_quantile(0.99, sum by (api, route, le) (rate(custodia_http_request_duration_seconds_bucket[5m])))", "s", legend=["{{api}} {{route}}"]),
            panel("S3 requests per second", 'sum by (route, status) (rate(custodia_http_requests_total{api="s3"}[1m]))', "reqps", legend=["{{route}} {{status}}"]),
            panel("Evidence bytes in and out", ["sum(rate(custodia_received_bytes_total[1m]))", "sum(rate(custodia_ingest_bytes_total[1m]))", "sum(rate(custodia_read_bytes_total[1m]))"], "Bps", legend=["received (as it arrives)", "filed (at commit)", "read"]),
            panel("Shards written and read per second", ["sum(rate(custodia_shards_written_total[1m]))", "sum(rate(custodia_shards_read_total[1m]))"], "ops", legend=["written", "read"]),
            panel("Reads around damage", ["sum(increase(custodia_shards_damaged_total[5m]))", "sum(increase(custodia_stripes_reconstructed_total[5m]))"], legend=["damaged shards", "reconstructed stripes"]),
            panel("Reads that failed, by reason", "sum by (reason) (increase(custodia_reads_failed_total[5m]))", legend=["{{reason}}"], desc="However far they got: one failing after its head is a 200 above and a cut-off body to its client. root_mismatch: content not matching its root even from checked shards."),
            panel("Stripes written degraded", "sum(increase(custodia_degraded_stripes_written_total[5m]))"),
            panel("Gateway memory budgets in use", "custodia_gateway_memory_held_bytes / custodia_gateway_memory_budget_bytes", "percentunit", legend=["{{instance}} {{budget}}"]),
            panel("Waits for memory", ["sum(increase(custodia_ingest_memory_waits_total[5m]))", "sum(increase(custodia_read_memory_waits_total[5m]))"], legend=["uploads (receive and ingest)", "reads"]),
        ],
    ),
    "ledger": (
        "Custodia / Ledger",
        [
            stat("Entries", "max(custodia_ledger_entries)"),
            stat("Checkpoint age", CHECKPOINT_AGE, "s"),
            stat("S3 journal age", S3_JOURNAL_AGE, "s", desc="Since the S3 records' journal last reached the openings archive whole (what recover-index replays)."),
            stat("Openings archive gap", "max(custodia_ledger_archive_gap_leaves)", desc="Leaves up to the newest signed checkpoint the openings archive lacks, as last checked: recover-index rebuilds an index only as far as the archive runs without a gap. 0 is whole."),
            panel("Entries per second", "sum(rate(custodia_ledger_entries_integrated_total[1m]))", "ops"),
            panel("Witness cosignatures vs quorum", ["max(custodia_ledger_checkpoint_cosignatures)", "max(custodia_ledger_witness_quorum)"], legend=["cosignatures", "quorum"]),
            panel("Entries not yet cosigned", "max(custodia_ledger_entries) - max(custodia_ledger_cosigned_entries)"),
            panel("Witness cosign latency p90", "histogram_quantile(0.9, sum by (witness, le) (rate(custodia_witness_cosign_duration_seconds_bucket[5m])))", "s", legend=["{{witness}}"]),
            panel("Witness answers", "sum by (witness, result) (increase(custodia_witness_cosign_duration_seconds_count[5m]))", legend=["{{witness}} {{result}}"]),
            panel("Witness clock offset", "max by (witness) (custodia_witness_clock_offset_seconds)", "s", legend=["{{witness}}"], desc="A witness's cosignature time minus the gateway's stamping clock as the cosignature arrived. Near 0 is right; below -30 s for every witness means statements are stamped after the witnesses cosigned them: the operator's clock runs ahead (alert CustodiaStampedAfterWitnesses), and receipts' times are false."),
        ],
    ),
    "nodes": (
        "Custodia / Nodes",
        [
            panel("Node up (gateway's view)", "max by (node) (custodia_cluster_node_up)", legend=["node {{node}}"]),
            panel("Capacity, used, free (gateway's view: a node down still counts)", ["sum(max by (node) (custodia_cluster_node_capacity_bytes))", "sum(max by (node) (custodia_cluster_node_used_bytes))", "sum(max by (node) (custodia_cluster_node_free_bytes))"], "bytes", legend=["capacity", "used by shards", "free"]),
            panel("Free above reserve (full at 0: no new shards)", "max by (node) (clamp_min(custodia_cluster_node_free_bytes - custodia_cluster_node_reserve_bytes, 0))", "bytes", legend=["node {{node}}"]),
            panel("Passed over for new shards (1: full, or disk failing writes)", ["max by (node) (custodia_cluster_node_full)", "max by (node) (custodia_cluster_node_writes_failing)"], legend=["full: node {{node}}", "writes failing: node {{node}}"], desc="A full node is down to its free-space reserve; a node whose disk failed a write is passed over for two minutes after each failure. Both still serve reads."),
            panel("Shards per node", "custodia_node_shards", legend=["node {{node}}"]),
            panel("Node requests per second", "sum by (op, result) (rate(custodia_node_requests_total[1m]))", "reqps", legend=["{{op}} {{result}}"]),
            panel("Node p99 latency by op", "histogram_quantile(0.99, sum by (op, le) (rate(custodia_node_request_duration_seconds_bucket[5m])))", "s", legend=["{{op}}"]),
            panel("Shard bytes written and read", ["sum(rate(custodia_node_shard_bytes_written_total[1m]))", "sum(rate(custodia_node_shard_bytes_read_total[1m]))"], "Bps", legend=["written", "read"]),
            panel("QUIC connections", ["sum(custodia_node_quic_connections)", "sum(custodia_quic_connections)"], legend=["at nodes", "from gateways"]),
            panel("QUIC RTT to nodes (worst gateway)", "max by (node) (custodia_quic_rtt_seconds)", "s", legend=["node {{node}}"]),
            panel("Clock offsets from the gateway", ["max by (node) (custodia_node_clock_offset_seconds)", "custodia_tsa_clock_offset_seconds", "custodia_compliance_clock_offset_seconds"], "s", legend=["node {{node}}", "time-stamping authority ({{instance}})", "compliance clock, retention ends by it ({{instance}})"], desc="Node offsets: the largest any gateway measured. The others are each gateway's own."),
        ],
    ),
    "repair": (
        "Custodia / Repair and integrity",
        [
            stat("Degraded stripes", DEGRADED),
            stat("Lost stripes", LOST, desc="Stripes marked lost now (fewer than k good shards): their evidence cannot be read whole until nodes or disks come back."),
            panel("Repair backlog", DEGRADED, legend=["degraded stripes"]),
            panel("Shards rebuilt per second (is repair moving?)", "sum(rate(custodia_shards_repaired_total[5m]))", "ops", legend=["shards/s"]),
            panel("Stripes lost (fewer than k good shards)", [LOST, "sum(increase(custodia_stripes_lost_total[1h]))"], legend=["marked lost now", "newly found lost (1h)"]),
            panel("Corrupt shards found by nodes", "sum by (node) (increase(custodia_node_corrupt_shards_total[1h]))", legend=["node {{node}}"]),
            panel("Damaged shards seen by reads", "sum(increase(custodia_shards_damaged_total[1h]))"),
            panel("Repair scanner: stripe records read", "sum(rate(custodia_repair_scanned_stripes_total[5m]))", "ops", legend=["records/s (index load)"]),
            panel("Orphan shards (failed uploads, interrupted repairs)", ["max(custodia_orphan_shards_pending)", "sum(increase(custodia_orphan_shards_deleted_total[1h]))"], legend=["within grace", "deleted (1h)"]),
            panel("Scrub progress (current pass)", "custodia_node_scrub_progress_ratio", "percentunit", legend=["node {{node}}"]),
            panel("Scrub rate", "sum(rate(custodia_node_scrub_bytes_total[5m]))", "Bps", legend=["checked"]),
            panel("Corrupt shards found by scrub", "sum(increase(custodia_node_scrub_corrupt_shards_total[1h]))", legend=["found (1h)"]),
            panel("Nodes not up", NODES_NOT_UP),
        ],
    ),
}


def layout(panels):
    out, x, y = [], 0, 0
    for i, p in enumerate(panels):
        w, h = (6, 4) if p["type"] == "stat" else (12, 8)
        if x + w > 24:
            x, y = 0, y + 8
        p = dict(p, id=i + 1, gridPos={"h": h, "w": w, "x": x, "y": y})
        out.append(p)
        x += w
        if p["type"] == "stat" and x >= 24:
            x, y = 0, y + 4
    return out


def main():
    here = pathlib.Path(__file__).resolve().parent
    out = here / "dashboards"
    out.mkdir(exist_ok=True)
    for name, (title, panels) in DASHBOARDS.items():
        board = {
            "uid": f"custodia-{name}",
            "title": title,
            "tags": ["custodia"],
            "timezone": "utc",
            "schemaVersion": 39,
            "version": 1,
            "editable": False,
            "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"},
            "panels": layout(panels),
        }
        (out / f"{name}.json").write_text(json.dumps(board, indent=2) + "\n")


if __name__ == "__main__":
    main()
