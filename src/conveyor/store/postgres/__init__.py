"""The PostgreSQL driver: psycopg 3 and a connection pool, objects in one schema, claims with
FOR UPDATE SKIP LOCKED, limits enforced with locks, wake-ups by LISTEN/NOTIFY."""

from conveyor.store.postgres.driver import PostgresStore

__all__ = ["PostgresStore"]
