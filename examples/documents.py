"""Seed 002: a document platform's background jobs, each on its own queue with its own limit.

| task                         | queue               | limit | notes                                    |
| ---------------------------- | ------------------- | ----- | ---------------------------------------- |
| trigger-ingestion-job        | ingest              | 2     | sync (CPU-bound parsing), plan priority  |
| re-ingest-job                | re-ingest           | 1     |                                          |
| delete-document-job          | delete-document     | 5     |                                          |
| delete-ingest-job            | delete-ingest-job   | 3     | fans out delete-document-job             |
| delete-namespace-job         | delete-namespace    | 2     | fans out delete-document-job             |
| delete-organization-job      | delete-organization | 1     | fans out delete-namespace-job            |
| meter-org-documents-job      | meter               | 5     | one run per organisation at a time       |
| reset-usage                  | usage               | 1     | the seed's daily cron; trigger it by hand |

`enqueue_demo_mix()` is the producer: it enqueues a realistic mix with `batch_trigger`.
The external systems (parser, embeddings, vector store, database) are fakes from fakes.py.
"""

from __future__ import annotations

import time
from typing import Any

from fakes import FakeControls, call, call_sync, fake_documents
from pydantic import BaseModel, Field

import conveyor
from conveyor import BatchItem, Concurrency, Context, Queue, Retry, RunHandle, task

log = conveyor.logger

# --- payloads ------------------------------------------------------------------------------------


class IngestJob(BaseModel):
    job_id: str
    organization_id: str
    namespace_id: str
    documents: list[str] = Field(min_length=1, max_length=500)
    plan: str = "free"
    fake: FakeControls | None = None


class ReIngestJob(BaseModel):
    job_id: str
    namespace_id: str
    fake: FakeControls | None = None


class DeleteDocument(BaseModel):
    document_id: str
    namespace_id: str
    fake: FakeControls | None = None


class DeleteIngestJob(BaseModel):
    job_id: str
    namespace_id: str
    document_ids: list[str] = []


class DeleteNamespace(BaseModel):
    namespace_id: str
    organization_id: str


class DeleteOrganization(BaseModel):
    organization_id: str
    namespace_ids: list[str]


class MeterDocuments(BaseModel):
    organization_id: str
    delta: int


# --- ingestion -----------------------------------------------------------------------------------


@task(
    "trigger-ingestion-job",
    queue=Queue("ingest", concurrency_limit=2),
    retry=Retry(max_attempts=5, factor=2.0, min_delay=2.0, max_delay=60.0),
    max_duration=900,
    priority=lambda job: 60 if job.get("plan") == "pro" else 0,  # pro jobs jump 60 s ahead
)
def ingest(job: IngestJob, ctx: Context) -> dict[str, Any]:
    """A plain `def`: it runs in a worker's child process, so a stuck parser can still be
    stopped by cancel or max_duration."""
    chunks = 0
    for i, document in enumerate(job.documents, start=1):
        call_sync("parser", job.fake, seed=f"{job.job_id}:{document}", attempt=ctx.attempt.number)
        chunks += 3 + len(document) % 5  # "parse, chunk and embed"
        conveyor.metadata.set("progress", round(i / len(job.documents), 3))
        conveyor.metadata.increment("chunks", 3 + len(document) % 5)
    log.info("ingested %d documents into %s", len(job.documents), job.namespace_id)
    # Usage metering is its own job (its own queue, one run per organisation at a time).
    meter.trigger(
        {"organization_id": job.organization_id, "delta": len(job.documents)},
        idempotency_key=conveyor.idempotency_key("meter"),  # scoped to this run: a retry does not meter twice
    )
    return {"job_id": job.job_id, "documents": len(job.documents), "chunks": chunks}


@task(
    "re-ingest-job",
    queue=Queue("re-ingest", concurrency_limit=1),
    retry=Retry(max_attempts=3, min_delay=5.0, max_delay=60.0),
    max_duration=1800,
)
async def re_ingest(job: ReIngestJob, ctx: Context) -> dict[str, Any]:
    documents = fake_documents(job.namespace_id)
    for document in documents:
        await call("embeddings", job.fake, seed=f"{job.job_id}:{document}", attempt=ctx.attempt.number)
        conveyor.metadata.increment("done", 1)
    return {"job_id": job.job_id, "documents": len(documents)}


# --- deletions -----------------------------------------------------------------------------------


@task(
    "delete-document-job",
    queue=Queue("delete-document", concurrency_limit=5),
    retry=Retry(max_attempts=5, min_delay=1.0, max_delay=30.0),
    max_duration=300,
)
async def delete_document(doc: DeleteDocument, ctx: Context) -> dict[str, Any]:
    await call("vector-store", doc.fake, seed=doc.document_id, attempt=ctx.attempt.number)
    return {"deleted": doc.document_id}


