"""`photoenhanced [--config FILE] [--log-format auto|json|text] VERB`: argument parsing → calls into
the rooms; human and --json output. Exit codes: 0 ok · 1 runtime error · 2 usage · 78 bad config."""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from . import config as config_mod
from .errors import ConfigError, InvalidTransition, QueueCorrupt, StateUnavailable, UnknownJob

EX_OK, EX_RUNTIME, EX_USAGE, EX_CONFIG = 0, 1, 2, 78


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="photoenhanced", description="Watch-folder photo enhancer (GFPGAN + Real-ESRGAN).")
    p.add_argument("--config", help="config file (default: $PHOTOENHANCED_CONFIG, /etc/photoenhanced/config.yaml, ./config.yaml)")
    p.add_argument("--log-format", choices=("auto", "json", "text"))
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    sub.add_parser("run", help="the daemon, in the foreground")
    s = sub.add_parser("status", help="what the daemon is doing")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("list", help="jobs")
    s.add_argument("--state", choices=("pending", "running", "done", "failed"))
    s.add_argument("--json", action="store_true")
    s.add_argument("--limit", type=int)
    s = sub.add_parser("retry", help="put failed jobs back in the queue")
    s.add_argument("ids", nargs="*", type=int)
    s.add_argument("--failed", action="store_true", help="every failed job")
    s = sub.add_parser("enqueue", help="queue files inside the inbox now, without the settle wait")
    s.add_argument("paths", nargs="+")
    s = sub.add_parser("enhance", help="enhance a file or a folder once, without the daemon")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--profile", choices=("faces", "full", "upscale"))
    s.add_argument("--upscale", type=float)
    s = sub.add_parser("weights", help="model weights: list, fetch, verify")
    wsub = s.add_subparsers(dest="wverb", required=True, metavar="ACTION")
    wl = wsub.add_parser("list")
    wl.add_argument("--json", action="store_true")
    wf = wsub.add_parser("fetch", help="the weights the config needs (or NAME…, or --all)")
    wf.add_argument("names", nargs="*")
    wf.add_argument("--all", action="store_true", help="every weight in the manifest")
    wv = wsub.add_parser("verify")
    wv.add_argument("names", nargs="*")
    sub.add_parser("check-config", help="validate the config and the folders")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EX_USAGE if exc.code not in (0, None) else EX_OK
    cfg_path = config_mod.find_config(args.config)
    if args.verb == "run":
        from .daemon import run
        return run(cfg_path, args.log_format)
    try:
        cfg = config_mod.load(cfg_path)
    except ConfigError as exc:
        print(f"photoenhanced: bad config {cfg_path}:", file=sys.stderr)
        for pr in exc.problems:
            print(f"  {pr}", file=sys.stderr)
        return EX_CONFIG
    from . import logs
    logs.configure(args.log_format or "text", "warning", stream=sys.stderr)
    try:
        return VERBS[args.verb](cfg, args)
    except UsageError as exc:
        print(f"photoenhanced: {exc}", file=sys.stderr)
        return EX_USAGE
    except (UnknownJob, InvalidTransition) as exc:
        print(f"photoenhanced: {exc}", file=sys.stderr)
        return EX_RUNTIME
    except StateUnavailable as exc:
        print(f"photoenhanced: the queue in {cfg.state_dir} cannot be used: {exc.reason}", file=sys.stderr)
        return EX_RUNTIME
    except QueueCorrupt as exc:
        print(f"photoenhanced: the queue is damaged ({exc}); the daemon moves it aside and rebuilds it "
              "from the folders at its next start", file=sys.stderr)
        return EX_RUNTIME
    except KeyboardInterrupt:
        return 130


# --- verbs -------------------------------------------------------------------------------------

def _queue(cfg, readonly=True):
    from .queue import Queue
    if readonly and not cfg.queue_path.exists():
        return None
    if not readonly:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
    return Queue(cfg.queue_path, readonly=readonly)


def cmd_check_config(cfg, args) -> int:
    problems = config_mod.folder_problems(cfg, create=False)
    print(f"config {cfg.path}: ok")
    for name, p in {**cfg.target_folders(), "inbox": cfg.folders.inbox, "state_dir": cfg.state_dir}.items():
        print(f"  {name:10} {p}" + (f"   ({problems[name]})" if name in problems else ""))
    print(f"  profile    {cfg.enhance.profile} ×{cfg.enhance.upscale:g} on {cfg.enhance.device}")
    return EX_OK


