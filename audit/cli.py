"""model-audit command line: parses, calls the API, maps errors to exit codes (audit.exit_codes).

SIGTERM is handled like SIGINT: one line, the earlier run intact (the run folder is a transaction).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audit import __version__, exit_codes
from audit.errors import AuditError, InputError, first_line

if TYPE_CHECKING:
    from audit.metrics.declarations import Declarations

EXIT_OK, EXIT_FINDINGS, EXIT_INPUT, EXIT_INTERRUPTED = exit_codes.PASSED, exit_codes.FINDINGS, exit_codes.INPUT, exit_codes.INTERRUPTED


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt, so the same cleanup runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def _redeliver_swallowed(unraisable: Any) -> None:
    """sys.unraisablehook while the CLI runs. A signal's exception raised inside a callback whose
    exceptions Python ignores (a weakref callback or __del__ run by the garbage collector) would be
    lost and the audit run on to its end (seen: a SIGTERM exited 1, not 143). The signal is sent
    again a moment later, when the main thread is back in ordinary code."""
    again = {Terminated: signal.SIGTERM, KeyboardInterrupt: signal.SIGINT}.get(unraisable.exc_type)
    if again is None:
        sys.__unraisablehook__(unraisable)
        return
    import os
    import threading

    threading.Timer(0.05, os.kill, (os.getpid(), again)).start()


@contextlib.contextmanager
def termination_signals() -> Iterator[None]:
    """SIGTERM raises Terminated (like SIGINT's KeyboardInterrupt), and neither is lost in a callback;
    both restored afterwards. Only the main thread can set signal handlers."""
    if not _main_thread():
        yield
        return
    previous, hook = signal.signal(signal.SIGTERM, _on_sigterm), sys.unraisablehook
    sys.unraisablehook = _redeliver_swallowed
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = hook


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_INPUT, f"model-audit: error: {message}\n")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="model-audit", description="Audit a trained classifier (PyTorch or ONNX) and write a signable report.",
                     epilog=exit_codes.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"model-audit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run an audit and write results.json, report.html, report.pdf, junit.xml",
                         description="Run an audit. Flags override the same keys in --config.",
                         epilog=exit_codes.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", help="model.onnx, TorchScript .pt/.pth, torch.export .pt2, or package.module:factory / file.py:factory")
    run.add_argument("--manifest", type=Path, help="CSV, JSONL or Parquet with columns path[, label, id, mask, domain, group]")
    run.add_argument("--weights", type=Path, help="state dict for a factory model (loaded with weights_only=True)")
    run.add_argument("--config", type=Path, help="audit.yaml with the same keys, plus probes.<name>.<param> and rules.<id>.thresholds")
    run.add_argument("--classes", type=Path, help="class names, one per line, in model output order")
    run.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="model input height and width")
    run.add_argument("--channels", type=int, metavar="C", help="model input channels")
    run.add_argument("--mean", type=float, nargs="+", help="per-channel mean subtracted after scaling to [0, 1]")
    run.add_argument("--std", type=float, nargs="+", help="per-channel std divided after subtracting the mean")
    run.add_argument("--layout", choices=["nchw", "nhwc"], help="input layout the model expects (ONNX: read from the file)")
    run.add_argument("--output-kind", choices=["auto", "logits", "probabilities", "sigmoid"],
                     help="how to read the output; auto recognises probabilities and single sigmoid outputs (default auto)")
    run.add_argument("--output-name", help="which ONNX output to audit when there are several")
    run.add_argument("--embedding-layer", metavar="NAME",
                     help="where the embedding tap reads: the classifier head module (torch; its input is the embedding) "
                          "or the embedding tensor (ONNX); default: found from the last linear layer")
    run.add_argument("--trust-pickle", action="store_true",
                     help="load a torch.export .pt2 even when loading it unpickles what it carries (runs code from the file)")
    run.add_argument("--data-root", type=Path, action="append", help="extra folder sample paths may point into (repeatable)")
    run.add_argument("--probes", type=_csv, metavar="NAME,...", help="probes to run (default: all); see `model-audit probes`")
    run.add_argument("--profile", choices=["smoke", "standard", "thorough"], help="sample counts and method lists (default standard)")
    run.add_argument("--rules", type=Path, action="append", dest="rule_files", metavar="FILE", help="extra rule file (repeatable)")
    run.add_argument("--out", type=Path, help="run folder (default reports/<model stem>-<manifest stem>); replaced only "
                                              "when the new run is complete")
    run.add_argument("--force", action="store_true",
                     help="accept a non-empty --out that is not a model-audit run (its files are kept, never deleted)")
    run.add_argument("--max-image-pixels", type=int, metavar="N",
                     help="skip images whose header declares more pixels, before decoding (default 50000000)")
    run.add_argument("--fail-on", choices=["critical", "high", "medium", "low", "info", "never"],
                     help="exit 1 when a fail/error finding is at least this severe (default high)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto uses a GPU when one is visible (default auto)")
    run.add_argument("--seed", type=int, help="seed for sampling and bootstrap (default 0)")
    run.add_argument("--max-samples", type=int, help="audit a stratified sample of at most N rows")
    run.add_argument("--batch-size", type=int, help="most images per model call, in every pass (default 64)")
    run.add_argument("--workers", type=int, metavar="N", help="threads decoding inputs ahead of the model (default 2; 0 decodes inline)")
    run.add_argument("--chunk-samples", type=int, metavar="N",
                     help="detail-stage samples per chunk written to the run folder (default 256); results do not depend on it")
    run.add_argument("--time-budget", metavar="DURATION",
                     help="fit the whole audit in DURATION (e.g. 10m, 1h30m, 90s): after the shared pass the detail stages' "
                          "sample counts are cut, stratified and never below what a rule needs; the report says which")
    run.add_argument("--no-sample-images", action="store_true", help="keep every input image, thumbnail and heatmap out of the reports")
    run.add_argument("--quiet", action="store_true", help="no progress bars or summary")

    render = sub.add_parser("render", help="re-render the reports of a saved run (no model needed)")
    render.add_argument("run_dir", type=Path)
    render.add_argument("--format", type=_csv, default=["html", "pdf", "junit"], metavar="html,pdf,junit")

    rules = sub.add_parser("rules", help="the rule catalogue")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, parser_class=_Parser)
    rules_list = rules_sub.add_parser("list", help="print the built-in rules (and any --rules files)")
    rules_list.add_argument("--rules", type=Path, action="append", dest="rule_files", default=[], metavar="FILE")
    rules_list.add_argument("--markdown", action="store_true", help="print the catalogue as Markdown (docs/rules.md)")
    rules_check = rules_sub.add_parser("check", help="validate rule files")
    rules_check.add_argument("files", type=Path, nargs="+")

    sub.add_parser("probes", help="list the probes and their parameters")

    demo = sub.add_parser("demo", help="generate the husky-vs-wolf demo, train a small CNN, export to ONNX and audit it")
    demo.add_argument("--out", type=Path, default=Path("reports/demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--profile", choices=["smoke", "standard", "thorough"], default="standard")
    demo.add_argument("--quiet", action="store_true")
    return parser


_FLAG_KEYS = ("model", "manifest", "weights", "input_size", "channels", "mean", "std", "layout", "output_kind", "output_name", "embedding_layer",
              "data_root", "probes", "profile", "rule_files", "out", "fail_on", "device", "seed", "max_samples", "batch_size", "chunk_samples",
              "max_image_pixels", "workers", "time_budget")


def config_from_args(args: argparse.Namespace) -> Any:
    from audit.config import build_config, read_classes_file, read_config_file

    file_values = read_config_file(args.config) if args.config else {}
    flags: dict[str, Any] = {key: getattr(args, key) for key in _FLAG_KEYS}
    if args.classes is not None:
        flags["classes"] = read_classes_file(args.classes)
    if args.no_sample_images:
        flags["sample_images"] = False
    if args.quiet:
        flags["quiet"] = True
    if args.trust_pickle:
        flags["trust_pickle"] = True
    if args.force:
        flags["force"] = True
    return build_config(file_values, flags, source=str(args.config) if args.config else "flags")


def _cmd_run(args: argparse.Namespace) -> int:
    from audit.api import run_audit

    config = config_from_args(args)
    outcome = run_audit(config)
    if outcome.render_error:
        print(f"model-audit: error: {outcome.render_error}", file=sys.stderr)
        return outcome.exit_code
    if not config.quiet:
        _print_summary(outcome)
    return outcome.exit_code


def _print_summary(outcome: Any) -> None:
    results = outcome.results
    from audit.findings import ATTENTION, count_by_status, gate
    from audit.report.viewmodel import inferred_text, preprocessing_text

    summary = ", ".join(f"{n} {s}" for s, n in count_by_status(results["findings"]).items() if n)
    inferred = inferred_text(results["preprocessing"].get("inferred"))
    if inferred:
        print(f"note: {inferred}")
    print(f"preprocessing: {preprocessing_text(results['preprocessing'])}")
    print(f"model fingerprint: {results['model'].get('fingerprint', '')[:16]}")
    print(f"verdict: {results['run']['verdict']} ({summary})")
    decided = results.get("gate") or gate(results["findings"], results["run"].get("fail_on", "high"))
    print(f"gate: fail_on {decided['fail_on']}: exit code {decided['exit_code']}"
          + (f" ({len(decided['gating'])} finding(s) at {decided['fail_on']} or above)" if decided["gating"] else ""))
    for finding in results["findings"]:
        if finding["status"] in ATTENTION:
            print(f"  {finding['status'].upper():5} {finding['severity']:8} {finding['rule']} [{finding['scope']}]: {finding['message']}")
    skipped = len(results["manifest"]["skipped"])
    if skipped:
        print(f"{skipped} manifest row(s) skipped; listed in the report")
    for name, path in outcome.reports.items():
        print(f"{name}: {path}")
    print(f"results: {outcome.out / 'results.json'}")


def _cmd_render(args: argparse.Namespace) -> int:
    from audit.api import render

    bad = [f for f in args.format if f not in ("html", "pdf", "junit")]
    if bad:
        raise InputError(f"--format: unknown format {bad[0]!r} (html, pdf, junit)")
    try:
        from audit.api import stage_lines

        written = render(args.run_dir, args.format, progress=stage_lines(False))
    except AuditError:
        raise
    except Exception as exc:  # noqa: BLE001 - a readable run that cannot be drawn is its own exit code
        print(f"model-audit: error: the reports could not be rendered ({first_line(exc)})", file=sys.stderr)
        return exit_codes.RENDER
    for name, path in written.items():
        print(f"{name}: {path}")
    return EXIT_OK


def declared_metrics() -> Declarations:
    """What the registered probes declare they measure, which `rules check` holds rules against."""
    from audit.metrics.declarations import declarations
    from audit.probes.registry import all_probes

    return declarations(all_probes())


def _cmd_rules(args: argparse.Namespace) -> int:
    from audit.rules.catalogue import load_catalogue
    from audit.rules.schema import load_rule_file

    if args.rules_command == "check":
        declared = declared_metrics()
        for path in args.files:
            print(f"{path}: {len(load_rule_file(path, declared))} rule(s) valid")
        return EXIT_OK
    if args.markdown:
        print(rules_markdown(load_catalogue(args.rule_files)), end="")
        return EXIT_OK
    for rule in load_catalogue(args.rule_files):
        per = rule.aggregate.text + (f", {rule.aggregate.stat} of samples" if rule.aggregate.stat else "")
        limits = "; ".join(_threshold_lines(rule, "{status}/{severity} if {limit}")) or "info, never judged"
        print(f"{rule.id} (v{rule.version}): {rule.title}")
        print(f"    metric {rule.metric} per {per}, min_support {rule.min_support}: {limits}")
    return EXIT_OK


def _threshold_lines(rule: Any, template: str) -> list[str]:
    from audit.rules.engine import confirmation_text, threshold_text

    return [template.format(status=t.status, severity=t.severity, limit=threshold_text(t.op, t.value, bound=t.bound) + confirmation_text(t))
            for t in rule.thresholds or ()]


def rules_markdown(rules: Sequence[Any]) -> str:
    """The catalogue as docs/rules.md (a test keeps that file equal to this output)."""
    from audit.rules.catalogue import FORMAT_GUIDE

    lines = ["# Rule catalogue", "", "Generated by `model-audit rules list --markdown`; the YAML files in `rules/` are the source.", ""]
    for rule in rules:
        per = rule.aggregate.text + (f", {rule.aggregate.stat} of per-sample values" if rule.aggregate.stat else "")
        lines += [f"## `{rule.id}` (v{rule.version}): {rule.title}", ""]
        if rule.description:
            lines += [rule.description.strip(), ""]
        lines += [f"- metric: `{rule.metric}`, per {per}; judged from {rule.min_support} samples on"]
        lines += _threshold_lines(rule, "- {status} ({severity}) if {limit}") or ["- info for every scope: informs, never judged"]
        lines += [f"- quotes `{{{name}}}`: `{ref}`" for name, ref in (rule.values or {}).items()]
        lines += [f"- remedy: {rule.remedy.strip()}"]
        if rule.rationale:
            lines += [f"- why these limits: {rule.rationale.strip()}"]
        lines.append("")
    return "\n".join([*lines, FORMAT_GUIDE])


def _cmd_probes(_: argparse.Namespace) -> int:
    from audit.probes.registry import all_probes

    print("\n".join(probe_listing(all_probes())))
    return EXIT_OK


def probe_listing(registry: dict[str, Any]) -> list[str]:
    """`model-audit probes`, generated from each probe's declarations: what it needs and uses, what it
    reads, writes and measures, and every parameter with its default in every profile."""
    from typing import get_args

    from audit.config import Profile

    profiles = get_args(Profile)
    lines = []
    for name, cls in registry.items():
        uses = cls.capability_uses()
        needs = ", ".join(sorted(c.value for c in cls.requires)) or (
            "a forward pass; its methods use more when the model has it" if uses else "nothing beyond a forward pass")
        lines.append(f"{name}: {cls.title} (needs {needs})")
        if uses:
            lines.append("  methods, and what each uses:")
            lines.extend(f"    {line}" for line in uses)
        if cls.consumes:
            lines.append(f"  reads: {', '.join(c.table + (' (optional)' if c.optional else '') for c in cls.consumes)}")
        for table in cls.provides:
            columns = f": {', '.join(c.name for c in table.columns)}" if table.columns else ""
            lines.append(f"  writes {table.name} ({table.stage} stage, {'arrays' if table.kind == 'array' else 'rows'}){columns}")
        for metric in cls.metrics:
            lines.append(f"  metric {metric.name} [{', '.join(metric.scopes)}; {metric.unit}]: {metric.meaning}")
        per_profile = {p: cls.make_params(p, {}) for p in profiles}
        for field_name, field in cls.Params.model_fields.items():
            values = {p: _param_value(getattr(params, field_name)) for p, params in per_profile.items()}
            if len(set(values.values())) == 1:
                shown = f"{values[profiles[0]]} in every profile"
            else:
                shown = "; ".join(f"{p}: {v}" for p, v in values.items())
            lines.append(f"  param {field_name}: {field.description} (default {shown})")
    return lines


def _param_value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _cmd_demo(args: argparse.Namespace) -> int:
    from audit.demo import run_demo

    outcome = run_demo(args.out, seed=args.seed, profile=args.profile, quiet=args.quiet)
    if outcome.render_error:
        print(f"model-audit: error: {outcome.render_error}", file=sys.stderr)
        return outcome.exit_code
    if not args.quiet:
        _print_summary(outcome)
    return EXIT_OK


COMMANDS = {"run": _cmd_run, "render": _cmd_render, "rules": _cmd_rules, "probes": _cmd_probes, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    try:
        with termination_signals():
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("model-audit: interrupted; an earlier run in the output folder is intact", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("model-audit: terminated (SIGTERM); an earlier run in the output folder is intact", file=sys.stderr)
        return exit_codes.TERMINATED
    except SystemExit as exc:  # user code (a model's forward, a hook) called sys.exit during the audit
        print(f"model-audit: error: code run during the audit called sys.exit({exc.code!r}); no run was written", file=sys.stderr)
        return EXIT_INPUT
    except AuditError as exc:
        print(f"model-audit: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:
        if exc.filename is None:
            raise
        print(f"model-audit: error: {exc.filename}: {exc.strerror or first_line(exc)}", file=sys.stderr)  # a path given is a folder, unreadable, ...
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - an unexpected failure is still one line, with how to get details
        print(f"model-audit: internal error: {first_line(exc)} (please report it; rerun with MODEL_AUDIT_DEBUG=1 for a traceback)", file=sys.stderr)
        import os

        if os.environ.get("MODEL_AUDIT_DEBUG"):
            raise
        return EXIT_INPUT


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Like parse_args, but an unknown option is reported with the usage of the subcommand it was given
    to (`run --modle` shows run's usage, not the top level's)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = sub.choices[args.command]
        nested = getattr(args, "rules_command", None)
        if nested is not None:
            command = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction)).choices[nested]
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
