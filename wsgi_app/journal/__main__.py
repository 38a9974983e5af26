"""``python -m wsgi_app.journal``: list, retry and purge the journal's calls.

    python -m wsgi_app.journal list [--all]     dead calls (--all: pending ones too)
    python -m wsgi_app.journal retry ID... | --all-dead
    python -m wsgi_app.journal purge ID... | --all-dead

The journal file is ``--journal PATH``, or ``DEFERRED_JOURNAL`` as the workers have it.
A retried call is run by the next worker of its app that looks (within a second).
Run it as the workers' user: a journal of another user is refused (files SQLite
made for root would lock the workers out, and the calls' arguments are theirs).
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
import time

from .store import Journal


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wsgi_app.journal",
        description="List, retry and purge the calls of a deferred-work journal.",
    )
    parser.add_argument(
        "--journal",
        default=os.environ.get("DEFERRED_JOURNAL", ""),
        help="the journal file (default: $DEFERRED_JOURNAL)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list dead calls, oldest first")
    listing.add_argument("--all", action="store_true", help="pending calls too")
    for name, text in (("retry", "run dead calls again"), ("purge", "delete dead calls")):
        command = commands.add_parser(name, help=text)
        command.add_argument("ids", nargs="*", type=int, help="call ids from `list`")
        command.add_argument("--all-dead", action="store_true", help="every dead call")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.journal:
        parser.error("no journal: give --journal PATH or set DEFERRED_JOURNAL")
    if not os.path.exists(args.journal):
        parser.error(f"no journal at {args.journal}")
    owner = os.stat(args.journal).st_uid
    if owner != os.geteuid():
        name = _user(owner)
        print(
            f"python -m wsgi_app.journal: error: {args.journal} belongs to {name} (uid {owner}),"
            f" not to {_user(os.geteuid())}: run it as the workers' user, e.g. sudo -u {name}"
            f" {sys.executable} -m wsgi_app.journal {' '.join(argv or sys.argv[1:])}",
            file=sys.stderr,
        )
        return 2
    journal = Journal(args.journal, app=None)  # every app's calls
    try:
        return _run(parser, args, journal)
    finally:
        journal.close()


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, journal: Journal) -> int:
    if args.command == "list":
        now = time.time()
        rows = journal.rows(None if args.all else "dead")
        for row in rows:
            print(
                f"{row.id}\t{row.state}\t{row.attempts} attempt(s)\t{now - row.created:.0f} s ago"
                f"\t{row.origin}\t{row.path}\t{row.error or ''}\t{row.app}"
            )
        print(f"{len(rows)} call(s)", file=sys.stderr)
        return 0
    if not args.ids and not args.all_dead:
        parser.error(f"{args.command}: give call ids, or --all-dead")
    ids = None if args.all_dead else args.ids
    if args.command == "retry":
        print(f"{journal.retry_dead(ids)} call(s) will run again")
    else:
        print(f"{journal.purge_dead(ids)} call(s) purged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
