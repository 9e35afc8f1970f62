"""The reports of SPEC 3.4: summary, owners, daily and stuck, one module each, computed
by SQL aggregation on SQLite and PostgreSQL alike. The HTTP API and the CLI call these
same functions and only format their rows (manager/reports/columns.py)."""
