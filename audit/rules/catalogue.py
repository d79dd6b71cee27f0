"""The rule catalogue: built-in rules from `rules/`, user files from --rules, overrides from the config."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from audit.errors import RuleError
from audit.resources import rules_dir
from audit.rules.schema import RuleSpec, Threshold, load_rule_file


def builtin_rule_files() -> list[Path]:
    return sorted(rules_dir().glob("*.yaml"))


def load_catalogue(extra_files: Iterable[Path] = (), overrides: Mapping[str, Any] | None = None) -> list[RuleSpec]:
    """Built-in rules plus user files; config overrides change thresholds, support or switch rules off."""
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
    return list(rules.values())
