"""Chorus's streaming benchmark: the real stack as processes, driven by K concurrent logged-in WebSocket clients.

Run ``python -m bench --help``; docs/performance.md explains what it measures and keeps the latest numbers.

Modules:
    bench.procs     processes (pinned, logged, measured from /proc, stopped by PID), Redis and the database
    bench.setup     bench users, conversations and session cookies, written with the ORM
    bench.clients   the WebSocket clients, the direct-to-model clients (the floor), idle sockets
    bench.stats     percentiles and per-K summaries
    bench.profile   py-spy recordings of the server processes, summarised
    bench.cli       the command line: one table, one JSON file
"""
