"""`python -m qa.audit`: audit a sample of mined pairs by hand, for datasets without region ground truth.

    python -m qa.audit sample --pairs SHARDS --db audit.sqlite --n 300 [--strata 5] [--seed S]
    python -m qa.audit serve  --db audit.sqlite [--host 127.0.0.1] [--port 8765] [--annotator NAME]
    python -m qa.audit fit    --db audit.sqlite --pairs SHARDS --out DIR
    python -m qa.audit label  --db audit.sqlite --oracle-from MANIFEST [--error-rate E] [--seed S]
    python -m qa.audit export --db audit.sqlite --format {jsonl,csv,label-studio} [--out FILE]
    python -m qa.audit import --db audit.sqlite --from label-studio FILE

Exit status: 0 done; 2 bad input (the message says what and how to fix it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qa.audit.db import AuditError
from storage.shards import ShardStoreError


def _sample(args) -> int:
    from qa.audit.sample import sample_pairs

    summary = sample_pairs(args.pairs, args.db, n=args.n, n_strata=args.strata, seed=args.seed)
    print(f"run {summary['run_id']}: added {summary['added']} pairs, {summary['items']} in {args.db}")
    for s in summary["strata"]:
        group = "kept   " if s["kept"] else "dropped"
        print(
            f"  stratum {s['stratum']}  {group}  reliability {s['rel_low']:.3f}–{s['rel_high']:.3f}  "
            f"{s['n_sampled']:>4} of {s['n_population']:>6} pairs (π {s['n_sampled'] / s['n_population']:.4f})"
        )
    print(f"next: python -m qa.audit serve --db {args.db}")
    return 0


def _serve(args) -> int:
    from qa.audit.web import serve

    serve(args.db, host=args.host, port=args.port, annotator=args.annotator)
    return 0


def _interval(fig: dict) -> str:
    if fig.get("estimate") is None:
        return f"unknown (interval {fig['ci_low']:.3f}–{fig['ci_high']:.3f}, {fig['n_labels']} labels)"
    return (
        f"{fig['estimate']:.3f}  (95% CI {fig['ci_low']:.3f}–{fig['ci_high']:.3f}, {fig['n_labels']} labels)"
    )


def _fit(args) -> int:
    from qa.audit.fit import fit_audit

    audit = fit_audit(args.db, args.pairs, args.out, seed=args.seed)
    print(f"noise rate, kept pairs: {_interval(audit['noise_rate_kept'])}")
    print(f"noise rate, all pairs:  {_interval(audit['noise_rate_all'])}")
    unsure = audit["noise_rate_kept"]["unsure_counted_wrong"]
    if audit["noise_rate_kept"]["n_unsure"]:
        print(f"  with {audit['noise_rate_kept']['n_unsure']} unsure counted wrong: {_interval(unsure)}")
    if audit["calibrator"] is None:
        print(f"ECE on the audited pairs: {audit['ece_before']:.3f} mined")
        print(f"no calibrator refit: {audit['refit_skipped']['why']}")
        print(f"wrote {Path(args.out) / 'audit.json'} and reliability.png")
        return 0
    print(f"ECE on the audited pairs: {audit['ece_before']:.3f} mined → {audit['ece_after']:.3f} refit (CV)")
    print(f"wrote {Path(args.out) / 'audit.json'}, reliability.png and {audit['calibrator']['path']}")
    print(f"use it: {audit['calibrator']['load_with']}")
    return 0


def _label(args) -> int:
    from qa.audit.oracle import label_with_oracle

    summary = label_with_oracle(
        args.db, args.oracle_from, args.error_rate, args.seed, args.annotator, args.limit
    )
    print(json.dumps(summary))
    return 0


def _export(args) -> int:
    from qa.audit.exchange import export

    text = export(args.db, args.format, args.out)
    if args.out is None:
        sys.stdout.write(text)
    else:
        print(
            f"wrote {args.out}"
            + (f" and {args.out}.label-config.xml" if args.format == "label-studio" else "")
        )
    return 0


def _import(args) -> int:
    from qa.audit.exchange import import_label_studio

    print(json.dumps(import_label_studio(args.db, args.file)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qa.audit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="draw a stratified sample of a run's pairs into the database")
    s.add_argument("--pairs", required=True, help="run folder (committed shards + _SUCCESS)")
    s.add_argument("--db", required=True, help="audit database (SQLite; created when missing)")
    s.add_argument("--n", type=int, default=300, help="pairs to add (default 300)")
    s.add_argument("--strata", type=int, default=5, help="reliability strata of kept and of dropped pairs")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_sample)

    s = sub.add_parser("serve", help="the labelling web page")
    s.add_argument("--db", required=True)
    s.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--annotator", default=None, help="name to label as (else the page asks)")
    s.set_defaults(run=_serve)

    s = sub.add_parser("fit", help="noise rates with 95%% intervals and a refit calibrator from the labels")
    s.add_argument("--db", required=True)
    s.add_argument("--pairs", required=True, help="the run the sample was drawn from")
    s.add_argument("--out", required=True, help="folder for audit.json, rsm-calibrator.json, reliability.png")
    s.add_argument("--seed", type=int, default=0, help="cross-validation folds")
    s.set_defaults(run=_fit)

    s = sub.add_parser("label", help="simulated annotator from the benchmark's ground truth")
    s.add_argument("--db", required=True)
    s.add_argument(
        "--oracle-from", required=True, metavar="MANIFEST", help="manifest with gt_regions/gt_links"
    )
    s.add_argument("--error-rate", type=float, default=0.0, help="chance of a flipped verdict (default 0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--annotator", default="oracle")
    s.add_argument("--limit", type=int, default=None, help="label only the first N pairs of the queue")
    s.set_defaults(run=_label)

    s = sub.add_parser("export", help="the sample and its labels as jsonl, csv or Label Studio tasks")
    s.add_argument("--db", required=True)
    s.add_argument("--format", required=True, choices=("jsonl", "csv", "label-studio"))
    s.add_argument("--out", default=None, help="file (default: stdout)")
    s.set_defaults(run=_export)

    s = sub.add_parser("import", help="verdicts back from a Label Studio JSON export")
    s.add_argument("--db", required=True)
    s.add_argument("--from", dest="source", required=True, choices=("label-studio",))
    s.add_argument("file", help="the Label Studio JSON export")
    s.set_defaults(run=_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (AuditError, ShardStoreError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
