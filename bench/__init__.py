"""The benchmark: our server beside grpcio alone and the simplest correct peers, as ratios.

Laid out by concern: cli (the command line and presets), harness (the run, the mode, the one
measured window), processes (servers and load processes, never left behind), jobs, watchers
and mixed (the load jobs, each spec carrying its run), baselines (the ceiling, ceiling +
protobuf, the floor, asyncio dict), figures (goals, percentiles, ratios, table cells), machine
(readings from /proc and git), and one module per mode: throughput, scale, connections, watch,
soak, each with its goals, flags, run and rendering.
"""
