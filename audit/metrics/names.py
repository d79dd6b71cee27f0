"""Flat metric names: `<probe>.<metric>[@<scope>][:lo|:hi|:n]`, parseable without ambiguity.

Scopes are `global`, `class:C`, `domain:D`, `domain:D/class:C`, `method:M`, `layer:L`, `pair:A->B`,
`convention:P` (a preprocessing convention).
Values inside a scope are percent-escaped for the four reserved characters `% / : @`, so a class
named "n/a" or "x:y" cannot be confused with the scope syntax or an interval suffix.
"""

from __future__ import annotations

from dataclasses import dataclass

SUFFIXES = ("lo", "hi", "n")
SCOPE_KINDS = ("class", "domain", "method", "layer", "pair", "group", "convention")
_ESCAPES = {"%": "%25", "/": "%2F", ":": "%3A", "@": "%40"}


def escape(value: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in str(value))


def unescape(value: str) -> str:
    out = value
    for ch, code in reversed(list(_ESCAPES.items())):
        out = out.replace(code, ch).replace(code.lower(), ch)
    return out


def scope(**parts: str) -> str:
    """scope(domain="data", class_="wolf") -> 'domain:data/class:wolf' (order: domain, class, others)."""
    order = ["domain", "class_", "method", "layer", "pair", "group", "convention"]
    items = [(k.rstrip("_"), parts[k]) for k in order if parts.get(k) is not None]
    return "/".join(f"{kind}:{escape(value)}" for kind, value in items) if items else "global"


def pair(a: str, b: str) -> str:
    return f"pair:{escape(a)}->{escape(b)}"


def parse_scope(text: str) -> dict[str, str]:
    """'domain:data/class:wolf' -> {'domain': 'data', 'class': 'wolf'}; 'global' -> {}."""
    if text in ("", "global"):
        return {}
    out: dict[str, str] = {}
    for segment in text.split("/"):
        kind, sep, value = segment.partition(":")
        if not sep or kind not in SCOPE_KINDS:
            raise ValueError(f"bad scope segment {segment!r} in {text!r}")
        out[kind] = unescape(value)
    return out


def scope_kind(text: str) -> str:
    """'domain:data/class:wolf' -> 'domain/class'; 'global' -> 'global'."""
    if text in ("", "global"):
        return "global"
    return "/".join(segment.partition(":")[0] for segment in text.split("/"))


def display_scope(text: str) -> str:
    """Human form: 'domain:data/class:a%2Fb' -> 'domain data, class a/b'."""
    parts = parse_scope(text)
    if not parts:
        return "global"
    return ", ".join(f"{kind} {value}" for kind, value in parts.items())


def metric_key(name: str, scope_text: str = "global") -> str:
    return name if scope_text in ("", "global") else f"{name}@{scope_text}"


@dataclass(frozen=True)
class MetricKey:
    name: str
    scope: str = "global"
    suffix: str | None = None

    def __str__(self) -> str:
        key = metric_key(self.name, self.scope)
        return f"{key}:{self.suffix}" if self.suffix else key


def parse_key(key: str) -> MetricKey:
    """Inverse of str(MetricKey): each scope segment holds exactly one ':' (values are escaped)."""
    name, at, rest = key.partition("@")
    if not at:
        base, sep, suffix = name.partition(":")
        return MetricKey(base, "global", suffix if sep else None)
    segments = rest.split("/")
    last = segments[-1]
    suffix = None
    if last.count(":") == 2:
        last, _, suffix = last.rpartition(":")
        segments[-1] = last
    if suffix is not None and suffix not in SUFFIXES:
        raise ValueError(f"bad metric suffix {suffix!r} in {key!r}")
    scope_text = "/".join(segments)
    parse_scope(scope_text)
    return MetricKey(name, scope_text, suffix)