async def _delete_documents(document_ids: list[str], namespace_id: str) -> list[str]:
    """Fan out one delete-document-job per document. The idempotency keys are scoped to this run,
    so a retry of the parent finds the children it already enqueued instead of adding more."""
    handles = await delete_document.batch_trigger_async(
        [
            BatchItem(
                {"document_id": d, "namespace_id": namespace_id},
                {"idempotency_key": conveyor.idempotency_key(d), "tags": [f"namespace:{namespace_id}"]},
            )
            for d in document_ids
        ]
    )
    return [h.id for h in handles]


@task(
    "delete-ingest-job",
    queue=Queue("delete-ingest-job", concurrency_limit=3),
    retry=Retry(max_attempts=5, min_delay=1.0, max_delay=30.0),
)
async def delete_ingest_job(job: DeleteIngestJob) -> dict[str, Any]:
    children = await _delete_documents(job.document_ids, job.namespace_id) if job.document_ids else []
    return {"job_id": job.job_id, "delete_runs": children}


@task(
    "delete-namespace-job",
    queue=Queue("delete-namespace", concurrency_limit=2),
    retry=Retry(max_attempts=5, min_delay=2.0, max_delay=60.0),
)
async def delete_namespace(ns: DeleteNamespace, ctx: Context) -> dict[str, Any]:
    documents = fake_documents(ns.namespace_id)  # "SELECT id FROM documents WHERE namespace_id = ?"
    children = await _delete_documents(documents, ns.namespace_id)
    await call("database", None, seed=f"drop:{ns.namespace_id}", attempt=ctx.attempt.number)
    return {"namespace_id": ns.namespace_id, "delete_runs": children}


@task(
    "delete-organization-job",
    queue=Queue("delete-organization", concurrency_limit=1),
    retry=Retry(max_attempts=10, min_delay=5.0, max_delay=300.0),
)
async def delete_organization(org: DeleteOrganization) -> dict[str, Any]:
    handles = await delete_namespace.batch_trigger_async(
        [
            BatchItem(
                {"namespace_id": ns, "organization_id": org.organization_id},
                {"idempotency_key": conveyor.idempotency_key(ns)},
            )
            for ns in org.namespace_ids
        ]
    )
    return {"organization_id": org.organization_id, "namespace_runs": [h.id for h in handles]}


# --- usage ---------------------------------------------------------------------------------------


@task(
    "meter-org-documents-job",
    queue=Queue("meter", concurrency_limit=5),
    concurrency=Concurrency(limit=1, key=lambda m: m["organization_id"]),  # serialise per organisation
    retry=Retry(max_attempts=5, min_delay=1.0, max_delay=30.0),
)
async def meter(m: MeterDocuments, ctx: Context) -> dict[str, Any]:
    await call("billing", None, seed=f"{ctx.run.id}", attempt=ctx.attempt.number)
    return {"organization_id": m.organization_id, "metered": m.delta}


@task("reset-usage", queue=Queue("usage", concurrency_limit=1), retry=Retry(max_attempts=3))
async def reset_usage() -> dict[str, Any]:
    """The seed's daily cron (noon UTC). Schedules are not built yet, so trigger it by hand:
    `conveyor trigger reset-usage --payload null`."""
    return {"reset_at": time.time()}


# --- the producer --------------------------------------------------------------------------------


def enqueue_demo_mix(prefix: str = "demo", jobs: int = 4) -> list[RunHandle]:
    """Enqueue what a busy minute of the web app would: ingestion jobs (one batch, atomic),
    deletions of each kind, a re-ingest. Returns the handles of the top-level runs."""
    handles = ingest.batch_trigger(
        [
            BatchItem(
                {
                    "job_id": f"{prefix}-job-{i}",
                    "organization_id": f"{prefix}-org-{i % 2}",
                    "namespace_id": f"{prefix}-ns-{i}",
                    "documents": [f"report-{i}-{n}.pdf" for n in range(1 + i % 3)],
                    "plan": "pro" if i % 2 else "free",
                },
                {"tags": [f"job_{prefix}-job-{i}"]},
            )
            for i in range(jobs)
        ]
    )
    handles += delete_document.batch_trigger(
        [{"document_id": f"{prefix}-old-{n}", "namespace_id": f"{prefix}-ns-0"} for n in range(3)]
    )
    handles.append(
        delete_ingest_job.trigger(
            {"job_id": f"{prefix}-job-stale", "namespace_id": f"{prefix}-ns-1", "document_ids": [f"{prefix}-stale-1"]}
        )
    )
    handles.append(re_ingest.trigger({"job_id": f"{prefix}-job-0", "namespace_id": f"{prefix}-ns-0"}))
    handles.append(
        delete_organization.trigger(
            {"organization_id": f"{prefix}-org-gone", "namespace_ids": [f"{prefix}-gone-a", f"{prefix}-gone-b"]}
        )
    )
    return handles
