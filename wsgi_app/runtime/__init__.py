"""Where deferred calls run in the worker: what a call and a batch are (``calls``), a
call's import path (``callpath``), the executor and its thread pool, the optional
helper process, and the CPU policy of those threads (``cpus``)."""
