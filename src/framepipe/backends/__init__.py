"""Storage backends: the state store (``state/``) and the object store (``objects/``).

The state store runs on SQLite (embedded) or PostgreSQL, the object store on local files or S3.
The job broker is not a backend here: it is :mod:`framepipe.jobs.delivery`.
"""
