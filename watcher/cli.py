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
    p.add_argument("--log-format", choices=("auto", "json", "text"),
                   help="log lines as JSON or text (default: log.format; auto = JSON unless on a terminal)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    sub.add_parser("run", help="the daemon, in the foreground")
    s = sub.add_parser("status", help="what the daemon is doing")
    s.add_argument("--json", action="store_true", help="print JSON: daemon, counts, current")
    s = sub.add_parser("list", help="jobs")
    s.add_argument("--state", choices=("pending", "running", "done", "failed"), help="only jobs in this state")
    s.add_argument("--json", action="store_true", help="print a JSON list of jobs")
    s.add_argument("--limit", type=int, help="at most this many jobs")
    s = sub.add_parser("retry", help="put failed jobs back in the queue")
    s.add_argument("ids", nargs="*", type=int, metavar="ID", help="a failed job's id (see list --state failed)")
    s.add_argument("--failed", action="store_true", help="every failed job")
    s = sub.add_parser("enqueue", help="queue files inside the inbox now, without the settle wait")
    s.add_argument("paths", nargs="+", metavar="PATH", help="a file inside the inbox")
    s = sub.add_parser("enhance", help="enhance a file or a folder once, without the daemon")
    s.add_argument("input", metavar="IN", help="an image file, or a folder (walked recursively)")
    s.add_argument("output", metavar="OUT", help="the result file, or a folder when IN is a folder")
    s.add_argument("--profile", choices=("faces", "full", "upscale"), help="default: enhance.profile")
    s.add_argument("--upscale", type=float, help="output size / input size, 1–4 (default: enhance.upscale)")
    s = sub.add_parser("weights", help="model weights: list, fetch, verify")
    wsub = s.add_subparsers(dest="wverb", required=True, metavar="ACTION")
    wl = wsub.add_parser("list", help="every weight in the manifest and its state in weights_dir")
    wl.add_argument("--json", action="store_true", help="print JSON")
    wf = wsub.add_parser("fetch", help="the weights the config needs (or NAME…, or --all)")
    wf.add_argument("names", nargs="*", metavar="NAME", help="a name from `weights list` (default: what the config needs)")
    wf.add_argument("--all", action="store_true", help="every weight in the manifest")
    wv = wsub.add_parser("verify", help="check the sha256 of the weights in weights_dir")
    wv.add_argument("names", nargs="*", metavar="NAME", help="only these (default: every file present)")
    sub.add_parser("check-config", help="validate the config and the folders")
    s = sub.add_parser("schema", help="print a published JSON Schema (draft 2020-12)")
    s.add_argument("what", choices=("sidecar",), help="sidecar: the photo's JSON sidecar")
    s = sub.add_parser("queue", help="the job queue: migrate the PostgreSQL schema, or copy a queue")
    qsub = s.add_subparsers(dest="qverb", required=True, metavar="ACTION")
    qm = qsub.add_parser("migrate", help="apply the PostgreSQL schema (queue.url or --to); with --from, copy "
                                         "every job of that queue into it")
    qm.add_argument("--from", dest="src", metavar="URL", help="sqlite:PATH (or sqlite: for state_dir's) to copy from")
    qm.add_argument("--to", dest="dst", metavar="URL", help="postgresql://… (default: queue.url)")
    s = sub.add_parser("init", help="write DIR/config.yaml (the documented defaults) and create its four folders")
    s.add_argument("dir", nargs="?", default=".", metavar="DIR", help="where (default: the current folder)")
    s = sub.add_parser("doctor", help="check everything `run` needs: ✓/✗ per line with the fix; exit 1 on any ✗")
    s.add_argument("--no-bench", action="store_true", help="skip the micro-benchmark (it loads the models)")
    s.add_argument("--json", action="store_true", help="print the checks as JSON")
    s = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    s.add_argument("shell", choices=("bash", "zsh"),
                   help="e.g. photoenhanced completion bash > ~/.local/share/bash-completion/completions/photoenhanced")
    sub.add_parser("pause", help="the daemon finishes the photo in hand, then takes no new one until resume")
    sub.add_parser("resume", help="the daemon takes photos again after pause")
    s = sub.add_parser("web", help="the web page and JSON API (a separate process from the daemon)")
    s.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default: web.listen, 127.0.0.1:8765)")
    return p


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("photoenhanced")
    except metadata.PackageNotFoundError:
        return "(not installed as a package: run scripts/setup or pip install .)"


