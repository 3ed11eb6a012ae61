"""The batches page of `gristmill serve` (`GET /`): one key's batches, newest first, with their
status, a progress bar, lines per second, failures, the links to their output and error files,
and the policy of moderation batches. Plain server-rendered HTML that refreshes itself every 10 s, so it
needs no JavaScript and no build step."""

from __future__ import annotations

import time
from html import escape

from .apikeys import Principal
from .batches import Batch

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2430; }
h1 { font-size: 20px; margin: 0 0 4px; } p.sub { color: #5b6575; margin: 0 0 16px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e3e7ee; vertical-align: middle; }
th { font-weight: 600; color: #5b6575; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { width: 160px; height: 10px; background: #e3e7ee; border-radius: 5px; overflow: hidden; display: inline-block; }
.bar > span { display: block; height: 100%; background: #2f7de1; }
.bar > span.failed { background: #d64545; }
.status { font-weight: 600; } .completed { color: #1f8a4c; } .failed, .expired { color: #c23030; }
.in_progress, .validating, .finalizing { color: #2f7de1; } .cancelling, .cancelled { color: #8a6d1f; }
code { font-size: 12px; } a { color: #2f7de1; }
"""


def _rate(b: Batch, now: float) -> str:
    done = b.request_counts.completed + b.request_counts.failed
    start = b.in_progress_at or b.created_at
    end = b.completed_at or b.failed_at or b.expired_at or b.cancelled_at or now
    return f"{done / max(1.0, end - start):,.0f}" if done else "-"


def _row(b: Batch, now: float) -> str:
    rc = b.request_counts
    done = rc.completed + rc.failed
    share = done / rc.total if rc.total else (1.0 if b.done else 0.0)
    failed_share = rc.failed / rc.total if rc.total else 0.0
    links = []
    if b.output_file_id:
        links.append(f'<a href="/v1/files/{escape(b.output_file_id)}/content">output</a>')
    if b.error_file_id:
        links.append(f'<a href="/v1/files/{escape(b.error_file_id)}/content">errors</a>')
    policy = ""
    if b.policy:
        policy = (f'{escape(b.policy.get("policy_version", ""))}<br><code>{escape(b.policy.get("model", ""))}</code>'
                  if b.endpoint in (None, "/v1/moderations", "/v1/classifications") else "")
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(b.created_at))
    return (f'<tr data-batch="{escape(b.id)}"><td><code>{escape(b.id)}</code><br><small>{created} UTC</small></td>'
            f'<td>{escape(b.endpoint or "mixed")}</td>'
            f'<td class="status {escape(b.status)}">{escape(b.status)}</td>'
            f'<td><span class="bar" title="{done:,} of {rc.total:,}"><span style="width:{share * 100:.1f}%"></span>'
            f'</span> {share * 100:.0f}%<br><small>{done:,} / {rc.total:,}</small></td>'
            f'<td class="num">{_rate(b, now)}</td>'
            f'<td class="num">{rc.failed:,}<br><span class="bar" style="width:60px"><span class="failed" '
            f'style="width:{failed_share * 100:.1f}%"></span></span></td>'
            f'<td>{policy}</td><td>{" · ".join(links) or "-"}</td></tr>')


def batches_page(batches: list[Batch], who: Principal) -> str:
    now = time.time()
    rows = "".join(_row(b, now) for b in batches) or '<tr><td colspan="8">No batches yet.</td></tr>'
    scope = "every key's batches (admin key)" if who.admin else "this key's batches"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>gristmill batches</title><style>{_STYLE}</style></head>
<body><h1>gristmill batches</h1><p class="sub">{len(batches)} of {scope}, newest first; refreshes every 10 s.</p>
<table><thead><tr><th>batch</th><th>endpoint</th><th>status</th><th>progress</th><th>lines/s</th>
<th>failed</th><th>policy</th><th>files</th></tr></thead><tbody>{rows}</tbody></table></body></html>"""
