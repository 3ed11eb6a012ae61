"""The `gristmill` command. Producer verbs run here; worker verbs exec `python -m gristmill.workers`,
so this module (and `import gristmill.producers`) never imports torch or the workers package."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import GristmillError

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="gristmill: bulk offline inference over Redis and Celery (OpenAI Batch format).")


def _client():
    from .client import Client
    return Client()


def _progress_line(b) -> str:
    rc = b.request_counts
    return f"{b.id} {b.status}: {rc.completed} completed, {rc.failed} failed, {rc.total} total"


def _details(b) -> str:
    """Policy and dedup lines for `status`."""
    out = []
    if b.policy:
        out.append(f"  policy {b.policy['policy_version']} (model {b.policy['model']}, "
                   f"thresholds {b.policy['thresholds_digest']})")
    if b.metadata:
        out.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in b.metadata.items()))
    if b.resent:
        out.append(f"  {b.resent} chunk message(s) sent again after a worker or Redis lost them in transit")
    if b.ingest_waiting_since:
        import time
        out.append(f"  ingest waiting for {int(time.time()) - b.ingest_waiting_since} s: {b.ingest_waiting_for}; "
                   f"it resumes as workers drain the queue")
    if b.cascade.inputs:
        middle = b.cascade.escalated - b.cascade.to_full
        onward = (f"; a middle stage decided {middle} of those, the full model {b.cascade.to_full} "
                  f"({b.cascade.to_full / b.cascade.inputs:.1%} of all)" if middle > 0 else "")
        out.append(f"  cascade: {b.cascade.escalated} of {b.cascade.inputs} classifier inputs escalated past the "
                   f"student ({b.cascade.share:.1%}){onward}; the student decided the rest")
    if b.dedup.inputs:
        out.append(f"  dedup: {b.dedup.reused} of {b.dedup.inputs} classifier inputs reused "
                   f"({b.dedup.hit_rate:.1%} hit rate)")
    return "\n".join(out)


def _warn_if_unserved(c, b) -> None:
    """A batch whose queues no running worker consumes would wait silently: say so."""
    if b.done:
        return
    missing = c.unserved_queues(b.id)
    if missing:
        typer.echo(f"warning: no running worker consumes {', '.join(missing)}; this batch's work there waits "
                   f"until one starts (`gristmill up`, or `gristmill worker` on a host with the models)", err=True)


@cli.command()
def submit(file: Path = typer.Argument(..., help="JSONL in OpenAI Batch format"),
           wait: bool = typer.Option(False, "--wait", help="block until the batch ends, showing progress"),
           completion_window: Optional[str] = typer.Option(None, help="e.g. 24h (default: settings)"),
           policy: Optional[Path] = typer.Option(None, "--policy", help="moderation policy (YAML or JSON) for "
                                                 "this batch (default: GRISTMILL_MODERATION_POLICY or the shipped one)"),
           metadata: list[str] = typer.Option([], "--metadata", "-m", help="KEY=VALUE kept with the batch "
                                              "(repeatable; at most 16)")):
    """Validate and enqueue FILE; prints the batch id as the last line."""
    pairs = {}
    for kv in metadata:
        key, sep, value = kv.partition("=")
        if not sep:
            raise typer.BadParameter(f"{kv!r}: write KEY=VALUE", param_hint="--metadata")
        pairs[key] = value
    c = _client()
    b = c.submit_file(file, completion_window=completion_window, policy=policy, metadata=pairs or None,
                      on_wait=lambda why: typer.echo(f"ingest waiting: {why}; it resumes as workers drain the queue",
                                                     err=True))
    typer.echo(_progress_line(b), err=True)
    _warn_if_unserved(c, b)
    if wait:
        from .progress import watch
        b = watch(c, b.id)
        typer.echo(_progress_line(b), err=True)
    typer.echo(b.id)


@cli.command()
def status(batch_id: str, as_json: bool = typer.Option(False, "--json", help="the whole batch object as JSON"),
           watch_: bool = typer.Option(False, "--watch", help="a live progress bar (rate, ETA) until the batch ends")):
    """Status and request_counts of a batch, its moderation policy and its dedup hit rate."""
    c = _client()
    if watch_:
        from .progress import watch
        watch(c, batch_id)
    b = c.get(batch_id)
    if as_json:
        typer.echo(b.model_dump_json(indent=2))
        return
    typer.echo(_progress_line(b))
    if _details(b):
        typer.echo(_details(b))
    _warn_if_unserved(c, b)


@cli.command()
def review(batch_id: str, band: str = typer.Option(..., "--band", help="LOW:HIGH, e.g. 0.3:0.7"),
           output: Path = typer.Option(..., "-o", "--output", help="CSV to write"),
           input_file: Optional[Path] = typer.Option(None, "--input", help="the submitted JSONL, if it moved"),
           text_chars: int = typer.Option(500, help="characters of each text to include (0: all)")):
    """Export for human review every classifier score inside the band (one row per input and label)."""
    from .review import write_review
    n, joined = write_review(_client(), batch_id, band, output, input_file, text_chars)
    typer.echo(f"{n} rows -> {output}" + ("" if joined else " (input file not found: texts left empty; pass --input)"))


@cli.command()
def results(batch_id: str, output: Path = typer.Option(..., "-o", "--output", help="output JSONL"),
            errors: Optional[Path] = typer.Option(None, "--errors", help="error JSONL")):
    """Download the results written so far (partial while the batch runs)."""
    c = _client()
    n_out, n_err = c.download(batch_id, output, errors)
    b = c.get(batch_id)
    typer.echo(f"{n_out} output lines -> {output}" + (f"; {n_err} error lines -> {errors}" if errors else
                                                      f"; {n_err} error lines (use --errors to save them)"))
    typer.echo(_progress_line(b), err=True)


@cli.command()
def cancel(batch_id: str):
    """Cancel a batch: queued work is skipped, finished results stay downloadable."""
    typer.echo(_progress_line(_client().cancel(batch_id)))


@cli.command("list")
def list_(limit: int = 20):
    """Recent batches."""
    for b in _client().list(limit):
        typer.echo(_progress_line(b))


@cli.command()
def models(as_json: bool = typer.Option(False, "--json")):
    """The registered models and the urls they serve (no Redis needed)."""
    from . import constants as C
    from .settings import Settings
    reg = Settings().registry
    rows = []
    for spec in reg.specs.values():
        urls = [u for u in C.URL_QUEUE if spec.serves(u)]
        default_for = [u for u, n in reg.defaults.items() if n == spec.name]
        rows.append({"name": spec.name, "kind": spec.kind, "aliases": list(spec.aliases), "serves": urls,
                     "default_for": default_for, "weights": str(spec.path or f"{spec.package}:{spec.file or ''}")})
    workers = _serving()
    if as_json:
        typer.echo(json.dumps({"models": rows, "workers": workers}, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']}  [{r['kind']}]  serves {', '.join(r['serves'])}"
                   + (f"  (default for {', '.join(r['default_for'])})" if r["default_for"] else "")
                   + (f"  aliases: {', '.join(r['aliases'])}" if r["aliases"] else ""))
    for worker, served in workers.items():
        typer.echo(f"worker {worker}:" + ("" if served else " (no model loaded yet)"))
        for model, how in served.items():
            typer.echo(f"  {model}: {how}")


def _serving() -> dict[str, dict[str, str]]:
    """What each running worker serves, where a Redis is reachable (else nothing: the registry
    alone needs none)."""
    import redis as redis_lib

    from .errors import RedisUnavailable
    try:
        c = _client()
        try:
            return c.store.serving()
        finally:
            c.close()
    except (RedisUnavailable, redis_lib.RedisError, OSError):
        return {}


def _exec_workers(*args: str) -> None:
    from .runtime import python_module
    argv = python_module("gristmill.workers", *args)
    os.execv(argv[0], argv)


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context, device: str = typer.Option("cpu", help="cpu or cuda:N")):
    """Run one Celery worker process pinned to DEVICE."""
    _exec_workers("worker", "--device", device, *ctx.args)


@cli.command()
def up(gpus: str = typer.Option("all", help="all | none | 0,1,..."),
       instances_per_gpu: int = typer.Option(None, min=1, help="worker processes per GPU (default: settings, 1)"),
       flower: bool = typer.Option(True, help="also start Flower on 127.0.0.1:5555"),
       serve_: bool = typer.Option(True, "--serve/--no-serve", help="also start the HTTP API on 127.0.0.1:8000")):
    """Redis (if GRISTMILL_REDIS_URL is unset), worker processes per GPU (else one CPU worker),
    Flower and the HTTP API."""
    extra = ["--instances-per-gpu", str(instances_per_gpu)] if instances_per_gpu else []
    _exec_workers("up", "--gpus", gpus, *extra, *([] if flower else ["--no-flower"]),
                  *([] if serve_ else ["--no-serve"]))


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def optimize(ctx: typer.Context, model: Optional[str] = typer.Argument(None, help="a registered classifier")):
    """Build a faster artifact of MODEL (int8, pruned, a distilled student, a cascade) and report its
    speed and agreement with the full model; `gristmill optimize --help` lists every option."""
    _exec_workers("optimize", *([model] if model else []), *ctx.args)


@cli.command("flower")
def flower_(port: Optional[int] = typer.Option(None, help="default: GRISTMILL_FLOWER_PORT (5555)"),
            address: Optional[str] = typer.Option(None, help="default: GRISTMILL_FLOWER_ADDRESS (127.0.0.1)"),
            basic_auth: Optional[str] = typer.Option(None, "--basic-auth", help="user:password (default: "
                                                     "GRISTMILL_FLOWER_BASIC_AUTH, else a random password, printed)")):
    """Flower on gristmill's Celery app, behind basic auth."""
    from .redis_server import resolve_redis_url
    from .settings import Settings
    s = Settings()
    s = s.model_copy(update={k: v for k, v in (("flower_port", port), ("flower_address", address)) if v is not None})
    if basic_auth is not None and basic_auth.count(":") < 1:
        raise GristmillError("--basic-auth must be user:password")
    os.environ["GRISTMILL_REDIS_URL"] = resolve_redis_url(s)
    cmd, creds = s.flower_command(basic_auth)
    if basic_auth is None and s.flower_basic_auth is None:
        typer.echo(f"flower at http://{s.flower_address}:{s.flower_port}: user {creds.split(':', 1)[0]}, "
                   f"password {creds.split(':', 1)[1]}", err=True)
    os.execv(cmd[0], cmd)