MODEL_STACK = ("torch", "torchvision", "basicsr", "facexlib", "gfpgan")


def _missing_model_stack() -> list[str]:
    from importlib.util import find_spec
    return [m for m in MODEL_STACK if find_spec(m) is None]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EX_USAGE if exc.code not in (0, None) else EX_OK
    if args.verb in EARLY_VERBS:        # no config needed (init, completion), or its own report of it (doctor)
        try:
            return EARLY_VERBS[args.verb](args, parser)
        except KeyboardInterrupt:
            return 130
    if args.verb in ("run", "enhance") and _missing_model_stack():
        print(f"photoenhanced: {args.verb} needs the model stack, which is not installed here (missing: "
              f"{', '.join(_missing_model_stack())}). `pip install .` installs only the light CLI; "
              "install everything pinned with scripts/setup (see pyproject.toml for why)", file=sys.stderr)
        return EX_RUNTIME
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
        from .backends import where
        print(f"photoenhanced: the queue in {where(cfg)} cannot be used: {exc.reason}", file=sys.stderr)
        return EX_RUNTIME
    except QueueCorrupt as exc:
        print(f"photoenhanced: the queue is damaged ({exc}); the daemon moves it aside and rebuilds it "
              "from the folders at its next start", file=sys.stderr)
        return EX_RUNTIME
    except KeyboardInterrupt:
        return 130


# --- verbs -------------------------------------------------------------------------------------

def _queue(cfg, readonly=True):
    from . import backends
    if backends.is_postgres(cfg.queue.url):
        return backends.connect(cfg, readonly=readonly)
    from .queue import Queue
    if readonly and not cfg.queue_path.exists():
        return None
    if not readonly:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
    return Queue(cfg.queue_path, readonly=readonly)


def cmd_check_config(cfg, args) -> int:
    """Exit 0 for a valid config (78 is main's, before this runs). Folders that `run` creates are
    listed apart from problems that block work (the daemon starts and waits until they are fixed)."""
    from .doctor import can_create_in
    from .web import tls_problem
    tls = tls_problem(cfg)                   # web.tls_cert/web.tls_key load and match (exit 78)
    if tls:
        print(f"photoenhanced: bad config {cfg.path}:\n  {tls}", file=sys.stderr)
        return EX_CONFIG
    problems = config_mod.folder_problems(cfg, create=False)
    created, blocking = [], []
    for name, p in {"inbox": cfg.folders.inbox, **cfg.target_folders(), "state_dir": cfg.state_dir}.items():
        if name not in problems:
            continue
        if name != "inbox" and not os.path.lexists(p) and can_create_in(next(q for q in p.parents if q.exists())):
            created.append(name)
        else:
            blocking.append(name)
    print(f"config {cfg.path}: ok")
    for name, p in {**cfg.target_folders(), "inbox": cfg.folders.inbox, "state_dir": cfg.state_dir}.items():
        note = "   (missing: run creates it)" if name in created else (f"   ({problems[name]})" if name in blocking else "")
        print(f"  {name:10} {p}{note}")
    print(f"  profile    {cfg.enhance.profile} ×{cfg.enhance.upscale:g} on {cfg.enhance.device}")
    if created:
        print(f"will be created when the daemon starts: {', '.join(created)}")
    if blocking:
        print("blocking (the daemon starts, but waits until these are fixed):")
        for name in blocking:
            fix = (f"mkdir -p {cfg.folders.inbox}, or mount the share there" if name == "inbox" and not cfg.folders.inbox.exists()
                   else "give the daemon's user write permission, or mount it read-write")
            print(f"  {problems[name]} — {fix}")
    else:
        print("nothing blocks: weights, device and speed are checked by `photoenhanced doctor`")
    return EX_OK