def cmd_status(cfg, args) -> int:
    from . import names
    from .daemon import StateLock
    running = StateLock.held(cfg.state_dir)
    counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    d = None
    try:
        q = _queue(cfg)
        if q:
            try:
                counts, d = q.counts(), q.daemon()
            finally:
                q.close()
    except (StateUnavailable, QueueCorrupt) as exc:
        print(f"photoenhanced: the queue cannot be read: {names.safe(str(exc))}", file=sys.stderr)
    d = dict(d or {})
    note = StateLock.read_note(cfg.state_dir) if running else None
    if note and (note.get("updated") or 0) > (d.get("updated") or 0):
        # newer than the queue's status row: the daemon could not write the queue (full state_dir …)
        d.update(state=note.get("state"), reason=note.get("reason"), updated=note.get("updated"))
    state = d.get("state") if running else "stopped"
    out = {"daemon": {"running": running, "pid": d.get("pid") if running else None, "state": state,
                      "reason": d.get("reason") if running else None, "since": d.get("started"),
                      "updated": d.get("updated")},
           "counts": counts, "current": d.get("current") if running else None,
           "metrics": d.get("metrics")}
    if getattr(args, "json", False):
        cur = out["current"]
        if isinstance(cur, dict) and isinstance(cur.get("path"), str):   # exact bytes as path_b64
            out["current"] = {**cur, **names.fields(cur["path"])}
        print(json.dumps(names.encodable(out), indent=2))
        return EX_OK
    dd = out["daemon"]
    if running:
        line = f"photoenhanced: running (pid {dd['pid']}), {dd['state']}"
        if dd["reason"]:
            line += f": {names.safe(str(dd['reason']))}"
    else:
        line = "photoenhanced: not running"
    print(line)
    if out["current"]:
        cur = out["current"]
        print(f"  now:     {names.display(str(cur.get('path') or ''))} ({names.safe(str(cur.get('stage') or ''))})")
    print("  queue:   " + " · ".join(f"{counts[k]} {k}" for k in ("pending", "running", "done", "failed")))
    return EX_OK


def _fmt_t(t):
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _public_json(row: dict) -> dict:
    """A `list --json` row that is valid JSON for any name: `path` (and each output's `path`) in
    names.display form with `path_b64` (the exact bytes) when they differ; `interruptions` passed
    through when the queue has it; any other string holding undecodable bytes displayed."""
    from . import names
    out: dict = {}
    for k, v in row.items():                      # keep the key order; path_b64 right after path
        if k == "path" and isinstance(v, str):
            out.update(names.fields(v))
        else:
            out[k] = v
    row, outs = out, out.get("outputs")
    if isinstance(outs, list):
        row["outputs"] = [{**o, **names.fields(o["path"])} if isinstance(o, dict) and isinstance(o.get("path"), str)
                          else o for o in outs]
    return names.encodable(row)


def cmd_list(cfg, args) -> int:
    from . import names
    q = _queue(cfg)
    jobs = q.jobs(args.state, args.limit) if q else []
    if q:
        q.close()
    if args.json:
        print(json.dumps([_public_json(j.public()) for j in jobs], indent=2))
        return EX_OK
    for j in jobs:
        out0 = j.outputs[0].get("path") if j.outputs else None
        extra = names.safe(j.last_error) if j.last_error else (names.display(str(out0)) if out0 else "")
        print(f"{j.id:6} {j.state:8} {j.attempts}  {_fmt_t(j.updated)}  {names.display(j.rel_path)}  {extra}")
    if not jobs:
        print("no jobs")
    return EX_OK


def cmd_retry(cfg, args) -> int:
    from . import intake, names, safefs
    from .publish import Publisher
    if not args.ids and not args.failed:
        raise UsageError("retry needs job ids or --failed")
    f = cfg.folders
    pub = Publisher(f.inbox, f.outbox, f.failed, f.archive, cfg.jobs.originals)
    q = _queue(cfg, readonly=False)
    try:
        ids = [j.id for j in q.jobs("failed")] if args.failed else args.ids
        for i in ids:
            job = q.get(i)
            if job.state != "failed":
                raise InvalidTransition(f"job {i} is {job.state}, not failed")
            src = job.outputs[0]["path"] if job.outputs else None
            shown = names.display(job.rel_path)
            try:
                here = src is not None and pub._lstat(Path(src)) is not None
                if here:
                    pub.restore(src, job.rel_path)
                elif safefs.lstat(f.inbox, job.rel_path) is None:
                    print(f"photoenhanced: job {i}: the original is neither in failed/ nor in the inbox", file=sys.stderr)
                    return EX_RUNTIME
            except FileExistsError:
                print(f"photoenhanced: job {i}: {names.display(str(f.inbox / job.rel_path))} is taken by another "
                      "file; move it first", file=sys.stderr)
                return EX_RUNTIME
            except (OSError, ValueError) as exc:
                print(f"photoenhanced: job {i}: cannot restore {names.display(str(src))}: "
                      f"{names.safe(getattr(exc, 'strerror', None) or str(exc))}", file=sys.stderr)
                return EX_RUNTIME
            try:
                file = intake.fingerprint(f.inbox, job.rel_path)
            except OSError as exc:
                print(f"photoenhanced: job {i}: {shown}: {names.safe(exc.strerror or str(exc))}", file=sys.stderr)
                return EX_RUNTIME
            q.retry(i, file=file)
            print(f"job {i}: pending again ({shown})")
    finally:
        q.close()
    return EX_OK


