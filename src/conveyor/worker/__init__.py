"""The worker: claims runs, runs their code, heartbeats leases, reports outcomes."""