@cli.command()
def serve(host: Optional[str] = typer.Option(None, help="default: GRISTMILL_SERVE_HOST (127.0.0.1)"),
          port: Optional[int] = typer.Option(None, help="default: GRISTMILL_SERVE_PORT (8000)"),
          log_level: str = typer.Option("info", help="uvicorn's log level")):
    """OpenAI's Files and Batches API over HTTP (/v1/files, /v1/batches) and a batches page (/),
    behind API keys."""
    import uvicorn

    from .apikeys import ApiKeys, ensure_local_key, local_key_file
    from .redis_server import resolve_redis_url
    from .server import create_app
    from .settings import Settings
    s = Settings()
    s = s.model_copy(update={k: v for k, v in (("serve_host", host), ("serve_port", port)) if v is not None})
    keys = s.load_api_keys()
    if not len(keys):
        if not _is_loopback(s.serve_host):
            raise GristmillError(f"refusing to listen on {s.serve_host} without API keys: set GRISTMILL_API_KEYS "
                                 f"or GRISTMILL_API_KEYS_FILE (`gristmill keys new --file keys.txt` makes one)")
        keys = ApiKeys.from_sources(ensure_local_key(s.home))
        typer.echo(f"no API keys configured: on loopback the key is the one in {local_key_file(s.home)}", err=True)
    app = create_app(s, resolve_redis_url(s), keys)
    typer.echo(f"serving OpenAI's Files and Batches API at http://{s.serve_host}:{s.serve_port}/v1 "
               f"({len(keys)} API key(s))", err=True)
    uvicorn.run(app, host=s.serve_host, port=s.serve_port, log_level=log_level)


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


