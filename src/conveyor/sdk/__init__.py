"""What users import: the task decorator, the client, the run context and its helpers."""
