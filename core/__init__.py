"""Light, shared pieces of spherecast: config, grid, vocabulary, contracts, metrics, test factories."""

# The first libsqlite3 a process loads is the one every later user gets. ecCodes' wheel bundles
# SQLite 3.26, and xarray's backend discovery imports it (through cfgrib) on any open_dataset;
# MLflow's SQLite store needs ≥ 3.31. Loading Python's own sqlite3 first keeps the system's.
import sqlite3  # noqa: F401
