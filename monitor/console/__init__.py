"""The operator's web console: reads what the engine publishes in outputs.dir and serves it.

`store.py` owns the in-memory view of the output folder (tailed incrementally); `app.py` owns
the web layer (pages, live updates, review labels, security).
"""
