"""Stage 6, what the run reports: the log (logs), the logging window's scalars (metrics), experiment trackers
(trackers), profiler traces of chosen steps (profiling), the model card (card) and the Hub (hub).

May import: loop.config, loop.data, loop.engine, loop.model, loop.state.
"""
