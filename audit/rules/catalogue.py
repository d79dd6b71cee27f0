"""The rule catalogue: built-in rules from `rules/`, user files from --rules, overrides from the config."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audit.errors import RuleError
from audit.resources import rules_dir
from audit.rules.schema import RuleSpec, Threshold, check_rules, load_rule_file

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
message: "{domain}: accuracy {accuracy:.1%}, {value:.1%} below the reference domain's (interval {lo:.1%} to {hi:.1%})"
pass_message: "{domain}: within {threshold:.0%} of the reference"
remedy: Compare the input statistics of the domains.   # may use the same placeholders as message
evidence: {column: predictions.error_confidence, order: desc, limit: 8}   # at most 1000 sample ids
```

- `op`: gt, ge, lt, le, eq, ne, or between / outside with `value: [low, high]`.
- `status`: fail or warn (with `severity` critical, high, medium or low), or info (severity info).
  Info findings inform without judging: they do not change the verdict or the exit code. A rule
  with no `thresholds` at all reports every judgeable scope as info.
- `bound: lo` / `bound: hi` compares the lower / upper bound of the metric's interval instead of its
  value (the metric must be declared with an interval); a scope whose interval is missing is skipped.
- Placeholders: scope, value, threshold, n, lo, hi, class, domain, method, layer, pair, metric, rule,
  status, min_support, and the names under `values`; a missing value prints n/a.
- A config can change `thresholds` and `min_support` or switch a rule off: `rules: {<id>: {enabled: false}}`.
"""


def builtin_rule_files() -> list[Path]:
    return sorted(rules_dir().glob("*.yaml"))


def load_catalogue(extra_files: Iterable[Path] = (), overrides: Mapping[str, Any] | None = None,
                   declared: Declarations | None = None) -> list[RuleSpec]:
    """Built-in rules plus user files; config overrides change thresholds, support or switch rules off.
    With `declared`, the rules left after the overrides must name only declared metrics and columns
    (a rule switched off is not held to it)."""
    rules: dict[str, RuleSpec] = {}
    for path in [*builtin_rule_files(), *[Path(p) for p in extra_files]]:
        for rule in load_rule_file(path):
            if rule.id in rules:
                raise RuleError(f"{path}: rule id {rule.id!r} is already defined in {rules[rule.id].source}; "
                                f"change its thresholds with 'rules: {{{rule.id}: {{thresholds: ...}}}}' in the config")
            rules[rule.id] = rule
    for rule_id, override in (overrides or {}).items():
        if rule_id not in rules:
            raise RuleError(f"config key 'rules.{rule_id}': no rule with this id (see model-audit rules list)")
        data = override.model_dump() if hasattr(override, "model_dump") else dict(override)
        if not data.get("enabled", True):
            del rules[rule_id]
            continue
        update: dict[str, Any] = {}
        if data.get("thresholds") is not None:
            update["thresholds"] = [Threshold.model_validate(t) for t in data["thresholds"]]
        if data.get("min_support") is not None:
            update["min_support"] = data["min_support"]
        if update:
            source = rules[rule_id].source
            rules[rule_id] = rules[rule_id].model_copy(update=update)
            rules[rule_id].source = f"{source} (overridden in the config)"
    if declared is not None:
        check_rules(rules.values(), declared)
    return list(rules.values())
