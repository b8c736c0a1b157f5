"""Pure building blocks: statuses, transitions, backoff, ids, the clock, errors. No I/O here."""
