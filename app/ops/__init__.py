"""Operations: audit trail, structured logs, Prometheus metrics."""