keys_cli = typer.Typer(help="API keys of `gristmill serve`.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")


@keys_cli.command("new")
def keys_new(file: Optional[Path] = typer.Option(None, "--file", help="append the key's SHA-256 to this keys file "
                                                  "(GRISTMILL_API_KEYS_FILE); the file never holds the key"),
             admin: bool = typer.Option(False, "--admin", help="a key that sees every key's files and batches")):
    """Make an API key and print it (once: keep it)."""
    from .apikeys import add_to_file, new_key
    if file is not None:
        key = add_to_file(file, admin)
        typer.echo(f"added its SHA-256 to {file}" + (" (admin)" if admin else ""), err=True)
    else:
        key = new_key()
    typer.echo(key)


@cli.command()
def demo(gpus: str = typer.Option("all", help="all | none | 0,1,..."),
         input_file: Optional[Path] = typer.Option(None, "--input", help="batch input (default: the shipped "
                                                   "example); lines whose custom_id starts with 'bad-' are meant to fail"),
         out_dir: Path = typer.Option(Path("out"), "--out-dir", help="where the results and errors are written")):
    """Start everything, run the shipped example, print a summary, stop everything. Exits 1 when a
    line that should succeed fails, naming the first."""
    _exec_workers("demo", "--gpus", gpus, "--out-dir", str(out_dir), *(["--input", str(input_file)] if input_file else []))


def main() -> None:
    try:
        cli()
    except GristmillError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
