"""AuditConfig: one validated object from a YAML file and CLI flags (flags win).

The config is saved verbatim into results.json, so a run says exactly what it checked.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from audit.data import MAX_IMAGE_PIXELS
from audit.errors import InputError, first_line
from audit.rules.schema import ID_PATTERN, Threshold, scope_problem

FailOn = Literal["critical", "high", "medium", "low", "info", "never"]
Profile = Literal["smoke", "standard", "thorough"]
OutputKind = Literal["auto", "logits", "probabilities", "sigmoid"]
Layout = Literal["nchw", "nhwc"]
Device = Literal["auto", "cpu", "cuda"]

# Keys whose values are file paths; relative ones resolve against the config file's folder.
_PATH_KEYS = ("model", "manifest", "weights", "out")
_PATH_LIST_KEYS = ("data_root", "rule_files")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCard(_Strict):
    """Model-card facts shown on the report cover (Mitchell et al. 2019)."""

    name: str | None = None
    version: str | None = None
    owner: str | None = None
    intended_use: str | None = None
    training_data: str | None = None
    limitations: str | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value  # `version: 2.1` in YAML is a number


class RuleOverride(_Strict):
    """Per-rule changes from the config: `rules.<id>.thresholds` and friends. Thresholds are held to
    the rule format (finite numbers, known ops and statuses); the rule they change is validated again
    with them when the catalogue is loaded."""

    enabled: bool = True
    thresholds: list[Threshold] | None = None
    min_support: int | None = Field(default=None, ge=0)

    @field_validator("thresholds")
    @classmethod
    def _some_thresholds(cls, value: list[Threshold] | None) -> list[Threshold] | None:
        if value is not None and not value:
            raise ValueError("list at least one threshold (or switch the rule off with enabled: false)")
        return value


class Waiver(_Strict):
    """An accepted risk: the finding stays in the report, marked waived, with who and why.

    `scope` is a finding's scope as results.json writes it (`global`, `class:fox`, `domain:data/class:fox`,
    ...) or `*` for every scope of the rule. That the rule exists and can have the scope is checked with
    the catalogue (audit.rules.catalogue.check_waivers); a waiver that waives nothing is reported."""

    rule: str = Field(pattern=ID_PATTERN)
    scope: str = "global"
    reason: str
    by: str
    expires: dt.date | None = None  # an expired waiver no longer applies

    @field_validator("scope")
    @classmethod
    def _scope_grammar(cls, value: str) -> str:
        problem = None if value == "*" else scope_problem(value)
        if problem:
            raise ValueError(f"{problem} (or * for every scope of the rule)")
        return value

    @field_validator("reason", "by")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank: a waiver says who accepted the risk and why")
        return value


class AuditConfig(_Strict):
    model: Path
    manifest: Path
    weights: Path | None = None
    classes: list[str] | None = None
    input_size: tuple[int, int] | None = None
    channels: int | None = Field(default=None, ge=1)
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: Layout | None = None
    output_kind: OutputKind = "auto"
    output_name: str | None = None
    trust_pickle: bool = False  # accept torch.export archives whose loading unpickles what they carry
    embedding_layer: str | None = None  # the classifier head (torch module) or the embedding tensor (ONNX), when not found by itself
    data_root: list[Path] = Field(default_factory=list)
    probes: list[str] | None = None
    probe_params: dict[str, dict[str, Any]] = Field(default_factory=dict)  # `enabled: false` switches a probe off
    profile: Profile = "standard"
    rules: dict[str, RuleOverride] = Field(default_factory=dict)
    rule_files: list[Path] = Field(default_factory=list)
    waivers: list[Waiver] = Field(default_factory=list)
    out: Path | None = None
    fail_on: FailOn = "high"
    device: Device = "auto"
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # numpy's generators take 0 .. 2**32 - 1
    force: bool = False  # write into a non-empty --out that is not a model-audit run (nothing in it is deleted)
    max_image_pixels: int = Field(default=MAX_IMAGE_PIXELS, ge=1)  # images declaring more are skipped before decoding
    max_samples: int | None = Field(default=None, ge=1)
    sample_images: bool = True
    quiet: bool = False
    batch_size: int = Field(default=64, ge=1)
    workers: int = Field(default=2, ge=0)
    chunk_samples: int = Field(default=256, ge=1)  # detail-stage samples per chunk written to the run store
    time_budget: float | None = Field(default=None, gt=0)  # seconds the whole audit may take; "10m", "1h30m", "90s" accepted
    reference_domain: str | None = None
    model_card: ModelCard | None = None

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return parse_duration(v) if isinstance(v, str) else v

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and (v[0] < 1 or v[1] < 1):
            raise ValueError("input_size must be two positive integers H W")
        return v

    @field_validator("std")
    @classmethod
    def _nonzero_std(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s == 0 for s in v):
            raise ValueError("std must not contain 0")
        return v

    @model_validator(mode="after")
    def _channels_match_normalisation(self) -> AuditConfig:
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and self.channels is not None and len(values) not in (1, self.channels):
                raise ValueError(f"{key} has {len(values)} values but channels is {self.channels}")
        return self

    def resolved_out(self) -> Path:
        """Deterministic default so a re-run of the same model and manifest finds its earlier run."""
        if self.out is not None:
            return self.out
        return Path("reports") / f"{_model_stem(self.model)}-{Path(self.manifest).stem}"

    def public_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m(?:in)?)?(?:(\d+(?:\.\d*)?)s)?")


def parse_duration(text: str) -> float:
    """Seconds in '10m', '1h30m', '90s', '2.5h' or a plain number of seconds."""
    compact = text.strip().replace(" ", "").lower()
    try:
        return float(compact)
    except ValueError:
        pass
    match = _DURATION.fullmatch(compact)
    if not compact or match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration (e.g. 10m, 1h30m, 90s)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _model_stem(model: Path) -> str:
    text = str(model)
    if ":" in text and not Path(text).exists():  # package.module:factory or file.py:factory
        module, _, factory = text.rpartition(":")
        return f"{Path(module).stem.split('.')[-1]}.{factory}"
    return Path(text).stem


def read_config_file(path: Path) -> dict[str, Any]:
    """Read audit.yaml into the flat key space of AuditConfig, paths made absolute."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: config file is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (ValueError, IndexError, TypeError, RecursionError) as exc:  # PyYAML's own crashes on e.g. `2001-13-01`, a bare `!!float`
        raise InputError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the config must be a mapping of keys to values")
    base = Path(path).resolve().parent
    data = {str(k).replace("-", "_"): v for k, v in raw.items()}

    probes = data.pop("probes", None)
    if isinstance(probes, list):
        data["probes"] = [str(p) for p in probes]
    elif isinstance(probes, dict):
        data["probe_params"] = {str(name): dict(value or {}) for name, value in probes.items()}
    elif probes is not None:
        raise InputError(f"{path}: key 'probes' must be a list of probe names or a mapping of probe parameters")

    rules = data.pop("rules", None)
    if isinstance(rules, list):
        data.setdefault("rule_files", []).extend(rules)
    elif isinstance(rules, dict):
        data["rules"] = rules
    elif rules is not None:
        raise InputError(f"{path}: key 'rules' must be a list of rule files or a mapping of rule overrides")

    if isinstance(data.get("classes"), str):
        data["classes"] = read_classes_file(_absolute(base, data["classes"]))
    if isinstance(data.get("data_root"), str):
        data["data_root"] = [data["data_root"]]
    for key in _PATH_KEYS:
        if isinstance(data.get(key), str):
            data[key] = _absolute(base, data[key], allow_factory=key == "model")
    for key in _PATH_LIST_KEYS:
        if isinstance(data.get(key), list):
            data[key] = [_absolute(base, p) for p in data[key]]
    return data


