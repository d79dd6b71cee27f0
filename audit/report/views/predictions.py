"""The predictions section's view: the summary's headline numbers and the evidence captions."""

from __future__ import annotations

from typing import Any

from audit.metrics.names import display_scope
from audit.report.views.base import ProbeView, register_view


@register_view
class PredictionsView(ProbeView):
    probe = "predictions"

    def headline(self, metrics: Any) -> list[dict[str, str]]:
        rows = []
        if metrics.get("predictions.accuracy") is not None:
            rows.append({"label": "Accuracy, all labelled samples", "value": metrics.text("predictions.accuracy"),
                         "n": _n(metrics, "predictions.accuracy", "global")})
        for scope_text in metrics.scopes("predictions.accuracy", "domain"):
            rows.append({"label": f"Accuracy, {display_scope(scope_text)}", "value": metrics.text("predictions.accuracy", scope_text),
                         "n": _n(metrics, "predictions.accuracy", scope_text)})
        if metrics.get("predictions.ece") is not None:
            rows.append({"label": "Expected calibration error", "value": metrics.text("predictions.ece"),
                         "n": _n(metrics, "predictions.ece", "global")})
        return rows

    def facts(self, ids: set[str]) -> dict[str, str]:
        """id -> 'true -> predicted (confidence)'."""
        table = self.table("predictions")
        if table is None or not ids:
            return {}
        out = {}
        for row in table[table["id"].isin(ids)].itertuples():
            truth = row.label_name if isinstance(row.label_name, str) else "?"
            out[str(row.id)] = f"{truth} → {row.pred_name} ({row.confidence:.0%})"
        return out


def _n(metrics: Any, name: str, scope_text: str) -> str:
    n = metrics.get(name, scope_text, "n")
    return "" if n is None else f"{int(n):,}"