def cmd_status(cfg, args) -> int:
    from . import control, names
    try:
        q = _queue(cfg)
    except (StateUnavailable, QueueCorrupt) as exc:
        q, problem = None, names.safe(str(exc))
    else:
        problem = None
    try:
        out, read_problem = control.status(cfg, q)       # with `hosts`, exactly as /api/status
    finally:
        if q:
            q.close()
    problem = problem or read_problem
    if problem:
        print(f"photoenhanced: the queue cannot be read: {problem}", file=sys.stderr)
    running, counts = out["daemon"]["running"], out["counts"]
    if getattr(args, "json", False):
        print(json.dumps(control.encodable_status(out), indent=2))
        return EX_OK
    dd = out["daemon"]
    if running:
        line = f"photoenhanced: running (pid {dd['pid']}), {dd['state']}"
        if dd["reason"]:
            line += f": {names.safe(str(dd['reason']))}"
    else:
        line = "photoenhanced: not running"
    if dd["paused"] and dd["state"] != "paused":
        line += " (paused: run photoenhanced resume)"
    print(line)
    if out["current"]:
        cur = out["current"]
        print(f"  now:     {names.display(str(cur.get('path') or ''))} ({names.safe(str(cur.get('stage') or ''))})")
    print("  queue:   " + " · ".join(f"{counts[k]} {k}" for k in ("pending", "running", "done", "failed")))
    if out["hosts"] and (len(out["hosts"]) > 1 or getattr(cfg.queue, "url", None) not in (None, "sqlite:")):
        from .backends import where
        print(f"  hosts:   {len(out['hosts'])} on {where(cfg)}")
        for h in out["hosts"]:
            job = f" job {h['current_job']}" if h.get("current_job") else ""
            print(f"    {names.safe(str(h['name']))} [{h['id']}] pid {h['pid']} v{names.safe(str(h['version']))}: "
                  f"{h['health']}, {names.safe(str(h.get('state') or '-'))}{job}, seen {h['seen_s_ago']} s ago")
    return EX_OK


def _fmt_t(t):
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _public_json(row: dict) -> dict:
    from .control import public_job
    return public_job(row)


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
    from . import control, names
    if not args.ids and not args.failed:
        raise UsageError("retry needs job ids or --failed")
    pub = control.publisher(cfg)
    q = _queue(cfg, readonly=False)
    try:
        ids = [j.id for j in q.jobs("failed")] if args.failed else args.ids
        for i in ids:
            try:
                job = control.retry_job(cfg, q, i, "cli", pub)
            except control.RetryRefused as exc:
                print(f"photoenhanced: {exc}", file=sys.stderr)
                return EX_RUNTIME
            print(f"job {i}: pending again ({names.display(job.rel_path)})")
    finally:
        q.close()
    return EX_OK


def cmd_pause(cfg, args) -> int:
    q = _queue(cfg, readonly=False)
    try:
        was = q.set_paused(True, "cli")
    finally:
        q.close()
    print("paused: the daemon finishes the photo in hand, then waits for photoenhanced resume"
          if not was else "already paused")
    return EX_OK


def cmd_resume(cfg, args) -> int:
    q = _queue(cfg, readonly=False)
    try:
        was = q.set_paused(False, "cli")
    finally:
        q.close()
    print("resumed" if was else "not paused")
    return EX_OK


