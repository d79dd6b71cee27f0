"""Rules are data: YAML specs (schema), a closed operator set (ops), the engine, the catalogue."""
