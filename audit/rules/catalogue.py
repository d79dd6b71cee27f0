"""The rule catalogue: built-in rules from `rules/`, user files from --rules, overrides from the config."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from audit.errors import InputError, RuleError, printable
from audit.metrics.names import parse_scope
from audit.resources import rules_dir
from audit.rules.schema import (
    RuleSpec,
    check_rules,
    load_rule_file,
    parse_rule,
    scope_problem,
)

if TYPE_CHECKING:
    from audit.metrics.declarations import Declarations

FORMAT_GUIDE = """\
## Writing a rule

A rule file holds one rule (or several, as a YAML list or `---`-separated documents) of schema
`model-audit/rule/v1`. `model-audit rules check FILE` validates it and refuses, with the file, the
key and the closest declared names, any metric or column no probe declares.

```yaml
schema: model-audit/rule/v1
id: domain-accuracy-gap-clear      # lower-case letters, digits and dashes
title: Accuracy drops on another domain, beyond sampling noise
metric: predictions.accuracy_gap   # <probe>.<metric>; with aggregate.stat a per-sample column <table>.<column>
aggregate: {per: [domain]}         # a scope kind, or a list: [class, domain/class] evaluates each kind in turn
min_support: 30                    # fewer samples: the scope is skipped, never passed or failed
thresholds:                        # most severe first; the first that holds decides
  - {op: gt, value: 0.05, bound: lo, status: fail, severity: high}   # the interval's lower bound is above 5 points
  - {op: gt, value: 0.05, status: warn, severity: medium}            # or only its point estimate is
  - {op: gt, value: 0.02, status: info}                              # noted, never judged
values: {accuracy: predictions.accuracy}   # the rule's own placeholders: a metric[:lo|:hi|:n] at the finding's scope
message: "{domain}: accuracy {accuracy:.1%}, {value:.1pt} below the reference domain's (interval {lo:.1pt} to {hi:.1pt})"
pass_message: "{domain}: within {threshold:.0pt} of the reference"
remedy: Compare the input statistics of the domains.   # may use the same placeholders as message
evidence: {column: predictions.error_confidence, order: desc, limit: 8}   # at most 1000 sample ids
```

- `op`: gt, ge, lt, le, eq, ne, or between / outside with `value: [low, high]`.
- `status`: fail or warn (with `severity` critical, high, medium or low), or info (severity info).
  Info findings inform without judging: they do not change the verdict or the exit code. A rule
  with no `thresholds` at all reports every judgeable scope as info.
- `bound: lo` / `bound: hi` compares the lower / upper bound of the metric's interval instead of its
  value (the metric must be declared with an interval); a scope whose interval is missing is skipped.
- `confirmed_by` makes a fail or warn threshold apply only when another metric at the same scope backs
  it, e.g. a proxy confirmed by a counterfactual:
  `{op: gt, value: 0.8, status: fail, severity: high, confirmed_by: [{metric: background.bg_gap, bound: lo,
  op: gt, value: 0.10}, {metric: background.only_bg_excess, bound: lo, op: gt, value: 0.10}]}`.
  Any one confirms (each is `metric`, optional `bound`, `op`, `value`, read as `values:` reads a metric).
  When the threshold holds but nothing confirms it, the next threshold decides, and the finding's message
  says which confirmation held or that none did (the `{confirmation}` placeholder places that text;
  without it, it is appended). A confirming metric must be declared, reported for every scope kind the
  rule is judged per, and declared with an interval when a `bound` is named.
- Placeholders: scope, value, threshold, n, lo, hi, class, domain, method, layer, pair, metric, rule,
  status, min_support, on_domain (" on domain D" when the scope has a domain, else empty: "{class}{on_domain}"
  reads right per class and per domain/class), confirmation, and the names under `values`; a missing value
  prints n/a. `message`, `pass_message` and `remedy` may use them, each with at most a simple format spec
  (`{value:.1%}`, `{n:,}`, `{class:>12}`; widths and precisions up to 50); attribute or index access
  (`{value.real}`), conversions (`!r`) and placeholders inside a spec are refused when the rule is loaded.
- A difference of two shares (a BG-gap, an accuracy drop) is said in percentage points, not percent:
  `{value:.0pt}` prints 0.47 as "47 points", `{value:+.1pt}` as "+47.0 points" (1 as "1 point"). Quote its
  limit the same way (`limit {threshold:.0pt}`), so a value and its limit are in one unit.
- Threshold values are finite numbers (no `.nan` or `.inf`); `between` / `outside` take `[low, high]`
  with low <= high.
- A config can change `thresholds` and `min_support` or switch a rule off: `rules: {<id>: {enabled: false}}`.
- A config waiver (`waivers: [{rule, scope, reason, by, expires}]`) names a rule and one of its finding
  scopes as results.json writes it (`global`, `class:fox`, `domain:data/class:fox`, or `*` for all);
  an unknown rule or a scope the rule cannot have is refused before the audit, and a waiver that waives
  nothing in a run is reported as an info finding.