def cmd_web(cfg, args) -> int:
    from .web import serve
    return serve(cfg, args.listen, args.log_format)


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
            elif t.outcome in (intake.REFUSED, intake.FOLDER_LINK):
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
    known = weights.load_manifest()
    unknown = [n for n in getattr(args, "names", None) or () if n not in known]
    if unknown:
        raise UsageError(f"unknown weight{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
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
        if not rows:
            print(f"no weights in {cfg.weights_dir} to verify — run photoenhanced weights fetch", file=sys.stderr)
            return EX_RUNTIME
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
    try:
        rows = weights.fetch(cfg.weights_dir, names, progress=progress)
    except ImportError as exc:       # an offline conversion needs torch: a light `pip install .`
        print(f"photoenhanced: weights fetch: {exc}; the offline conversions need the model stack — "
              "run scripts/setup", file=sys.stderr)
        return EX_RUNTIME
    for bar in bars.values():
        bar.close()
    bad = [r for r in rows if not r.get("ok")]
    for r in rows:
        print(f"{r['name']:24} {'ok (' + str(r.get('source')) + ')' if r.get('ok') else 'FAILED: ' + str(r.get('reason'))}")
    return EX_RUNTIME if bad else EX_OK


def _needed_weights(cfg) -> list[str]:
    from .doctor import needed_weights
    return needed_weights(cfg)


def cmd_enhance(cfg, args) -> int:
    from .oneoff import enhance_paths
    return enhance_paths(cfg, Path(args.input), Path(args.output), args.profile, args.upscale)


VERBS = {"check-config": cmd_check_config, "status": cmd_status, "list": cmd_list, "retry": cmd_retry,
         "enqueue": cmd_enqueue, "weights": cmd_weights, "enhance": cmd_enhance,
         "pause": cmd_pause, "resume": cmd_resume, "web": cmd_web, "queue": lambda cfg, args: cmd_queue(cfg, args)}


def cmd_queue(cfg, args) -> int:
    """`queue migrate [--from sqlite:PATH] [--to postgresql://…]`: apply the PostgreSQL migrations;
    with --from, copy that queue's jobs in (the source daemon must be stopped). Never prints a password."""
    from . import backends
    from .migrate import copy_queue
    dst = args.dst or cfg.queue.url
    if not backends.is_postgres(dst):
        raise UsageError("queue migrate needs a postgresql:// target (--to or queue.url)")
    if args.src is not None and not args.src.startswith("sqlite:"):
        raise UsageError("--from takes sqlite:PATH (or sqlite: for this state_dir's queue)")
    from .pgqueue import SCHEMA_VERSION, migrate
    applied = migrate(dst)
    shown = backends.mask_url(dst)
    print(f"{shown}: schema {SCHEMA_VERSION}" + (f" (applied {', '.join(map(str, applied))})" if applied else
                                                 " (up to date)"))
    if args.src is not None:
        from .errors import WatcherError
        try:
            n = copy_queue(backends.sqlite_path(args.src, cfg.state_dir), dst)
        except WatcherError as exc:
            print(f"photoenhanced: {backends.scrub(str(exc), dst)}", file=sys.stderr)
            return EX_RUNTIME
        print(f"copied {n['jobs']} jobs ({n['pending']} pending, {n['done']} done, {n['failed']} failed,"
              f" {n['requeued']} running → pending) into {shown}")
    return EX_OK


# --- verbs that run before (or without) loading the config ------------------------------------

def _prog() -> str:
    """How the user called us, for commands we print (`.venv/bin/photoenhanced`, `photoenhanced`)."""
    arg0 = sys.argv[0] if sys.argv else ""
    return arg0 if os.path.basename(arg0) == "photoenhanced" else "photoenhanced"


def cmd_init(args, parser) -> int:
    import time
    from .init import ConfigExists, init
    try:
        done = init(Path(args.dir), time.time())
    except ConfigExists as exc:
        print(f"photoenhanced: {exc}", file=sys.stderr)
        return EX_RUNTIME
    except ConfigError as exc:
        print(f"photoenhanced: the written config does not load: {'; '.join(exc.problems)}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:
        print(f"photoenhanced: init {args.dir}: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return EX_RUNTIME
    print(f"wrote {done.config} (every key documented inline)")
    for name, p, created in done.folders:
        print(f"  {name:8} {p}{'' if created else '   (already there)'}")
    print(f"next: {_prog()} --config {done.config} weights fetch    (then doctor, then run)")
    return EX_OK


def cmd_doctor(args, parser) -> int:
    from . import doctor
    cfg_path = config_mod.find_config(args.config)
    shown: list = []

    def emit(c) -> None:
        shown.append(c)
        if not args.json:
            print(c.line(), flush=True)
    try:
        cfg = config_mod.load(cfg_path)
    except ConfigError as exc:
        emit(doctor.Check(False, "config", f"{cfg_path}: " + "; ".join(exc.problems),
                          f"fix the config, or make one: {_prog()} init DIR"))
    else:
        from . import logs
        logs.configure(args.log_format or "text", "warning", stream=sys.stderr)
        for c in doctor.checks(cfg, _prog(), Path(os.path.abspath(cfg_path)), bench=not args.no_bench):
            emit(c)
    code = doctor.exit_code(shown)
    if args.json:
        print(json.dumps({"ok": code == 0, "checks": [c.public() for c in shown]}, indent=2))
    else:
        print("ready: `run` has everything it needs" if code == 0 else "not ready: fix the ✗ lines above")
    return code


def cmd_completion(args, parser) -> int:
    try:
        import shtab
    except ImportError:
        print("photoenhanced: shell completion needs the shtab package (scripts/setup installs it; "
              "or pip install shtab)", file=sys.stderr)
        return EX_RUNTIME
    print(shtab.complete(parser, shell=args.shell))
    return EX_OK


def cmd_schema(args, parser) -> int:
    from . import sidecar
    sys.stdout.write(sidecar.schema_text())
    return EX_OK


EARLY_VERBS = {"init": cmd_init, "doctor": cmd_doctor, "completion": cmd_completion, "schema": cmd_schema}


if __name__ == "__main__":
    sys.exit(main())
