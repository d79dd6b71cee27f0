"""The preprocessing section's view: one row per convention, the given one and the best one named."""

from __future__ import annotations

from typing import Any

from audit.report.views.base import ProbeView, register_view


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


@register_view
class PreprocessingView(ProbeView):
    probe = "preprocessing"

    def headline(self, metrics: Any) -> list[dict[str, str]]:
        """The given preprocessing's accuracy on the sample, and the convention that beats it, if one does."""
        rows = self.rows()
        given = next((r for r in rows if r["is_given"]), None)
        if given is None or not self.details.get("labelled"):
            return []
        n = f"{int(self.details.get('n_labelled') or 0):,}"
        out = [{"label": f"Accuracy with the preprocessing used ({given['flags']})", "value": given["accuracy_text"], "n": n}]
        best = next((r for r in rows if r["is_best"] and not r["is_given"]), None)
        if best is not None:
            out.append({"label": f"Best convention: {best['title']} ({best['flags']})", "value": best["accuracy_text"], "n": n})
        return out

    def rows(self) -> list[dict[str, Any]]:
        """The conventions as the section's table shows them: accuracy and gain with their intervals as text."""
        best = self.details.get("best")
        out = []
        for row in self.details.get("conventions", []):
            interval = f"[{_share(row['lo'])}, {_share(row['hi'])}]" if row.get("lo") is not None else ""
            gain_interval = f"[{_points(row['gain_lo'])}, {_points(row['gain_hi'])}]" if row.get("gain_lo") is not None else ""
            out.append({**row, "is_best": row["name"] == best,
                        "accuracy_text": _share(row.get("accuracy")), "accuracy_interval": interval,
                        "gain_text": "" if row.get("gain") is None else f"{_points(row['gain'])} points", "gain_interval": gain_interval,
                        "confidence_text": _share(row.get("confidence")),
                        "entropy_text": "n/a" if row.get("entropy") is None else f"{row['entropy']:.2f}"})
        return out