def _absolute(base: Path, value: str, allow_factory: bool = False) -> str:
    if allow_factory and ":" in value and not value.endswith((".onnx", ".pt", ".pth", ".pt2")):
        module, _, factory = value.rpartition(":")
        if module.endswith(".py"):
            return f"{_absolute(base, module)}:{factory}"
        return value
    p = Path(value).expanduser()
    return str(p) if p.is_absolute() else os.path.normpath(base / p)  # `out: ../demo` names the folder, not a detour


def read_classes_file(path: Path | str) -> list[str]:
    """One class name per line, in model output order; blank lines and '#' comments ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: classes file not found") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: classes file is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the classes file ({exc.strerror})") from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise InputError(f"{path}: classes file lists no class names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{path}: class name {duplicates[0]!r} appears more than once")
    return names


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any], source: str = "config") -> AuditConfig:
    """Merge config-file values with flags (flags that were given win) and validate."""
    merged = dict(file_values)
    for key, value in flag_values.items():
        if value is None or (isinstance(value, list) and not value and key in merged):
            continue
        if key == "rule_files":
            merged["rule_files"] = list(merged.get("rule_files", [])) + list(value)
        elif key == "data_root":
            merged["data_root"] = list(merged.get("data_root", [])) + list(value)
        else:
            merged[key] = value
    for required in ("model", "manifest"):
        if merged.get(required) in (None, ""):
            raise InputError(f"missing --{required} (or '{required}:' in the config file)")
    try:
        return AuditConfig.model_validate(merged)
    except ValidationError as exc:
        raise InputError(describe_validation_error(exc, source)) from None


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line: the first problem with its dotted key, plus how many more there are."""
    errors = exc.errors()
    first = errors[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        text = f"{source}: unknown key '{key}'"
    else:
        text = f"{source}: key '{key}': {first['msg']}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text