"""


def builtin_rule_files() -> list[Path]:
    return sorted(rules_dir().glob("*.yaml"))


def _closest(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=3)
    return f"closest: {', '.join(close)}; " if close else ""


def _override(rule_id: str, override: Any) -> Any:
    """A config override as a validated RuleOverride; problems name the config key."""
    from audit.config import RuleOverride

    if isinstance(override, RuleOverride):
        return override
    key = f"config key 'rules.{printable(rule_id)}'"
    if not isinstance(override, Mapping):
        raise RuleError(f"{key}: must be a mapping of enabled, thresholds and min_support")
    try:
        return RuleOverride.model_validate(dict(override))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"] if not str(p).startswith(("float", "list[")))
        text = "unknown key" if error["type"] == "extra_forbidden" else printable(error["msg"].removeprefix("Value error, "))
        more = len(exc.errors()) - 1
        raise RuleError(f"config key 'rules.{printable(rule_id)}.{printable(where)}': {text}"
                        + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")) from None


def load_catalogue(extra_files: Iterable[Path] = (), overrides: Mapping[str, Any] | None = None,
                   declared: Declarations | None = None) -> list[RuleSpec]:
    """Built-in rules plus user files; config overrides change thresholds, support or switch rules off.
    Every rule is checked in full here (thresholds finite, templates safe); a rule changed by an
    override is validated again as changed. With `declared`, the rules left after the overrides must
    name only declared metrics and columns (a rule switched off is not held to it)."""
    rules: dict[str, RuleSpec] = {}
    for path in [*builtin_rule_files(), *[Path(p) for p in extra_files]]:
        for rule in load_rule_file(path):
            if rule.id in rules:
                raise RuleError(f"{path}: rule id {rule.id!r} is already defined in {rules[rule.id].source}; "
                                f"change its thresholds with 'rules: {{{rule.id}: {{thresholds: ...}}}}' in the config")
            rules[rule.id] = rule
    for rule_id, override in (overrides or {}).items():
        if rule_id not in rules:
            raise RuleError(f"config key 'rules.{printable(rule_id)}': no rule with this id "
                            f"({_closest(str(rule_id), rules)}see model-audit rules list)")
        spec = _override(rule_id, override)
        if not spec.enabled:
            del rules[rule_id]
            continue
        update: dict[str, Any] = {}
        if spec.thresholds is not None:
            update["thresholds"] = [t.model_dump(mode="json", exclude_none=True) for t in spec.thresholds]
        if spec.min_support is not None:
            update["min_support"] = spec.min_support
        if update:
            rule = rules[rule_id]
            data = {**rule.model_dump(mode="json", by_alias=True, exclude_none=True), **update}
            rules[rule_id] = parse_rule(data, f"{rule.source} (overridden in the config)")
    if declared is not None:
        check_rules(rules.values(), declared)
    return list(rules.values())


def check_waivers(waivers: Sequence[Any], rules: Iterable[RuleSpec], overrides: Mapping[str, Any] | None = None,
                  classes: Sequence[str] | None = None, domains: Sequence[str] | None = None) -> None:
    """Hold config waivers to the catalogue before any compute: each names a rule of `rules` (the
    loaded catalogue) that can conclude warn or fail, and a scope (see config.Waiver) of a kind the
    rule is judged per. With `classes` (the run's class names) and `domains` (the manifest's), the
    scope's class and domain must be among them. Raises one InputError line naming `waivers.<index>`
    and the key."""
    by_id = {rule.id: rule for rule in rules}
    switched_off = {str(rule_id) for rule_id, override in (overrides or {}).items() if not _enabled(override)}
    for index, waiver in enumerate(waivers):
        key = f"config key 'waivers.{index}"
        rule_id = str(waiver.rule)
        rule = by_id.get(rule_id)
        if rule is None:
            if rule_id in switched_off:
                raise InputError(f"{key}.rule': rule {rule_id!r} is switched off in the config (rules.{rule_id}.enabled: false), "
                                 "so the waiver can match nothing; remove it")
            raise InputError(f"{key}.rule': no rule {printable(rule_id)!r} ({_closest(rule_id, by_id)}see model-audit rules list)")
        if not rule.judges:
            raise InputError(f"{key}.rule': rule {rule_id!r} only informs (no fail or warn threshold), so there is nothing to waive")
        scope_text = str(waiver.scope)
        if scope_text == "*":
            continue
        problem = scope_problem(scope_text)
        if problem:
            raise InputError(f"{key}.scope': {problem} (or * for every scope of the rule)")
        parts = parse_scope(scope_text)
        kind = "/".join(parts) or "global"
        if kind not in rule.aggregate.kinds:
            raise InputError(f"{key}.scope': rule {rule_id!r} is judged per {rule.aggregate.text}, "
                             f"so it has no finding at scope {printable(scope_text)!r}")
        if classes is not None:
            names = {str(c) for c in classes}
            wanted = [parts["class"]] if "class" in parts else []
            if "pair" in parts and not _is_pair(parts["pair"], names):
                raise InputError(f"{key}.scope': {printable(parts['pair'])!r} is not a pair A->B of the run's classes")
            for name in wanted:
                if name not in names:
                    raise InputError(f"{key}.scope': {printable(name)!r} is not one of the run's classes "
                                     f"({_closest(name, names)}classes: {_few(classes)})")
        if domains is not None and "domain" in parts and parts["domain"] not in set(domains):
            listing = f"domains: {_few(domains)}" if domains else "the manifest has no domain column"
            raise InputError(f"{key}.scope': {printable(parts['domain'])!r} is not a domain of the manifest "
                             f"({_closest(parts['domain'], domains)}{listing})")


def _enabled(override: Any) -> bool:
    if isinstance(override, Mapping):
        return override.get("enabled", True) is not False
    return getattr(override, "enabled", True) is not False


def _is_pair(value: str, names: set[str]) -> bool:
    start = value.find("->")
    while start != -1:
        if value[:start] in names and value[start + 2:] in names:
            return True
        start = value.find("->", start + 1)
    return False


def _few(names: Sequence[str], limit: int = 10) -> str:
    shown = [printable(n) for n in list(names)[:limit]]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