def cmd_enqueue(cfg, args) -> int:
    import time
    from . import intake, names
    inbox = cfg.folders.inbox
    rels = []
    for p in args.paths:
        given = Path(os.path.normpath(os.path.abspath(p)))
        for base in (inbox, inbox.resolve()):
            try:
                rel = given.relative_to(base)
                break
            except ValueError:
                continue
        else:
            raise UsageError(f"{names.display(p)} is not inside the inbox {inbox}")
        if not rel.parts:
            raise UsageError(f"{names.display(p)} is the inbox itself, not a file in it")
        rels.append((p, rel.as_posix()))
    q = _queue(cfg, readonly=False)
    try:
        for p, rel in rels:
            t = intake.take(q, inbox, rel, time.time())
            shown = names.display(rel)
            if t.outcome == intake.QUEUED:
                print(f"job {t.job.id}: queued {shown}")
            elif t.outcome in (intake.ACTIVE, intake.BUSY):
                print(f"{shown}: already queued (job {t.job.id})" if t.job else f"{shown}: already queued")
            elif t.outcome == intake.REFUSED:
                raise UsageError(f"{names.display(p)}: {t.reason}; symlinks and special files in the inbox are never followed")
            elif t.outcome == intake.VANISHED:
                raise UsageError(f"{names.display(p)} is not a regular file")
            else:
                print(f"photoenhanced: {shown}: {t.outcome} {names.safe(t.reason)}", file=sys.stderr)
                return EX_RUNTIME
    finally:
        q.close()
    return EX_OK


def cmd_weights(cfg, args) -> int:
    from enhancer import weights
    if args.wverb == "list":
        rows = weights.list_weights(cfg.weights_dir)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return EX_OK
        for r in rows:
            state = "ok" if r.get("verified") else ("present, unverified" if r.get("present") else "missing")
            print(f"{r['name']:24} {state:20} {r.get('licence', '')}")
        print(f"weights_dir: {cfg.weights_dir}")
        return EX_OK
    if args.wverb == "verify":
        rows = weights.verify(cfg.weights_dir, args.names or None)
        bad = [r for r in rows if not r.get("ok")]
        for r in rows:
            print(f"{r['name']:24} {'ok' if r.get('ok') else 'FAILED: ' + str(r.get('reason'))}")
        return EX_RUNTIME if bad else EX_OK
    cfg.weights_dir.mkdir(parents=True, exist_ok=True)
    bars: dict[str, object] = {}

    def progress(name: str, done: int, total: int) -> None:
        from tqdm import tqdm
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=total or None, desc=name, unit="B", unit_scale=True, file=sys.stderr, leave=True)
        bar.update(done - bar.n)

    names = args.names or (None if args.all else _needed_weights(cfg))
    rows = weights.fetch(cfg.weights_dir, names, progress=progress)
    for bar in bars.values():
        bar.close()
    bad = [r for r in rows if not r.get("ok")]
    for r in rows:
        print(f"{r['name']:24} {'ok (' + str(r.get('source')) + ')' if r.get('ok') else 'FAILED: ' + str(r.get('reason'))}")
    return EX_RUNTIME if bad else EX_OK


def _needed_weights(cfg) -> list[str]:
    """The manifest names every configured profile and hot folder needs (local .pth paths excluded)."""
    s = cfg.enhancer_settings()
    names: set[str] = set()
    for profile, _ in s.needs:
        if profile in ("faces", "full"):
            names |= {s.face_model, s.detector_model, "parsenet"}
        if profile in ("full", "upscale"):
            names.add(s.background_model)
    return sorted(n for n in names if not n.endswith(".pth"))


def cmd_enhance(cfg, args) -> int:
    from .oneoff import enhance_paths
    return enhance_paths(cfg, Path(args.input), Path(args.output), args.profile, args.upscale)


VERBS = {"check-config": cmd_check_config, "status": cmd_status, "list": cmd_list, "retry": cmd_retry,
         "enqueue": cmd_enqueue, "weights": cmd_weights, "enhance": cmd_enhance}


if __name__ == "__main__":
    sys.exit(main())
