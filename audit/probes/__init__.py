"""Probes compute evidence; each module registers one probe. Registration order is report order."""

from audit.probes import predictions  # noqa: F401, I001 - the order of these imports is the report's order
from audit.probes import preprocessing  # noqa: F401
from audit.probes import attribution  # noqa: F401
from audit.probes import occlusion  # noqa: F401
from audit.probes import background  # noqa: F401
from audit.probes import embeddings  # noqa: F401
